"""Device meshes and torch's own DTensor tensor parallelism on the backend under test (issue 12, "Meshes").

Two launches:

- 8 ranks: ``init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "tp", "pp"))`` with the backend under test as
  the default group. Each dimension's group holds the expected global ranks and uses the backend under test; a SUM
  all-reduce on each dimension gives exact integers; ``plait.parallel._groups.resolve_group((mesh, dim))`` returns
  that dimension's group; a flattened ("dp", "tp") dimension and a DTensor sharded over all three dimensions
  (gathered back with ``full_tensor``) work too.
- 4 ranks, float64, TP 4 on a 1-D mesh and TP 2 on the "tp" dimension of a 2 x 2 ("dp", "tp") mesh: a
  transformer-style block parallelised with ``parallelize_module``:
  (a) MLP Linear -> GELU -> Linear as ``ColwiseParallel`` / ``RowwiseParallel``;
  (b) a full pre-norm block (attention with heads split across ranks + MLP) with sequence parallelism:
      ``SequenceParallel`` LayerNorms, ``PrepareModuleInput`` (Shard(1) -> Replicate) in front of attention / MLP,
      ``RowwiseParallel(output_layouts=Shard(1))`` output projections, plus a ``ColwiseParallel`` vocabulary
      projection with ``output_layouts=Shard(-1), use_local_output=False`` whose Shard(-1) logits feed
      ``F.cross_entropy`` under ``loss_parallel()``.
  Output, loss, input gradient, every weight gradient and every weight after an SGD step equal the dense module's
  (relative error <= 1e-12). ``CommDebugMode`` counts of the forward, backward and optimizer-step collectives
  equal fixed references (the same when this file runs with ``PLAIT_TEST_BACKEND=gloo``) and the counts of the
  same computation on a gloo mesh built in the same processes (``init_device_mesh(..., backend_override=...)``),
  whose results must equal the ones on the backend under test (bitwise at TP 2, where every reduction adds two
  values; within 1e-12 relative at TP 4, where the summation order may legitimately differ).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import _harness as H

RTOL = 1e-12


# --------------------------------------------------------------------------------------------------------------
# 8 ranks: a DP x TP x PP mesh


def worker_mesh_3d(rank, ws):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from plait.parallel._groups import resolve_group, group_rank, group_size, global_rank

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "tp", "pp"))
    out = {"coord": tuple(mesh.get_coordinate()), "dims": {}}
    base = torch.tensor([1, 1000, 1000000], dtype=torch.int64)
    for i, name in enumerate(("dp", "tp", "pp")):
        pg = mesh.get_group(name)
        t = base * (rank + 1)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
        out["dims"][name] = {
            "ranks": dist.get_process_group_ranks(pg),
            "backend": dist.get_backend(pg),
            "sum": t.tolist(),
            "resolve_same": resolve_group((mesh, name)) is pg and resolve_group((mesh, i)) is pg
            and resolve_group(mesh[name]) is pg,
            "group_rank": group_rank((mesh, name)),
            "group_size": group_size((mesh, name)),
            "global_ranks": [global_rank((mesh, name), r) for r in range(2)],
        }
    # a flattened DP x TP dimension (torch 2.13 has only the private DeviceMesh._flatten; FSDP2 + TP code uses it)
    flat = mesh["dp", "tp"]._flatten("dp_tp")
    pg = flat.get_group()
    t = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(t, group=pg)
    out["flat"] = {"ranks": dist.get_process_group_ranks(pg), "sum": t.item()}
    # a DTensor sharded over dp (dim 0) and pp (dim 1), replicated over tp; full_tensor gathers on two sub-groups
    full = torch.arange(4 * 6, dtype=torch.float64).reshape(4, 6)
    dt = distribute_tensor(full, mesh, [Shard(0), Replicate(), Shard(1)])
    out["local"] = dt.to_local().clone()
    out["full_equal"] = torch.equal(dt.full_tensor(), full)
    # a sum over the sharded tensor: Partial on dp and pp, which full_tensor() all-reduces on those two groups
    out["dt_sum"] = dt.sum().full_tensor().item()
    return out


@pytest.mark.timeout(300)
def test_device_mesh_3d_8_ranks():
    results = H.run_world(worker_mesh_3d, 8, timeout_s=240)
    base = [1, 1000, 1000000]
    for rank, res in enumerate(results):
        d, t, p = rank // 4, (rank // 2) % 2, rank % 2
        assert res["coord"] == (d, t, p), f"rank {rank}: mesh coordinate {res['coord']}"
        expected_ranks = {
            "dp": [t * 2 + p, 4 + t * 2 + p],
            "tp": [d * 4 + p, d * 4 + 2 + p],
            "pp": [d * 4 + t * 2, d * 4 + t * 2 + 1],
        }
        for i, name in enumerate(("dp", "tp", "pp")):
            got = res["dims"][name]
            ranks = expected_ranks[name]
            assert got["ranks"] == ranks, f"rank {rank} dim {name}: group ranks {got['ranks']}, expected {ranks}"
            assert got["backend"] == H.BACKEND, f"rank {rank} dim {name}: backend {got['backend']}"
            s = sum(r + 1 for r in ranks)
            assert got["sum"] == [b * s for b in base], f"rank {rank} dim {name}: all-reduce {got['sum']}"
            assert got["resolve_same"], f"rank {rank} dim {name}: resolve_group did not return the mesh's group"
            assert got["group_rank"] == ranks.index(rank) and got["group_size"] == 2
            assert got["global_ranks"] == ranks
        flat_ranks = [d2 * 4 + t2 * 2 + p for d2 in range(2) for t2 in range(2)]
        assert res["flat"]["ranks"] == flat_ranks, f"rank {rank}: flattened dp_tp ranks {res['flat']['ranks']}"
        assert res["flat"]["sum"] == sum(r + 1 for r in flat_ranks)
        full = torch.arange(4 * 6, dtype=torch.float64).reshape(4, 6)
        assert torch.equal(res["local"], full[2 * d:2 * d + 2, 3 * p:3 * p + 3]), f"rank {rank}: local shard"
        assert res["full_equal"], f"rank {rank}: full_tensor differs from the distributed tensor"
        assert res["dt_sum"] == float(full.sum().item())


# --------------------------------------------------------------------------------------------------------------
# 4 ranks: DTensor tensor parallelism vs the dense module

D, FF, HEADS, VOCAB, BATCH, SEQ = 16, 32, 4, 24, 2, 8


class MLP(nn.Module):
    def __init__(self, d=D, ff=FF):
        super().__init__()
        self.w1 = nn.Linear(d, ff)
        self.w2 = nn.Linear(ff, d)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; the head count is derived from the local width, so column-sharded q/k/v give
    each rank ``HEADS / tp`` whole heads. The key projection has no bias: softmax is invariant to it, so its
    gradient is rounding noise around zero, which no relative tolerance can compare."""

    def __init__(self, d=D, heads=HEADS):
        super().__init__()
        self.head_dim = d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(D)
        self.mlp = MLP()
        self.out = nn.Linear(D, VOCAB)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.out(x)


