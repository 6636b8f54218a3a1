"""Heterogeneous data parallelism: step time with ``plait.parallel.balance`` against an equal split, 2 ranks, one of
them throttled to be ``--factor`` times slower.

    python bench/parallel_balance.py                       # factor 2, global batch 1024, plain allreduce_gradients
    python bench/parallel_balance.py --ddp                 # the same through DDP + sum_allreduce_hook
    python bench/parallel_balance.py --factor 3 --steps 40

Setup: 2 processes (torch.multiprocessing, spawn), one CPU thread each (``torch.set_num_threads(1)``), a plait
process group. Model: an MLP ``--d-in`` -> ``--hidden`` -> ``--hidden`` -> 10 (ReLU), float32, SGD; the loss is
``cross_entropy(reduction="sum") / global_batch`` and the gradients are summed (``allreduce_gradients``, or DDP with
``sum_allreduce_hook``), so both splits train the same full-batch gradient. The data is a fixed synthetic pool,
identical on both ranks; each step takes the next global batch and each rank its contiguous share
(``balancer.local_slice``).

The throttle (reproducible, documented): rank 1 (``--slow-rank``) runs its real forward/backward, measures the time
``t`` it took, and then sleeps ``(factor - 1) * t`` inside the timed region. Its throughput is therefore exactly
``1 / factor`` of what its own core gives (the sleep scales with the work, like a slower device would), whatever the
batch size, and the sleep leaves the core idle, so it does not disturb the other rank. Both ranks run the same code on
equal cores, so the speed ratio is ``factor : 1``. With ``--ddp`` the gradients are all-reduced during the backward, so
the sleep happens where a slow device's time would be: in the communication hook, just before the last bucket (the
last gradients computed) is handed to the all-reduce, for ``(factor - 1)`` x the time since the step started; the
hook then marks the end of local compute for the balancer, so the sleep is measured and DDP's wait is not.

Phases, in one run and interleaved over ``--rounds`` rounds: "equal" uses the fixed split ``G/2, G/2``; "balanced"
uses a ``Balancer`` (``--rebalance-every`` K, ``--warmup``) that measures each rank's compute and re-splits. The
balancer keeps its estimate across rounds. Each phase runs ``--warmup-steps`` unmeasured steps (in the first balanced
round these include the first rebalance), then ``--steps`` measured ones. Step time is rank 0's wall time from the
start of one step to the start of the next (the gradient all-reduce synchronises the ranks, so it is the slower
rank's time plus the all-reduce); the table gives medians over all measured steps of a phase. The "fwd+bwd" column
is each rank's median time in forward + backward (+ throttle); with ``--ddp`` it includes DDP's wait for the
all-reduce at the end of backward.

Ideal speed-up for two ranks of speeds ``factor : 1``: the equal split takes ``factor * t(G/2)``, the balanced one
``t(G) * factor / (factor + 1)``, so ``(factor + 1) / 2`` (1.5x for factor 2); the goal is 1.35x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _worker(rank, world, path, a, out):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(1)
    import plait  # noqa: F401  (registers the backend)
    from plait.parallel.balance import Balancer, allreduce_gradients, normalize_loss, split_batch

    dist.init_process_group("plait", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(a.d_in, a.hidden), nn.ReLU(), nn.Linear(a.hidden, a.hidden), nn.ReLU(),
                          nn.Linear(a.hidden, 10))
    if a.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    G = a.global_batch
    g = torch.Generator().manual_seed(1)
    pool_n = 4 * G
    X = torch.randn(pool_n, a.d_in, generator=g)
    Y = torch.randint(0, 10, (pool_n,), generator=g)
    slow = rank == a.slow_rank
    bal = Balancer(G, rebalance_every=a.rebalance_every, warmup=a.warmup, smoothing=a.smoothing)
    step_t0 = [0.0]
    if a.ddp:
        from plait.parallel.balance import SumHookState, sum_allreduce_hook
        state = SumHookState(dist.group.WORLD, bal)  # DDP below runs on the world group

        def throttled_hook(st, bucket):
            # DDP throttle: before the last bucket (the last gradients computed) goes to the all-reduce
            if slow and a.factor > 1 and bucket.is_last():
                time.sleep((a.factor - 1.0) * (time.perf_counter() - step_t0[0]))
            return sum_allreduce_hook(st, bucket)

        throttled_hook.__annotations__ = sum_allreduce_hook.__annotations__
        model.register_comm_hook(state, throttled_hook)
    equal = split_batch(G, [1.0] * world)
    step_no = [0]
    compute = {"equal": [], "balanced": []}

    def one_step(counts, phase, balancer):
        s = step_no[0] % (pool_n // G)
        step_no[0] += 1
        lo = sum(counts[:rank])
        x = X[s * G + lo:s * G + lo + counts[rank]]
        y = Y[s * G + lo:s * G + lo + counts[rank]]
        opt.zero_grad(set_to_none=True)
        t0 = step_t0[0] = time.perf_counter()
        with balancer.measure(counts[rank]) if balancer else _null():
            loss = normalize_loss(F.cross_entropy(model(x), y, reduction="sum"), G)
            loss.backward()
            if slow and a.factor > 1 and not a.ddp:
                # the throttle: sleep (factor - 1) x this step's real compute time, inside the timed region
                t = time.perf_counter() - t0
                time.sleep((a.factor - 1.0) * t)
        compute[phase].append(time.perf_counter() - t0)
        if not a.ddp:
            allreduce_gradients(model)
        opt.step()
        if balancer:
            balancer.step()

    def run_phase(phase, n_warm, n_meas):
        times = []
        dist.barrier()
        prev = None
        for i in range(n_warm + n_meas + 1):
            now = time.perf_counter()
            if prev is not None and i > n_warm:
                times.append(now - prev)
            prev = now
            if i == n_warm + n_meas:
                break
            if phase == "equal":
                one_step(equal, phase, None)
            else:
                one_step(bal.counts, phase, bal)
        return times

    res = {"equal": [], "balanced": []}
    for rnd in range(a.rounds):
        for phase in ("equal", "balanced"):
            n_warm = a.warmup_steps
            if phase == "balanced" and rnd == 0:
                n_warm = max(n_warm, a.warmup + a.rebalance_every)  # through the first rebalance
            res[phase] += run_phase(phase, n_warm, a.steps)
    if rank == 0:
        out["times"] = res
        out["history"] = [(h.step, h.counts, h.throughputs) for h in bal.history]
        out["counts"] = bal.counts
    out[f"compute{rank}"] = {k: statistics.median(v) for k, v in compute.items()}
    dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=float, default=2.0, help="slowdown of the throttled rank (default 2)")
    p.add_argument("--slow-rank", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="measured steps per phase and round")
    p.add_argument("--warmup-steps", type=int, default=5, help="unmeasured steps at the start of each phase")
    p.add_argument("--rounds", type=int, default=4, help="equal/balanced rounds, interleaved")
    p.add_argument("--rebalance-every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="Balancer warmup (steps not measured)")
    p.add_argument("--smoothing", type=float, default=0.5)
    p.add_argument("--ddp", action="store_true", help="DDP + sum_allreduce_hook instead of allreduce_gradients")
    p.add_argument("--json", help="also write the raw numbers here")
    a = p.parse_args()
    if a.factor < 1:
        p.error("--factor must be >= 1")
    if a.slow_rank not in (0, 1):
        p.error("--slow-rank must be 0 or 1")

    import torch
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as d:
        mgr = mp.Manager()
        out = mgr.dict()
        mp.start_processes(_worker, args=(world, os.path.join(d, "store"), a, out), nprocs=world, join=True,
                           start_method="spawn")
        out = dict(out)

    times = out["times"]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=10) for k, v in times.items()}
    speedup = med["equal"] / med["balanced"]
    ideal = (a.factor + 1) / 2
    hist = out["history"]
    final = out["counts"]
    cmd = "python bench/" + os.path.basename(sys.argv[0]) + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    print(f"# plait.parallel.balance: 2 ranks, rank {a.slow_rank} throttled {a.factor:g}x, global batch "
          f"{a.global_batch}, MLP {a.d_in}-{a.hidden}-{a.hidden}-10 fp32, 1 thread/rank, "
          f"{'DDP + sum_allreduce_hook' if a.ddp else 'allreduce_gradients'}, torch {torch.__version__}")
    print(f"# command: {cmd}")
    print(f"# medians over {len(times['equal'])} measured steps per split ({a.rounds} interleaved rounds of "
          f"{a.steps}); rebalance every {a.rebalance_every} steps, balancer warmup {a.warmup}, "
          f"smoothing {a.smoothing:g}")
    print()
    print("| split | samples rank 0 / rank 1 | step ms (median) | p10 / p90 ms | "
          "fwd+bwd ms r0 / r1 (median) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    eq = [a.global_batch // 2, a.global_batch - a.global_batch // 2]
    c0, c1 = out["compute0"], out["compute1"]
    for k, counts in (("equal", eq), ("balanced", list(final))):
        print(f"| {k} | {counts[0]} / {counts[1]} | {med[k]:.1f} | {q[k][0] * 1e3:.1f} / {q[k][-1] * 1e3:.1f} | "
              f"{c0[k] * 1e3:.1f} / {c1[k] * 1e3:.1f} | {med['equal'] / med[k]:.2f}x |")
    print()
    print(f"Speed-up with balancing: **{speedup:.2f}x** (ideal {ideal:.2f}x for a {a.factor:g}:1 ratio; goal 1.35x: "
          f"{'met' if speedup >= 1.35 else 'not met'}).")
    print("Splits chosen (step from which it applies: counts, measured samples/s):")
    for step, counts, thr in hist:
        t = "initial (equal)" if thr is None else " / ".join(f"{x:.0f}" for x in thr)
        print(f"- step {step}: {counts[0]} / {counts[1]}  ({t})")
    last = hist[-1][2]
    if last is not None:
        fast = 1 - a.slow_rank
        print(f"Measured speed ratio rank {fast} : rank {a.slow_rank} = {last[fast] / last[a.slow_rank]:.3f} "
              f"(throttle {a.factor:g})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "times": times, "history": hist, "counts": final, "speedup": speedup,
                       "compute": {"rank0": c0, "rank1": c1}}, f, indent=1)


if __name__ == "__main__":
    main()
