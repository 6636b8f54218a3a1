"""plait.parallel mappings, tensor-parallel layers, blocks and recomputation: parity with the dense modules.

One 4-rank launch builds TP groups of 2 ({0,1}, {2,3}), 3 ({0,1,2}; uneven splits) and 4, and for each, with and
without sequence parallelism, checks forward output, input gradient, weight gradients and weights after an SGD step
against the dense module computed in the same process (float64: relative error <= 1e-12; float32: <= 1e-6), and that
a second run gives bitwise identical results. The parent asserts on the returned error tables, so a failure names the
case.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import _harness as H

TOL = {"float64": 1e-12, "float32": 1e-6}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _groups(rank, world):
    """{tp: (group or None, rank in group)} for TP 2, 3 and 4; every rank joins every new_group call."""
    out = {}
    g01, g23 = dist.new_group([0, 1]), dist.new_group([2, 3])
    out[2] = g01 if rank < 2 else g23
    g3 = dist.new_group([0, 1, 2])
    out[3] = g3 if rank < 3 else None
    out[4] = dist.new_group([0, 1, 2, 3])
    return out


def _chunk(t, tp, r, dim):
    return torch.chunk(t, tp, dim)[r]


def _mlp_case(g, tp, r, sp, dtype, seq, batch, h, f, dev="cpu"):
    """Column -> GELU -> Row against the dense pair; returns {quantity: rel err} and the tensors (for bitwise)."""
    from plait.parallel import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(7)
    d1, d2 = nn.Linear(h, f, dtype=dtype), nn.Linear(f, h, dtype=dtype)
    torch.manual_seed(7)
    c = ColumnParallelLinear(h, f, group=g, sequence_parallel=sp, dtype=dtype).to(dev)
    rw = RowParallelLinear(f, h, group=g, sequence_parallel=sp, dtype=dtype).to(dev)
    d1, d2 = d1.to(dev), d2.to(dev)
    errs = {"init_col_w": _rel(c.weight, _chunk(d1.weight, tp, r, 0)),
            "init_row_w": _rel(rw.weight, _chunk(d2.weight, tp, r, 1)),
            "init_row_b": _rel(rw.bias, d2.bias)}
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(seq, batch, h, generator=gen, dtype=dtype).to(dev)
    gy = torch.randn(seq, batch, h, generator=gen, dtype=dtype).to(dev)
    xd = x.clone().requires_grad_()
    yd = d2(F.gelu(d1(xd)))
    yd.backward(gy)
    xl = (_chunk(x, tp, r, 0) if sp else x).clone().requires_grad_()
    yl = rw(F.gelu(c(xl, seq)), seq)
    yl.backward(_chunk(gy, tp, r, 0) if sp else gy)
    errs["out"] = _rel(yl, _chunk(yd, tp, r, 0) if sp else yd)
    errs["grad_x"] = _rel(xl.grad, _chunk(xd.grad, tp, r, 0) if sp else xd.grad)
    errs["grad_col_w"] = _rel(c.weight.grad, _chunk(d1.weight.grad, tp, r, 0))
    errs["grad_col_b"] = _rel(c.bias.grad, _chunk(d1.bias.grad, tp, r, 0))
    errs["grad_row_w"] = _rel(rw.weight.grad, _chunk(d2.weight.grad, tp, r, 1))
    errs["grad_row_b"] = _rel(rw.bias.grad, d2.bias.grad)
    for mods in ((d1, d2), (c, rw)):
        opt = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=0.1)
        opt.step()
    errs["step_col_w"] = _rel(c.weight, _chunk(d1.weight, tp, r, 0))
    errs["step_row_w"] = _rel(rw.weight, _chunk(d2.weight, tp, r, 1))
    errs["step_row_b"] = _rel(rw.bias, d2.bias)
    # to_dense gathers the stepped weights back
    errs["to_dense_col"] = _rel(c.to_dense().weight, d1.weight)
    errs["to_dense_row"] = _rel(rw.to_dense().weight, d2.weight)
    return errs, [yl.detach(), xl.grad, c.weight.grad, rw.weight.grad, rw.bias.grad]


def _gather_scatter_case(g, tp, r, dtype):
    """ColumnParallelLinear(gather_output=True) followed by RowParallelLinear(input_is_parallel=False)."""
    from plait.parallel import ColumnParallelLinear, RowParallelLinear

    h, f = 6, 10
    torch.manual_seed(3)
    d1, d2 = nn.Linear(h, f, dtype=dtype), nn.Linear(f, h, bias=False, dtype=dtype)
    c = ColumnParallelLinear.from_dense(d1, g, gather_output=True)
    rw = RowParallelLinear.from_dense(d2, g, input_is_parallel=False)
    x = torch.randn(4, 3, h, generator=torch.Generator().manual_seed(5), dtype=dtype)
    xd, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    mid_d = d1(xd)
    yd = d2(mid_d.tanh())
    yd.sum().backward()
    mid_l = c(xl)
    yl = rw(mid_l.tanh())
    yl.sum().backward()
    # gather_output with a shard_unit whose split differs from torch.chunk(out_features) (10 by 2 over 2: [6, 4])
    if tp == 4:  # 5 units do not split over 4 ranks
        return {"gathered": _rel(c(x), d1(x)), "out": _rel(yl, yd), "grad_x": _rel(xl.grad, xd.grad)}
    d1u = nn.Linear(h, f, dtype=dtype)
    d1u.load_state_dict(d1.state_dict())
    cu = ColumnParallelLinear.from_dense(d1u, g, gather_output=True, shard_unit=2)
    xu = x.clone().requires_grad_()
    cu(xu).tanh().sum().backward()
    xd2 = x.clone().requires_grad_()
    d1u(xd2).tanh().sum().backward()
    units = torch.chunk(torch.arange(f).view(-1, 2), tp, 0)[r].reshape(-1)
    extra = {"unit_grad_x": _rel(xu.grad, xd2.grad), "unit_grad_w": _rel(cu.weight.grad, d1u.weight.grad[units])}
    return {**extra, "gathered": _rel(mid_l, mid_d), "out": _rel(yl, yd), "grad_x": _rel(xl.grad, xd.grad),
            "grad_col_w": _rel(c.weight.grad, _chunk(d1.weight.grad, tp, r, 0)),
            "grad_row_w": _rel(rw.weight.grad, _chunk(d2.weight.grad, tp, r, 1))}


def _vocab_case(g, tp, r, dtype):
    from plait.parallel import ColumnParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy

    vocab, h = 11, 6  # torch.chunk(range(11), 3) = [4, 4, 3]; by 4: [3, 3, 3, 2]
    torch.manual_seed(9)
    de, dh = nn.Embedding(vocab, h, dtype=dtype), nn.Linear(h, vocab, dtype=dtype)
    torch.manual_seed(9)
    pe = VocabParallelEmbedding(vocab, h, group=g, dtype=dtype)
    ph = ColumnParallelLinear(h, vocab, group=g, dtype=dtype)
    errs = {"init_emb": _rel(pe.weight, _chunk(de.weight, tp, r, 0)),
            "init_head": _rel(ph.weight, _chunk(dh.weight, tp, r, 0))}
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(0, vocab, (5, 3), generator=gen)
    target = torch.randint(0, vocab, (5, 3), generator=gen)
    target[0, 0] = -100
    target[2, 1] = 7
    target[3, 2] = -100
    for ls in (0.0, 0.1):
        for p in list(de.parameters()) + list(dh.parameters()) + list(pe.parameters()) + list(ph.parameters()):
            p.grad = None
        ld = F.cross_entropy(dh(de(ids)).reshape(-1, vocab), target.reshape(-1), ignore_index=-100,
                             label_smoothing=ls)
        ld.backward()
        logits = ph(pe(ids))
        ll = vocab_parallel_cross_entropy(logits, target, group=g, ignore_index=-100, label_smoothing=ls)
        ll.backward()
        errs[f"loss_ls{ls}"] = _rel(ll, ld)
        errs[f"grad_emb_ls{ls}"] = _rel(pe.weight.grad, _chunk(de.weight.grad, tp, r, 0))
        errs[f"grad_head_ls{ls}"] = _rel(ph.weight.grad, _chunk(dh.weight.grad, tp, r, 0))
        # explicit vocab_size gives the same
        ll2 = vocab_parallel_cross_entropy(logits.detach(), target, group=g, label_smoothing=ls, vocab_size=vocab)
        errs[f"loss_vocab_size_ls{ls}"] = _rel(ll2, ld)
    errs["to_dense_emb"] = _rel(pe.to_dense().weight, de.weight)
    # every target ignored: NaN loss (as F.cross_entropy) and zero gradient (as F.cross_entropy), not NaN
    lg = logits.detach().clone().requires_grad_()
    ll = vocab_parallel_cross_entropy(lg, torch.full_like(target, -100), group=g)
    ll.backward()
    errs["all_ignored"] = 0.0 if (torch.isnan(ll) and torch.equal(lg.grad, torch.zeros_like(lg))) else 1.0
    # out-of-range ids and targets raise (dense raises IndexError too); every rank sees the same ids
    for label, fn in {"bad_id": lambda: pe(torch.tensor([[1, vocab]])),
                      "bad_target": lambda: vocab_parallel_cross_entropy(logits.detach(), target.clamp(0) + vocab,
                                                                         group=g)}.items():
        try:
            fn()
            errs[label] = 1.0
        except IndexError as e:
            errs[label] = 0.0 if ("out of" in str(e) and f"rank {r} of a group of {tp}" in str(e)) else 1.0
    return errs


def _block_case(g, tp, r, sp, dtype, recompute, dev="cpu"):
    from plait.parallel import ParallelTransformerBlock, TransformerBlock

    seq, batch, h, heads = 7, 2, 16, 8  # 7 positions: uneven sequence chunks at TP 2, 3 and 4
    torch.manual_seed(5)
    dense = TransformerBlock(h, heads, dtype=dtype)
    torch.manual_seed(5)
    par = ParallelTransformerBlock(h, heads, group=g, sequence_parallel=sp, recompute=recompute, dtype=dtype).to(dev)
    dense = dense.to(dev)
    errs = {"init_qkv": _rel(par.qkv.weight, torch.cat([c for i, c in enumerate(
        torch.chunk(dense.qkv.weight.view(heads, -1, h), tp, 0)) if i == r]).reshape(-1, h))}
    x = torch.randn(seq, batch, h, generator=torch.Generator().manual_seed(2), dtype=dtype).to(dev)
    gy = torch.randn(seq, batch, h, generator=torch.Generator().manual_seed(3), dtype=dtype).to(dev)
    xd = x.clone().requires_grad_()
    yd = dense(xd)
    yd.backward(gy)
    xl = (_chunk(x, tp, r, 0) if sp else x).clone().requires_grad_()
    yl = par(xl, seq)
    yl.backward(_chunk(gy, tp, r, 0) if sp else gy)
    errs["out"] = _rel(yl, _chunk(yd, tp, r, 0) if sp else yd)
    errs["grad_x"] = _rel(xl.grad, _chunk(xd.grad, tp, r, 0) if sp else xd.grad)
    errs["grad_ln1_w"] = _rel(par.ln1.weight.grad, dense.ln1.weight.grad)
    errs["grad_ln2_b"] = _rel(par.ln2.bias.grad, dense.ln2.bias.grad)
    errs["grad_fc2_b"] = _rel(par.fc2.bias.grad, dense.fc2.bias.grad)
    errs["grad_fc1_w"] = _rel(par.fc1.weight.grad, _chunk(dense.fc1.weight.grad, tp, r, 0))
    errs["grad_proj_w"] = _rel(par.proj.weight.grad, torch.chunk(dense.proj.weight.grad.view(h, heads, -1), tp, 1)[r].reshape(h, -1))
    errs["grad_qkv_w"] = _rel(par.qkv.weight.grad, torch.chunk(dense.qkv.weight.grad.view(heads, -1, h), tp, 0)[r].reshape(-1, h))
    errs["grad_qkv_b"] = _rel(par.qkv.bias.grad, torch.chunk(dense.qkv.bias.grad.view(heads, -1), tp, 0)[r].reshape(-1))
    errs["grad_proj_b"] = _rel(par.proj.bias.grad, dense.proj.bias.grad)
    errs["grad_fc1_b"] = _rel(par.fc1.bias.grad, _chunk(dense.fc1.bias.grad, tp, r, 0))
    errs["grad_fc2_w"] = _rel(par.fc2.weight.grad, _chunk(dense.fc2.weight.grad, tp, r, 1))
    errs["grad_ln1_b"] = _rel(par.ln1.bias.grad, dense.ln1.bias.grad)
    errs["grad_ln2_w"] = _rel(par.ln2.weight.grad, dense.ln2.weight.grad)
    grads = [p.grad.clone() for p in par.parameters()]
    for m in (dense, par):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    back = par.to_dense()  # the weights after the step, gathered
    for name, p in dense.named_parameters():
        errs[f"to_dense_{name}"] = _rel(dict(back.named_parameters())[name], p)
    return errs, [yl.detach(), xl.grad] + grads


def _w_parity(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    groups = _groups(rank, world)
    out = {}
    for tp, g in groups.items():
        if g is None:
            continue
        r = dist.get_rank(g)
        for sp in (False, True):
            e1, t1 = _mlp_case(g, tp, r, sp, dtype, seq=7, batch=2, h=6, f=10)
            e2, t2 = _mlp_case(g, tp, r, sp, dtype, seq=7, batch=2, h=6, f=10)
            e1["bitwise_rerun"] = 0.0 if all(torch.equal(a, b) for a, b in zip(t1, t2)) else 1.0
            out[f"mlp tp{tp} sp{sp}"] = e1
            for rc in (False, True):
                eb, tb = _block_case(g, tp, r, sp, dtype, rc)
                eb2, tb2 = _block_case(g, tp, r, sp, dtype, rc)
                eb["bitwise_rerun"] = 0.0 if all(torch.equal(a, b) for a, b in zip(tb, tb2)) else 1.0
                out[f"block tp{tp} sp{sp} recompute{rc}"] = eb
        out[f"gather/scatter tp{tp}"] = _gather_scatter_case(g, tp, r, dtype)
        out[f"vocab tp{tp}"] = _vocab_case(g, tp, r, dtype)
    return out


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_layers_match_dense(dtype_name):
    res = H.run_world(_w_parity, 4, dtype_name, timeout_s=300)
    tol = TOL[dtype_name]
    bad = []
    ncases = 0
    for rank, table in enumerate(res):
        for case, errs in table.items():
            for k, v in errs.items():
                ncases += 1
                if not v <= tol:
                    bad.append(f"rank {rank} {case} {k}: {v:.3g}")
    assert ncases > 300
    assert not bad, "\n".join(bad)


def _w_parity_cuda(rank, world):
    """TP 2 over two processes sharing cuda:0 (or one GPU each when there are two)."""
    dev = f"cuda:{rank % torch.cuda.device_count()}"
    torch.cuda.set_device(dev)
    out = {}
    g = dist.group.WORLD
    for sp in (False, True):
        e, _ = _mlp_case(g, 2, rank, sp, torch.float64, seq=7, batch=2, h=6, f=10, dev=dev)
        out[f"mlp sp{sp}"] = e
        for rc in (False, True):
            e, _ = _block_case(g, 2, rank, sp, torch.float64, rc, dev=dev)
            out[f"block sp{sp} recompute{rc}"] = e
    return out


@pytest.mark.gpu
def test_layers_match_dense_cuda():
    res = H.run_world(_w_parity_cuda, 2, timeout_s=300)
    bad = [f"rank {r} {case} {k}: {v:.3g}" for r, t in enumerate(res) for case, errs in t.items()
           for k, v in errs.items() if not v <= 1e-12]
    assert len(res[0]) == 6 and not bad, "\n".join(bad)


def _w_mappings(rank, world):
    """Each mapping's forward and backward against its definition, on integer-valued float64 data (exact)."""
    from plait.parallel import mappings as M

    groups = _groups(rank, world)
    out = {}
    for tp, g in groups.items():
        if g is None:
            continue
        r = dist.get_rank(g)
        ranks = [dist.get_global_rank(g, i) for i in range(tp)]
        n0, n1 = 7, 10  # uneven at every TP size

        def full(seed):  # the same "full" tensor on every rank; rank-specific data below
            return torch.arange(n0 * n1, dtype=torch.float64).reshape(n0, n1) * (seed + 1)

        res = {}
        # copy_to_region: identity; grad summed over the group
        x = full(0).requires_grad_()
        y = M.copy_to_region(x, g)
        y.backward(torch.full_like(y, float(r + 1)))
        res["copy fwd"] = torch.equal(y, full(0))
        res["copy bwd"] = torch.equal(x.grad, torch.full_like(x, float(sum(range(1, tp + 1)))))
        # reduce_from_region: sum; grad identity
        x = (full(0) * (r + 1)).requires_grad_()
        y = M.reduce_from_region(x, g)
        y.backward(full(1))
        res["reduce fwd"] = torch.equal(y, full(0) * sum(range(1, tp + 1)))
        res["reduce bwd"] = torch.equal(x.grad, full(1))
        # scatter / gather along the last dim (uneven: 10 over 3 = 4, 4, 2; over 4 = 3, 3, 3, 1)
        x = full(0).requires_grad_()
        y = M.scatter_to_region(x, g)
        res["scatter fwd"] = torch.equal(y, torch.chunk(full(0), tp, -1)[r])
        y.backward(torch.ones_like(y) * (r + 1))
        exp = torch.cat([torch.ones_like(c) * (i + 1) for i, c in enumerate(torch.chunk(full(0), tp, -1))], -1)
        res["scatter bwd"] = torch.equal(x.grad, exp)
        part = torch.chunk(full(2), tp, -1)[r].clone().requires_grad_()
        y = M.gather_from_region(part, g, full_size=n1)
        res["gather fwd"] = torch.equal(y, full(2))
        y.backward(full(3))
        res["gather bwd"] = torch.equal(part.grad, torch.chunk(full(3), tp, -1)[r])
        # sequence: scatter / gather / reduce-scatter along the first dim (7 over 3 = 3, 3, 1; over 4 = 2, 2, 2, 1)
        x = full(0).requires_grad_()
        y = M.scatter_to_sequence_region(x, g)
        res["seq scatter fwd"] = torch.equal(y, torch.chunk(full(0), tp, 0)[r])
        y.backward(torch.ones_like(y) * (r + 1))
        exp = torch.cat([torch.ones_like(c) * (i + 1) for i, c in enumerate(torch.chunk(full(0), tp, 0))], 0)
        res["seq scatter bwd"] = torch.equal(x.grad, exp)
        part = torch.chunk(full(1), tp, 0)[r].clone().requires_grad_()
        y = M.gather_from_sequence_region(part, g, full_size=n0)
        res["seq gather fwd"] = torch.equal(y, full(1))
        y.backward(full(0) * (r + 1))  # reduce-scattered: sum over ranks of (r+1) * full(0), this rank's chunk
        res["seq gather bwd"] = torch.equal(part.grad, torch.chunk(full(0) * sum(range(1, tp + 1)), tp, 0)[r])
        x = (full(0) * (r + 1)).requires_grad_()
        y = M.reduce_scatter_to_sequence(x, g)
        res["rs fwd"] = torch.equal(y, torch.chunk(full(0) * sum(range(1, tp + 1)), tp, 0)[r])
        y.backward(torch.chunk(full(4), tp, 0)[r])
        res["rs bwd"] = torch.equal(x.grad, full(4))
        # all_to_all: [seq_local, heads, d] sequence-sharded -> [seq, heads_local, d] head-sharded, and back
        heads, d = 2 * tp - 1, 3
        seq_full = torch.arange(n0 * heads * d, dtype=torch.float64).reshape(n0, heads, d)
        loc = torch.chunk(seq_full, tp, 0)[r].clone().requires_grad_()
        y = M.all_to_all(loc, g, scatter_dim=1, gather_dim=0, gather_full_size=n0)
        res["a2a fwd"] = torch.equal(y, torch.chunk(seq_full, tp, 1)[r])
        gfull = seq_full * 10 + 1
        y.backward(torch.chunk(gfull, tp, 1)[r])
        res["a2a bwd"] = torch.equal(loc.grad, torch.chunk(gfull, tp, 0)[r])
        back = M.all_to_all(y.detach(), g, scatter_dim=0, gather_dim=1, gather_full_size=heads)  # heads -> sequence
        res["a2a inverse"] = torch.equal(back, loc.detach())
        out[f"tp{tp} ranks {ranks}"] = res
    # errors: a size torch.chunk cannot split, a shard of the wrong size
    errs = {}
    for label, fn in {
        "chunk": lambda: M.scatter_to_region(torch.zeros(2, 5), groups[4]),
        "gather size": lambda: M.gather_from_region(torch.zeros(2, 9), groups[4], full_size=10),
    }.items():
        try:
            fn()
            errs[label] = "no error"
        except ValueError as e:
            errs[label] = str(e)
    out["errors"] = errs
    return out


