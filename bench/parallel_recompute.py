"""Saved-activation bytes of a transformer block with and without recomputation (plait.parallel.recompute).

    python bench/parallel_recompute.py            # the example's block and a larger one, TP 1 and 2, SP off / on

Counts, on one rank, the activation bytes autograd keeps for backward during one block's forward
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, the block's own parameters excluded: autograd saves
the weights a matmul needs, but they exist anyway; device independent) and, with recomputation, the
bytes of the forward collectives' recorded results that the recomputation replays (``replay_bytes()``). The block
input is counted in both (the checkpoint keeps it). Also checks that the recomputed block's gradients are bitwise
those of the plain block. No timing: bytes are exact and the same on every run.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [  # name, hidden, heads, seq, batch
    ("example block (h64, 4 heads, seq 64, micro-batch 1)", 64, 4, 64, 1),
    ("h512, 8 heads, seq 256, batch 4", 512, 8, 256, 4),
]


def measure(tp_group, hidden, heads, seq, batch, sp, recompute):
    from plait.parallel import ParallelTransformerBlock, SavedTensorMeter
    from plait.parallel.recompute import replay_bytes, reset_replay_stats

    tp = dist.get_world_size(tp_group)
    r = dist.get_rank(tp_group)
    torch.manual_seed(0)
    blk = ParallelTransformerBlock(hidden, heads, group=tp_group, sequence_parallel=sp, recompute=recompute)
    x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(1))
    if sp:
        x = torch.chunk(x, tp, 0)[r].clone()
    x.requires_grad_()
    reset_replay_stats()
    with SavedTensorMeter(exclude=blk.parameters()) as m:  # activations only (weights exist anyway)
        y = blk(x)
    saved, replay = m.nbytes, replay_bytes()
    y.square().sum().backward()
    return saved, replay, [p.grad.clone() for p in blk.parameters()] + [x.grad.clone()]


def worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import plait  # noqa: F401

    torch.set_num_threads(1)
    dist.init_process_group("plait", rank=rank, world_size=world)
    rows = []
    solo = [dist.new_group([i]) for i in range(world)][rank]
    for name, h, heads, seq, b in CONFIGS:
        for tp, g in ((1, solo), (2, dist.group.WORLD)):
            for sp in ((False,) if tp == 1 else (False, True)):
                s0, _, g0 = measure(g, h, heads, seq, b, sp, False)
                s1, r1, g1 = measure(g, h, heads, seq, b, sp, True)
                same = all(torch.equal(a, c) for a, c in zip(g0, g1))
                rows.append((name, tp, sp, s0, s1, r1, same))
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    rows = q.get()
    for p in procs:
        p.join()
    print("| block | TP | SP | saved, no recompute | saved with recompute (autograd + replayed) | ratio | grads bitwise equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    kib = lambda n: f"{n / 1024:,.1f} KiB"  # noqa: E731
    for name, tp, sp, s0, s1, r1, same in rows:
        print(f"| {name} | {tp} | {'on' if sp else 'off'} | {kib(s0)} | {kib(s1 + r1)} ({kib(s1)} + {kib(r1)}) | "
              f"{s0 / (s1 + r1):.1f}x less | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
