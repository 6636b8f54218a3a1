"""Plain PyTorch DDP training, running on plait.

Existing DDP code switches to plait by importing it (which registers the ``plait`` backend with
``torch.distributed``) and changing one string:

    import plait                                  # registers the "plait" backend
    dist.init_process_group("plait")              # was: dist.init_process_group("gloo")

Everything else is stock PyTorch. Run it with torchrun (2 processes on this host):

    torchrun --standalone --nproc-per-node 2 examples/ddp_train.py
    torchrun --standalone --nproc-per-node 2 examples/ddp_train.py --backend gloo   # same script on Gloo

A small MLP is trained on synthetic regression data for 50 steps. Rank 0 prints the loss and, at the
end, a checksum of the parameters; the checksum is identical across ranks (checked) and, since the data
and initialisation are seeded, it is the same on plait and on Gloo up to float rounding.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="plait", help="plait (default) or gloo")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    if args.backend == "plait":
        import plait  # noqa: F401  registers the "plait" backend with torch.distributed

    torch.set_num_threads(1)  # ranks share the CPU cores
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    d_in, d_out = 32, 4
    model = nn.Sequential(nn.Linear(d_in, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, d_out))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.MSELoss()

    # Synthetic data: a fixed random teacher; each rank draws its own shard of the batch.
    teacher = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1000 + rank)

    t0 = time.perf_counter()
    for step in range(args.steps):
        x = torch.randn(args.batch, d_in, generator=gen)
        y = torch.tanh(x @ teacher)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        loss.backward()  # DDP all-reduces the gradients here, over the chosen backend
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step:3d}  loss {avg.item() / world:.6f}", flush=True)
    elapsed = time.perf_counter() - t0

    with torch.no_grad():
        flat = torch.cat([q.detach().reshape(-1).double() for q in model.parameters()])
        checksum = torch.stack([flat.sum(), flat.abs().sum()])
        spread = torch.cat([checksum, -checksum])  # max and -min across ranks in one all-reduce
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        same = torch.equal(spread[:2], -spread[2:])
    if rank == 0:
        print(f"backend {args.backend}  world {world}  {args.steps} steps in {elapsed:.2f} s")
        print(f"param checksum sum={checksum[0].item():.10f} abs={checksum[1].item():.10f}  "
              f"identical across ranks: {same}")
        if not same:
            raise SystemExit("parameters diverged across ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