def test_mappings_exact():
    res = H.run_world(_w_mappings, 4, timeout_s=240)
    for rank, table in enumerate(res):
        errs = table.pop("errors")
        assert "torch.chunk gives 3 chunks" in errs["chunk"], errs
        assert f"rank {rank} holds 9" in errs["gather size"], errs
        assert len(table) == (3 if rank < 3 else 2)
        for case, checks in table.items():
            failed = [k for k, ok in checks.items() if not ok]
            assert not failed, f"rank {rank} {case}: {failed}"
            assert len(checks) == 17


def _w_errors(rank, world):
    from plait.parallel import (ColumnParallelLinear, ParallelTransformerBlock, RowParallelLinear,
                                vocab_parallel_cross_entropy)

    msgs = {}

    def expect(label, fn, exc=ValueError):
        try:
            fn()
            msgs[label] = "no error"
        except exc as e:
            msgs[label] = f"{type(e).__name__}: {e}"

    g = dist.group.WORLD
    expect("col features", lambda: ColumnParallelLinear(4, 5, group=g))  # torch.chunk(range(5), 4): 3 chunks
    expect("row features", lambda: RowParallelLinear(3, 4, group=g))  # 3 < 4 ranks
    expect("heads", lambda: ParallelTransformerBlock(24, 6, group=g))  # torch.chunk(range(6), 4): 3 chunks
    col = ColumnParallelLinear(6, 8, group=g)
    row = RowParallelLinear(8, 6, group=g)
    expect("col input", lambda: col(torch.zeros(2, 5)))
    expect("row input", lambda: row(torch.zeros(2, 3)))
    expect("ce target", lambda: vocab_parallel_cross_entropy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long)))
    expect("ce vocab", lambda: vocab_parallel_cross_entropy(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long),
                                                          vocab_size=10))
    expect("group type", lambda: ColumnParallelLinear(6, 8, group="tp"), TypeError)
    # uneven vocab shards without vocab_size are detected (widths gathered), not guessed
    width = [3, 3, 3, 2][rank]
    expect("ce uneven widths ok", lambda: vocab_parallel_cross_entropy(
        torch.zeros(3, width, dtype=torch.float64), torch.zeros(3, dtype=torch.long)))
    bad_width = 2 if rank == 0 else 3
    expect("ce bad widths", lambda: vocab_parallel_cross_entropy(
        torch.zeros(3, bad_width, dtype=torch.float64), torch.zeros(3, dtype=torch.long)))
    return msgs