def _seeded(cls):
    torch.manual_seed(4321)
    m = cls().to(torch.float64)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so their gradients are exercised
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(torch.randn_like(mod.weight) * 0.1)
                mod.bias.add_(torch.randn_like(mod.bias) * 0.1)
    return m


def _inputs():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(BATCH, SEQ, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return x, target


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_shapes(model):
    return {n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
            for n, p in model.named_parameters()}


def _counts(comm_mode):
    """{"all_reduce": n, ...} from CommDebugMode's per-op counts (keys such as c10d_functional.all_reduce)."""
    return {str(k).split(".")[-1]: v for k, v in comm_mode.get_comm_counts().items() if v}


def _run_mlp(mesh, dense):
    """Colwise -> GELU -> Rowwise on replicated input; mean-square loss."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = parallelize_module(copy.deepcopy(dense), mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    x, _ = _inputs()
    x = x.clone().requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fwd, bwd, step = CommDebugMode(), CommDebugMode(), CommDebugMode()
    with fwd:
        y = model(x)
        loss = (y ** 2).mean()
    with bwd:
        loss.backward()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    with step:
        opt.step()
    return {"out": y.detach().clone(), "loss": loss.detach().clone(), "x_grad": x.grad.clone(), "grads": grads,
            "params": {n: _full(p.detach()).clone() for n, p in model.named_parameters()},
            "counts": (_counts(fwd), _counts(bwd), _counts(step)), "shapes": _local_shapes(model)}


def _run_block_sp(mesh, dense):
    """Sequence-parallel pre-norm block with a vocabulary-parallel output and loss_parallel cross-entropy.

    The input is the rank's sequence shard (Shard(1)); the output projection is column-parallel over the
    vocabulary with Shard(-1) DTensor logits (use_local_output=False), which loss_parallel reduces directly.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, loss_parallel, parallelize_module)

    plan = {
        "ln1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.o": RowwiseParallel(output_layouts=Shard(1)),
        "ln2": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.w1": ColwiseParallel(),
        "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
        "out": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    model = parallelize_module(copy.deepcopy(dense), mesh, plan)
    tp, r = mesh.size(), mesh.get_local_rank()
    x, target = _inputs()
    x_local = x.chunk(tp, dim=1)[r].clone().requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fwd, bwd, step = CommDebugMode(), CommDebugMode(), CommDebugMode()
    with loss_parallel():
        with fwd:
            logits = model(x_local)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        with bwd:
            loss.backward()
    # full_tensor() reduces the LayerNorms' Partial gradients here without changing p.grad, so the optimizer
    # step below still performs (and counts) those reductions itself
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    with step:
        opt.step()
    return {"placements": [(type(p).__name__, getattr(p, "dim", None)) for p in logits.placements], "logits": logits.full_tensor().detach().clone(),
            "loss": _full(loss).detach().clone(), "x_grad": x_local.grad.clone(), "grads": grads,
            "params": {n: _full(p.detach()).clone() for n, p in model.named_parameters()},
            "counts": (_counts(fwd), _counts(bwd), _counts(step)), "shapes": _local_shapes(model)}


def _dense_mlp(dense):
    m = copy.deepcopy(dense)
    x, _ = _inputs()
    x = x.clone().requires_grad_(True)
    y = m(x)
    loss = (y ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    return {"out": y.detach(), "loss": loss.detach(), "x_grad": x.grad, "grads": grads,
            "params": {n: p.detach().clone() for n, p in m.named_parameters()}}


def _dense_block(dense):
    m = copy.deepcopy(dense)
    x, target = _inputs()
    x = x.clone().requires_grad_(True)
    logits = m(x)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    return {"logits": logits.detach(), "loss": loss.detach(), "x_grad": x.grad, "grads": grads,
            "params": {n: p.detach().clone() for n, p in m.named_parameters()}}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _flatten(res):
    """name -> tensor for every compared quantity of a result dict."""
    out = {}
    for k, v in res.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, dict) and k in ("grads", "params"):
            out.update({f"{k}.{n}": t for n, t in v.items()})
    return out


def _tp_cases(mesh, gloo_mesh, dense_mlp, dense_block, ref_mlp, ref_block):
    """Run both cases on ``mesh`` (backend under test) and ``gloo_mesh`` and compare with the dense references."""
    out = {"backend": dist.get_backend(mesh.get_group()), "gloo_backend": dist.get_backend(gloo_mesh.get_group()),
           "ranks": dist.get_process_group_ranks(mesh.get_group()),
           "gloo_ranks": dist.get_process_group_ranks(gloo_mesh.get_group())}
    x_grad_shard = ref_block["x_grad"].chunk(mesh.size(), dim=1)[mesh.get_local_rank()]
    for case, run, dense, ref in (("mlp", _run_mlp, dense_mlp, ref_mlp),
                                  ("block_sp", _run_block_sp, dense_block, dict(ref_block, x_grad=x_grad_shard))):
        res, res_gloo = run(mesh, dense), run(gloo_mesh, dense)
        a, g, d = _flatten(res), _flatten(res_gloo), _flatten(ref)
        assert set(a) == set(d), f"{case}: compared names differ: {sorted(set(a) ^ set(d))}"
        out[case] = {
            "rel_vs_dense": {n: _rel(a[n], d[n]) for n in d},
            "rel_gloo_vs_dense": {n: _rel(g[n], d[n]) for n in d},
            "equal_vs_gloo": {n: torch.equal(a[n], g[n]) for n in d},
            "rel_vs_gloo": {n: _rel(a[n], g[n]) for n in d},
            "counts": res["counts"], "gloo_counts": res_gloo["counts"],
            "placements": res.get("placements"), "shapes": res["shapes"],
        }
    return out


def worker_tp(rank, ws):
    """TP = 4 on a 1-D mesh of the 4 ranks, then TP = 2 on the "tp" dimension of a 2 x 2 ("dp", "tp") mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dense_mlp, dense_block = _seeded(MLP), _seeded(Block)
    refs = (_dense_mlp(dense_mlp), _dense_block(dense_block))
    out = {}
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",))
    gloo_mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("tp",), backend_override={"tp": "gloo"})
    out[ws] = _tp_cases(mesh, gloo_mesh, dense_mlp, dense_block, *refs)
    mesh2 = init_device_mesh("cpu", (ws // 2, 2), mesh_dim_names=("dp", "tp"))
    gloo_mesh2 = init_device_mesh("cpu", (ws // 2, 2), mesh_dim_names=("dp", "tp"),
                                  backend_override={"dp": "gloo", "tp": "gloo"})
    out[2] = _tp_cases(mesh2["tp"], gloo_mesh2["tp"], dense_mlp, dense_block, *refs)
    return out


# Collective counts reported by CommDebugMode as (forward incl. loss, backward, SGD step); observed identical on
# plait and on gloo (PLAIT_TEST_BACKEND=gloo) at TP 2 and 4.
EXPECTED_COUNTS = {
    # forward: the row-parallel output's Partial -> Replicate; backward: the column-parallel input's gradient
    "mlp": ({"all_reduce": 1}, {"all_reduce": 1}, {}),
    # forward: all-gather of the sequence shards in front of attention, MLP and the vocabulary projection (3),
    #   reduce-scatter of attention's and the MLP's row-parallel outputs (2), and loss_parallel's cross-entropy
    #   over the vocabulary shards (3 all-reduces);
    # backward: the duals: reduce-scatter for each forward all-gather (3), all-gather for each reduce-scatter (2);
    #   the LayerNorm weights' gradients stay Partial (their inputs are sequence shards) ...
    # step: ... and SGD reduces them to Replicate: ln1 / ln2 weight and bias (4 all-reduces).
    "block_sp": ({"all_gather_into_tensor": 3, "reduce_scatter_tensor": 2, "all_reduce": 3},
                 {"reduce_scatter_tensor": 3, "all_gather_into_tensor": 2},
                 {"all_reduce": 4}),
}


@pytest.mark.timeout(300)
def test_dtensor_tp_parity():
    ws = 4
    results = H.run_world(worker_tp, ws, timeout_s=240)
    for rank, by_tp in enumerate(results):
        for tp, res in by_tp.items():
            where = f"rank {rank} TP {tp}"
            ranks = list(range(ws)) if tp == ws else [rank - rank % 2, rank - rank % 2 + 1]
            assert res["ranks"] == ranks and res["gloo_ranks"] == ranks, f"{where}: group ranks {res['ranks']}"
            assert res["backend"] == H.BACKEND and res["gloo_backend"] == "gloo", where
            for case in ("mlp", "block_sp"):
                c = res[case]
                bad = {n: e for n, e in c["rel_vs_dense"].items() if not e <= RTOL}
                assert not bad, f"{where} {case}: relative error vs the dense module above {RTOL}: {bad}"
                bad = {n: e for n, e in c["rel_gloo_vs_dense"].items() if not e <= RTOL}
                assert not bad, f"{where} {case} (gloo mesh): relative error vs dense above {RTOL}: {bad}"
                if tp == 2:
                    bad = [n for n, eq in c["equal_vs_gloo"].items() if not eq]
                    assert not bad, f"{where} {case}: not bitwise equal to the gloo mesh: {bad}"
                else:
                    bad = {n: e for n, e in c["rel_vs_gloo"].items() if not e <= RTOL}
                    assert not bad, f"{where} {case}: relative difference vs the gloo mesh above {RTOL}: {bad}"
                assert c["counts"] == EXPECTED_COUNTS[case], \
                    f"{where} {case}: CommDebugMode counts (forward, backward, step) {c['counts']}"
                assert c["counts"] == c["gloo_counts"], \
                    f"{where} {case}: collective counts {c['counts']} differ from the gloo mesh's {c['gloo_counts']}"
            shapes = {"mlp": {"w1.weight": (FF // tp, D), "w1.bias": (FF // tp,), "w2.weight": (D, FF // tp),
                              "w2.bias": (D,)},
                      "block_sp": {"attn.q.weight": (D // tp, D), "attn.o.weight": (D, D // tp),
                                   "mlp.w1.weight": (FF // tp, D), "out.weight": (VOCAB // tp, D),
                                   "out.bias": (VOCAB // tp,), "ln1.weight": (D,)}}
            for case, want in shapes.items():
                got = {n: res[case]["shapes"][n] for n in want}
                assert got == want, f"{where} {case}: local parameter shapes {got}, expected {want}"
            # the logits reached the loss as a vocabulary-sharded DTensor (Shard on the last of (batch, seq, vocab))
            assert res["block_sp"]["placements"] == [("Shard", 2)], res["block_sp"]["placements"]
