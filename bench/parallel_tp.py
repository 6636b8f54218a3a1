"""Tensor-parallel transformer-block step time: plait.parallel layers vs torch's DTensor TP, on plait and on gloo.

One run, ``--tp`` ranks (default 2), one thread each, float32 on CPU. Every configuration trains the same
pre-LayerNorm GPT block (fused QKV stored head by head, causal attention, GELU MLP; activations
``[seq, batch, hidden]``) from the same weights: forward, mean-square loss, backward, SGD step.

Rows (``TP``: tensor parallel; ``SP``: plus sequence parallelism, the sequence dimension sharded outside the
attention / MLP regions):

- dense block on one rank (reference; every rank runs it at the same time on its own core, no communication);
- DTensor: ``parallelize_module`` with ``ColwiseParallel`` (qkv, fc1) / ``RowwiseParallel`` (proj, fc2), and for
  SP ``SequenceParallel`` LayerNorms with Shard(0) input / output layouts, on a gloo mesh and on a plait mesh (both
  built in the same processes: the default group is plait, the gloo mesh uses ``backend_override``);
- plait.parallel: the same block written with ``ColumnParallelLinear`` / ``RowParallelLinear`` (defined below), on a
  plait group and on a gloo group, and ``plait.parallel.blocks.ParallelTransformerBlock`` (TP and SP) where available.

Timing: a barrier (gloo) before every step; a step's time is the slowest rank's; the table shows the median over
``--rounds`` x ``--steps`` steps after ``--warmup`` warm-up steps per configuration, configurations interleaved
round by round so that load drift affects them alike. The first step's loss of every row is checked against the
dense block's (relative difference printed; float32).

    python bench/parallel_tp.py                        # hidden 512, seq 128, batch 4, 4 heads, TP 2
    python bench/parallel_tp.py --steps 3 --rounds 10 --hidden 512 --seq 128 --batch 4 --heads 4
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------ model definitions


def attention(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Causal self-attention over a fused ``[seq, batch, heads * 3 * head_dim]`` projection stored head by head; the
    head count comes from the width, so a column shard of whole heads works unchanged."""
    s, b, _ = qkv.shape
    q, k, v = qkv.view(s, b, -1, 3, head_dim).permute(3, 1, 2, 0, 4).unbind(0)  # each [b, heads, s, d]
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.permute(2, 0, 1, 3).reshape(s, b, -1)