def test_errors_name_layer_rank_sizes():
    res = H.run_world(_w_errors, 4, timeout_s=120)
    for rank, m in enumerate(res):
        assert "ColumnParallelLinear(4, 5) on rank" in m["col features"] and "3 chunks" in m["col features"], m
        assert "RowParallelLinear(3, 4)" in m["row features"] and "smaller than the group size 4" in m["row features"]
        assert "ParallelTransformerBlock on rank" in m["heads"] and "heads 6" in m["heads"], m
        assert f"ColumnParallelLinear(6, 8) on rank {rank} of a group of 4: input has 5 features" in m["col input"]
        assert f"RowParallelLinear(8, 6) on rank {rank}" in m["row input"] and "is 2" in m["row input"], m
        assert "target shape (4,)" in m["ce target"], m
        assert "split of vocab_size 10 gives" in m["ce vocab"], m
        assert m["group type"].startswith("TypeError"), m
        assert m["ce uneven widths ok"] == "no error", m
        assert "widths [2, 3, 3, 3], not the torch.chunk split of 11 ([3, 3, 3, 2])" in m["ce bad widths"], m


def _w_recompute(rank, world):
    """Recomputation replays the forward collectives: count collectives and saved bytes with and without it."""
    from plait.parallel import ParallelTransformerBlock
    from plait.parallel.recompute import SavedTensorMeter, replay_bytes, reset_replay_stats
    import plait.parallel.mappings as M

    calls = []
    orig = {n: getattr(dist, n) for n in ("all_reduce", "all_gather_single", "all_gather", "reduce_scatter_single",
                                          "reduce_scatter")}

    def counting(name):
        def f(*a, **k):
            calls.append(name)
            return orig[name](*a, **k)
        return f

    res = {}
    for sp in (False, True):
        for rc in (False, True):
            torch.manual_seed(1)
            blk = ParallelTransformerBlock(32, 4, sequence_parallel=sp, recompute=rc, dtype=torch.float32)
            x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(0))
            if sp:
                x = torch.chunk(x, world, 0)[rank].clone()
            x.requires_grad_()
            reset_replay_stats()
            for n in orig:
                setattr(dist, n, counting(n))
            M._all_gather_single, M._reduce_scatter_single = dist.all_gather_single, dist.reduce_scatter_single
            try:
                calls.clear()
                with SavedTensorMeter(exclude=blk.parameters()) as m:
                    y = blk(x)
                fwd = list(calls)
                saved, replay = m.nbytes, replay_bytes()
                calls.clear()
                y.sum().backward()
                bwd = list(calls)
            finally:
                for n, f in orig.items():
                    setattr(dist, n, f)
                M._all_gather_single, M._reduce_scatter_single = dist.all_gather_single, dist.reduce_scatter_single
            res[(sp, rc)] = dict(fwd=fwd, bwd=bwd, saved=saved, replay=replay,
                                 grad=[p.grad.clone() for p in blk.parameters()] + [x.grad.clone()])
    # a region that modifies a collective's result in place (h += x): the replay must give the collective's value
    from plait.parallel import ColumnParallelLinear, RowParallelLinear, checkpoint

    torch.manual_seed(3)
    col, row = ColumnParallelLinear(8, 12), RowParallelLinear(12, 8, bias=False)

    def region(x):
        h = row(F.gelu(col(x)))
        h += x
        return torch.tanh(h)

    grads = []
    for use_ckpt in (False, True):
        for p in list(col.parameters()) + list(row.parameters()):
            p.grad = None
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = checkpoint(region, x) if use_ckpt else region(x)
        y.square().sum().backward()
        grads.append([p.grad.clone() for p in list(col.parameters()) + list(row.parameters())] + [x.grad.clone()])
    res["inplace"] = all(torch.equal(a, b) for a, b in zip(*grads))
    return res


def test_recompute_replays_forward_collectives():
    res = H.run_world(_w_recompute, 2, timeout_s=120)
    for rank, r in enumerate(res):
        assert r.pop("inplace") is True, rank
        for sp in (False, True):
            plain, rc = r[(sp, False)], r[(sp, True)]
            # same forward collectives; the backward of the recomputed block issues exactly the plain backward's
            # collectives (the recomputation itself issues none)
            assert rc["fwd"] == plain["fwd"] and len(plain["fwd"]) >= 2, (sp, plain, rc)
            assert rc["bwd"] == plain["bwd"], (sp, plain["bwd"], rc["bwd"])
            # bitwise the same gradients
            assert all(torch.equal(a, b) for a, b in zip(plain["grad"], rc["grad"])), sp
            # far fewer bytes kept: autograd saves only the region's input (16 x 2 x 32 float32, SP: half of it);
            # the replayed collective results are counted too
            assert rc["saved"] == 16 * 2 * 32 * 4 // (2 if sp else 1) and rc["replay"] > 0, rc
            assert rc["saved"] + rc["replay"] < plain["saved"] / 2, (plain["saved"], rc["saved"], rc["replay"])