class Block(nn.Module):
    """Dense pre-LayerNorm GPT block; DTensor parallelises this module in place."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.head_dim = hidden // heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x):
        x = x + self.proj(attention(self.qkv(self.ln1(x)), self.head_dim))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlaitTPBlock(nn.Module):
    """The same block with plait.parallel's Megatron layers (tensor parallel, no sequence parallelism): QKV and fc1
    column-parallel (whole heads per rank), proj and fc2 row-parallel; LayerNorms replicated (their inputs are
    replicated, so their gradients are identical on every rank without communication)."""

    def __init__(self, dense: Block, group):
        from plait.parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        d = dense.head_dim
        self.head_dim = d
        self.ln1, self.ln2 = copy.deepcopy(dense.ln1), copy.deepcopy(dense.ln2)
        self.qkv = ColumnParallelLinear.from_dense(dense.qkv, group, shard_unit=3 * d)
        self.proj = RowParallelLinear.from_dense(dense.proj, group, shard_unit=d)
        self.fc1 = ColumnParallelLinear.from_dense(dense.fc1, group)
        self.fc2 = RowParallelLinear.from_dense(dense.fc2, group)

    def forward(self, x):
        x = x + self.proj(attention(self.qkv(self.ln1(x)), self.head_dim))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def dtensor_block(dense: Block, mesh, sp: bool):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    if sp:
        plan = {
            "ln1": SequenceParallel(sequence_dim=0),
            "qkv": ColwiseParallel(input_layouts=Shard(0)),
            "proj": RowwiseParallel(output_layouts=Shard(0)),
            "ln2": SequenceParallel(sequence_dim=0),
            "fc1": ColwiseParallel(input_layouts=Shard(0)),
            "fc2": RowwiseParallel(output_layouts=Shard(0)),
        }
    else:
        plan = {"qkv": ColwiseParallel(), "proj": RowwiseParallel(), "fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    return parallelize_module(copy.deepcopy(dense), mesh, plan)


# ------------------------------------------------------------------------------------------------ worker


def worker(rank, world, path, a, out):
    torch.set_num_threads(1)
    import plait  # noqa: F401  (registers the backend)
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("plait", init_method=f"file://{path}", rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")
    plait_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    gloo_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",), backend_override={"tp": "gloo"})
    assert dist.get_backend(plait_mesh.get_group()) == "plait" and dist.get_backend(gloo_mesh.get_group()) == "gloo"

    torch.manual_seed(0)
    dense = Block(a.hidden, a.heads, 4 * a.hidden)
    x_full = torch.randn(a.seq, a.batch, a.hidden, generator=torch.Generator().manual_seed(1))
    x_sp = x_full.chunk(world, dim=0)[rank].contiguous()
    numel = x_full.numel()

    # name -> (module, input, sp, n_ranks_computing)
    configs = {"dense block, 1 rank (no TP)": (copy.deepcopy(dense), x_full, False)}
    configs["DTensor TP, gloo mesh"] = (dtensor_block(dense, gloo_mesh, False), x_full, False)
    configs["DTensor TP, plait mesh"] = (dtensor_block(dense, plait_mesh, False), x_full, False)
    missing = []
    try:
        import plait.parallel.layers  # noqa: F401
        configs["plait.parallel layers TP, gloo group"] = (PlaitTPBlock(dense, gloo), x_full, False)
        configs["plait.parallel layers TP, plait group"] = (PlaitTPBlock(dense, plait_mesh), x_full, False)
    except ImportError as e:
        missing.append(f"plait.parallel not available yet ({e})")
    blocks = None
    try:
        from plait.parallel import blocks
    except ImportError as e:
        missing.append(f"plait.parallel.blocks not available yet ({e})")

    def plait_block(sp, group):
        ref = blocks.TransformerBlock(a.hidden, a.heads, 4 * a.hidden)
        ref.load_state_dict({k: v for k, v in dense.state_dict().items()}, strict=True)
        return blocks.ParallelTransformerBlock.from_dense(ref, group, sequence_parallel=sp)

    if blocks is not None:
        configs["plait.parallel.blocks TP, plait group"] = (plait_block(False, plait_mesh), x_full, False)
    configs["DTensor TP+SP, gloo mesh"] = (dtensor_block(dense, gloo_mesh, True), x_sp, True)
    configs["DTensor TP+SP, plait mesh"] = (dtensor_block(dense, plait_mesh, True), x_sp, True)
    if blocks is not None:
        configs["plait.parallel.blocks TP+SP, gloo group"] = (plait_block(True, gloo), x_sp, True)
        configs["plait.parallel.blocks TP+SP, plait group"] = (plait_block(True, plait_mesh), x_sp, True)

    opts = {name: torch.optim.SGD(m.parameters(), lr=a.lr) for name, (m, _, _) in configs.items()}

    def step(name):
        model, x, sp = configs[name]
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        y = model(x)
        # mean square over the full output; with SP each rank holds a sequence chunk, whose sum is its share
        loss = (y * y).sum() / numel if sp else (y * y).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    first_loss = {}
    times = {name: [] for name in configs}
    for rnd in range(a.rounds):
        for name in configs:
            for i in range(a.warmup if rnd == 0 else 1):
                loss = step(name)
                if rnd == 0 and i == 0:
                    if configs[name][2]:
                        dist.all_reduce(loss, group=gloo)
                    first_loss[name] = loss.item()
            for _ in range(a.steps):
                dist.barrier(group=gloo)
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
    # per step, the slowest rank
    for name in configs:
        t = torch.tensor(times[name], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=gloo)
        times[name] = t.tolist()
    if rank == 0:
        out["missing"] = missing
        out["rows"] = [(name, statistics.median(times[name]) * 1e3, first_loss[name]) for name in configs]
    dist.barrier(group=gloo)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mgr = mp.Manager()
        out = mgr.dict()
        mp.start_processes(worker, args=(a.tp, os.path.join(d, "store"), a, out), nprocs=a.tp, start_method="spawn")
        rows, missing = out["rows"], out["missing"]
    print(f"# transformer block step (forward, mean-square loss, backward, SGD), float32 CPU, TP {a.tp}, one thread "
          f"per rank; hidden {a.hidden}, heads {a.heads}, ffn {4 * a.hidden}, seq {a.seq}, batch {a.batch}; median of "
          f"{a.rounds} x {a.steps} steps (slowest rank per step)")
    for m in missing:
        print(f"# {m}")
    times = {name: ms for name, ms, _ in rows}
    ref_loss = rows[0][2]
    print("| config | median ms/step | vs DTensor on gloo (same TP/SP) | vs DTensor on the same backend (same TP/SP) "
          "| first loss (rel. diff vs dense) |")
    print("|---|---:|---:|---:|---:|")
    for name, ms, loss in rows:
        kind = "DTensor TP+SP" if "+SP" in name else "DTensor TP"
        base = times.get(f"{kind}, gloo mesh")
        same = times.get(f"{kind}, plait mesh" if name.endswith(("plait mesh", "plait group")) else
                         f"{kind}, gloo mesh" if name.endswith(("gloo mesh", "gloo group")) else "")
        ratio = f"{ms / base:.2f}x" if base else "-"
        ratio_same = f"{ms / same:.2f}x" if same else "-"
        print(f"| {name} | {ms:.1f} | {ratio} | {ratio_same} | {loss:.9g} ({abs(loss - ref_loss) / abs(ref_loss):.1e}) |")

if __name__ == "__main__":
    sys.exit(main())
