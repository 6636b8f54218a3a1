"""plait.parallel.balance: proportional splits, the balancer's agreement across ranks, the balanced sampler, and
exact gradients with unequal per-rank batches.

The exactness rule: with the loss normalised by the global sample count and gradients *summed* over ranks (the DDP
hook or ``allreduce_gradients``), gradients and weights after several steps equal a single-process full-batch
reference computed in the same process on the concatenated batch (float64, 1e-12 relative). DDP's default (local
mean, averaged over ranks) is checked to be *wrong* on the same data, so the comparison can fail.

All multi-rank checks share one 3-rank launch (timings are injected with ``Balancer.record`` so the splits are
deterministic; nothing here measures speed).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import _harness as H
from plait.parallel.balance import (Balancer, BalancedSampler, allreduce_gradients, normalize_loss,
                                    register_sum_hook, split_batch)

D_IN, D_OUT = 6, 3
REL = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# split_batch (single process)


@pytest.mark.parametrize("g,t,m,expected", [
    (16, [1, 1, 1], 1, [6, 5, 5]),            # tie on the remainder: lower rank first
    (10, [2, 1], 1, [7, 3]),                   # 6.67 / 3.33
    (10, [1, 1], 1, [5, 5]),
    (10, [1, 3], 0, [3, 7]),                   # 2.5 / 7.5: the tie goes to rank 0
    (10, [100, 1], 1, [9, 1]),                 # the floor lifts rank 1 from 0.099
    (10, [1000, 1, 1], 2, [6, 2, 2]),          # two ranks at the floor, the rest to rank 0
    (3, [5, 1, 1], 1, [1, 1, 1]),              # exactly the minimum
    (0, [1, 2], 0, [0, 0]),
    (7, [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 1, [1] * 7),
    (1000, [3.0, 1.0, 2.0, 4.0], 1, [300, 100, 200, 400]),
    (16, [1.0, 0.25, 2.0], 1, [5, 1, 10]),     # 4.92 / 1.23 / 9.85
])
def test_split_batch_values(g, t, m, expected):
    assert split_batch(g, t, m) == expected


def test_split_batch_properties():
    gen = torch.Generator().manual_seed(3)
    for _ in range(300):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        m = int(torch.randint(0, 4, (1,), generator=gen))
        g = m * n + int(torch.randint(0, 500, (1,), generator=gen))
        t = (torch.rand(n, generator=gen, dtype=torch.float64) * 10 + 1e-3).tolist()
        c = split_batch(g, t, m)
        assert sum(c) == g and len(c) == n and min(c) >= m
        # same answer for the same input, and scale-invariant (only the proportions matter)
        assert split_batch(g, t, m) == c
        assert split_batch(g, [x * 4.0 for x in t], m) == c
        # largest remainder without a binding floor: every count within 1 of its ideal share
        ideal = [g * x / sum(t) for x in t]
        if all(q >= m for q in ideal):
            assert all(abs(ci - q) < 1 for ci, q in zip(c, ideal)), (c, ideal)


@pytest.mark.parametrize("args,exc,match", [
    ((10, []), ValueError, "empty"),
    ((10, [1, 0]), ValueError, "rank 1 must be finite and > 0"),
    ((10, [1, -2]), ValueError, "rank 1"),
    ((10, [float("nan"), 1]), ValueError, "rank 0"),
    ((10, [float("inf"), 1]), ValueError, "rank 0"),
    ((10, [1, "fast"]), TypeError, "rank 1 is not a number"),
    ((10, 5), TypeError, "sequence"),
    ((-1, [1, 1]), ValueError, "global_batch must be >= 0"),
    ((2.5, [1, 1]), TypeError, "global_batch must be an int"),
    ((True, [1, 1]), TypeError, "global_batch must be an int"),
    ((5, [1, 1, 1], 2), ValueError, "too small for 3 ranks"),
    ((5, [1, 1], -1), ValueError, "min_per_rank must be >= 0"),
])
def test_split_batch_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        split_batch(*args)


# ---------------------------------------------------------------------------------------------------------------
# multi-rank (one launch)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, D_OUT)).double()


def _data(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D_IN, generator=g, dtype=torch.float64),
            torch.randn(n, D_OUT, generator=g, dtype=torch.float64))


def _loss_sum(model, x, y):
    return ((model(x) - y) ** 2).sum()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _grads(m):
    return [p.grad.detach().clone() for p in m.parameters()]


def _part_grads(rank, counts):
    """Unequal local batches: one backward, gradients through the plain function, the DDP hook, and DDP's default."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    N = sum(counts)
    X, Y = _data(N)
    lo = sum(counts[:rank])
    x, y = X[lo:lo + counts[rank]], Y[lo:lo + counts[rank]]

    ref = _model()
    (_loss_sum(ref, X, Y) / N).backward()
    g_ref = _grads(ref)

    plain = _model()
    normalize_loss(_loss_sum(plain, x, y), N).backward()
    allreduce_gradients(plain, bucket_cap_mb=0.0006)  # several buckets, one- and many-tensor
    hooked = DDP(_model(), bucket_cap_mb=0.0006)
    register_sum_hook(hooked)
    normalize_loss(_loss_sum(hooked, x, y), N).backward()
    default = DDP(_model())  # the common bug: local mean, then DDP divides the sum by the world size
    (_loss_sum(default, x, y) / counts[rank]).backward()
    return {
        "plain": [_rel(g, r) for g, r in zip(_grads(plain), g_ref)],
        "hook": [_rel(g, r) for g, r in zip(_grads(hooked.module), g_ref)],
        "default": [_rel(g, r) for g, r in zip(_grads(default.module), g_ref)],
    }


COSTS = [1.0e-3, 4.0e-3, 0.5e-3]  # injected seconds per sample of ranks 0, 1, 2
G, STEPS, K, WARMUP = 16, 12, 3, 1


def _part_training(rank, ws):
    """12 SGD-with-momentum steps, rebalancing every 3 steps from injected timings, data from BalancedSampler: the
    weights of the plain-function model and of the DDP-hook model equal the full-batch reference's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    L = G * STEPS + 5  # a short last batch that drop_last drops
    X, Y = _data(L, seed=11)
    bal = Balancer(G, rebalance_every=K, warmup=WARMUP, smoothing=0.5)
    sampler = BalancedSampler(L, bal, shuffle=True, seed=5)
    sampler.set_epoch(2)
    plain = _model()
    hooked = DDP(_model())
    register_sum_hook(hooked, balancer=bal)
    ref = _model()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, hooked, ref)]
    g = torch.Generator().manual_seed(5 + 2)
    order = torch.randperm(L, generator=g)  # the documented global order: randperm seeded by seed + epoch
    counts_seen, idx_ok, rebalanced = [], True, []
    assert len(sampler) == STEPS
    for step, idx in enumerate(sampler):
        counts_seen.append(bal.counts)
        glob = order[step * G:(step + 1) * G]
        parts = [None] * ws
        dist.all_gather_object(parts, idx)
        idx_ok &= sum(parts, []) == glob.tolist() and len(idx) == bal.local_count
        for o in opts:
            o.zero_grad(set_to_none=True)
        x, y = X[idx], Y[idx]
        normalize_loss(_loss_sum(plain, x, y), bal.global_batch).backward()
        allreduce_gradients(plain)
        normalize_loss(_loss_sum(hooked, x, y), bal.global_batch).backward()
        (_loss_sum(ref, X[glob], Y[glob]) / G).backward()
        for o in opts:
            o.step()
        bal.record(len(idx), len(idx) * COSTS[rank])
        rebalanced.append(bal.step())
    assert step == STEPS - 1
    w_ref = [p.detach() for p in ref.parameters()]
    return {
        "plain": max(_rel(p.detach(), r) for p, r in zip(plain.parameters(), w_ref)),
        "hook": max(_rel(p.detach(), r) for p, r in zip(hooked.module.parameters(), w_ref)),
        "moved": max(_rel(p.detach(), r) for p, r in zip(_model().parameters(), w_ref)),
        "history": [(h.step, h.counts, h.throughputs) for h in bal.history],
        "counts_seen": counts_seen,
        "idx_ok": idx_ok,
        "rebalanced": rebalanced,
        "throughputs": bal.throughputs,
    }


def _part_ddp_mark(rank):
    """measure() with the DDP hook stops the clock when the last bucket goes to the all-reduce: a sleep after
    backward inside the block is not counted; without a DDP backward it is."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    bal = Balancer(G, rebalance_every=1, warmup=0)
    m = DDP(_model())
    register_sum_hook(m, balancer=bal)
    x, y = _data(bal.local_count, seed=rank)
    with bal.measure():
        normalize_loss(_loss_sum(m, x, y), G).backward()
        time.sleep(0.3)
    with_hook = bal._win_seconds
    with bal.measure(n_samples=3):
        time.sleep(0.05)
    without = bal._win_seconds - with_hook
    samples = bal._win_samples
    bal.step()  # rebalance: everyone measured, so it succeeds
    return {"with_hook": with_hook, "without": without, "samples": samples, "counts": bal.counts}


def _expect_raise(fn, exc=RuntimeError):
    try:
        fn()
    except exc as e:  # noqa: PERF203
        return str(e)
    return None


def _part_errors(rank, ws):
    out = {}
    # a rank that skipped a step(): every rank raises at the rebalance
    bal = Balancer(16, rebalance_every=2, warmup=0)
    bal.record(bal.local_count, 0.01)
    bal.step()
    out["disagree"] = _expect_raise(bal.step if rank != 2 else bal.rebalance)
    # settings that differ between ranks: every rank raises at construction, naming the setting and the values
    out["set_batch"] = _expect_raise(lambda: Balancer(16 if rank != 2 else 17), ValueError)
    out["set_init"] = _expect_raise(lambda: Balancer(12, initial_throughputs=[1.0, 2.0, 3.0 + (rank == 1)]),
                                    ValueError)
    out["set_init_none"] = _expect_raise(lambda: Balancer(12, initial_throughputs=None if rank else [1, 1, 1]),
                                         ValueError)
    out["set_smooth"] = _expect_raise(lambda: Balancer(12, smoothing=0.25 * rank), ValueError)
    out["set_many"] = _expect_raise(lambda: Balancer(12, rebalance_every=5 + (rank == 0), warmup=rank % 2,
                                                     min_per_rank=1 + (rank == 2)), ValueError)
    # an invalid argument on one rank only: it raises its own error, the others raise instead of hanging
    out["one_bad"] = _expect_raise(lambda: Balancer(12, smoothing=1.0 if rank == 1 else 0.0), ValueError)
    # a rank that never recorded a timing: every rank raises, naming it
    bal = Balancer(16, rebalance_every=2, warmup=0)
    if rank != 1:
        bal.record(bal.local_count, 0.01)
    bal.step()
    out["missing"] = _expect_raise(bal.step)
    # local argument errors
    out["too_small"] = _expect_raise(lambda: Balancer(2), ValueError)
    out["smoothing"] = _expect_raise(lambda: Balancer(8, smoothing=1.0), ValueError)
    out["initial_len"] = _expect_raise(lambda: Balancer(8, initial_throughputs=[1, 2]), ValueError)
    out["bad_k"] = _expect_raise(lambda: Balancer(8, rebalance_every=0), ValueError)
    b = Balancer(8)
    out["bad_seconds"] = _expect_raise(lambda: b.record(3, -1.0), ValueError)
    out["bad_sampler"] = _expect_raise(lambda: BalancedSampler(object(), b), TypeError)
    out["bad_loss"] = _expect_raise(lambda: normalize_loss(torch.tensor(1.0), 0), ValueError)
    return out


def _part_subgroup(rank):
    """A balancer over ranks {0, 2}; initial_throughputs; split_for."""
    sub = dist.new_group([0, 2])
    if rank == 1:
        return None
    bal = Balancer(10, group=sub, rebalance_every=1, warmup=0, initial_throughputs=[1.0, 4.0])
    first = bal.counts
    bal.record(bal.local_count, bal.local_count * (1.0 if rank == 0 else 3.0))
    bal.step()
    return {"first": first, "counts": bal.counts, "slice": (bal.local_slice.start, bal.local_slice.stop),
            "local": bal.local_count, "split_for": bal.split_for(5)}


def _part_hook_groups(rank):
    """DDP on subgroups {0, 1} and {2}: register_sum_hook(ddp) sums over DDP's own group, not the world; a hook state
    without a group, or a group other than DDP's, raises."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from plait.parallel.balance import SumHookState, sum_allreduce_hook

    g01, g2 = dist.new_group([0, 1]), dist.new_group([2])
    dp, n = (g01, 2) if rank < 2 else (g2, 1)
    out = {}
    for how in ("register", "state"):
        torch.manual_seed(0)
        m = DDP(nn.Linear(2, 1, bias=False).double(), process_group=dp)
        if how == "register":
            register_sum_hook(m)
        else:
            m.register_comm_hook(SumHookState(dp), sum_allreduce_hook)
        x = torch.full((1, 2), float(rank + 1), dtype=torch.float64)
        normalize_loss(m(x).sum(), n).backward()
        out[how] = m.module.weight.grad.tolist()
    m = DDP(nn.Linear(2, 1, bias=False).double(), process_group=dp)
    out["no_group"] = _expect_raise(lambda: SumHookState(), ValueError)
    out["none_state"] = _expect_raise(lambda: sum_allreduce_hook(None, None), ValueError)
    out["wrong_group"] = _expect_raise(lambda: register_sum_hook(m, dist.group.WORLD), ValueError)
    return out


def _part_untouched(rank):
    """allreduce_gradients: a parameter no rank touched keeps .grad None (weight decay leaves it alone); one only
    rank 1 touched gets rank 1's gradient on every rank (zeros joined elsewhere)."""
    a, b, c = (nn.Parameter(torch.full((3,), v, dtype=torch.float64)) for v in (1.0, 2.0, 3.0))
    loss = a.sum() * (rank + 1)
    if rank == 1:
        loss = loss + (b * b).sum()
    loss.backward()
    allreduce_gradients([a, b, c])
    opt = torch.optim.SGD([a, b, c], lr=0.5, weight_decay=0.1, momentum=0.9)
    opt.step()
    return {"ga": a.grad.tolist(), "gb": b.grad.tolist(), "gc": c.grad, "c": c.detach().tolist()}


def _part_lossy_group(rank):
    """On a plait group configured with int8 compression, the sum hook and allreduce_gradients stay exact (they
    call plait.all_reduce(..., compression="none")), while a plain dist.all_reduce on that group is lossy."""
    if not H.IS_PLAIT:
        return None
    import plait
    from torch.nn.parallel import DistributedDataParallel as DDP

    lossy = dist.new_group(backend="plait", pg_options=plait.Options(compression="int8"))
    g = torch.Generator().manual_seed(100 + rank)
    vals = [torch.randn(4096, generator=g, dtype=torch.float64) for _ in range(3)]  # every rank knows all three
    exact = sum(torch.randn(4096, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)
                for r in range(3))
    t = vals[0].float()
    dist.all_reduce(t, group=lossy)
    out = {"raw": _rel(t.double(), exact)}
    # allreduce_gradients on float32 gradients
    p = nn.Parameter(torch.zeros(4096))
    p.grad = vals[0].float()
    allreduce_gradients([p], group=lossy)
    out["plain"] = _rel(p.grad.double(), exact)
    # the DDP hook: d(sum(w * v))/dw = v
    m = DDP(nn.Linear(4096, 1, bias=False), process_group=lossy)
    register_sum_hook(m)
    (m(vals[0].float().unsqueeze(0))).sum().backward()
    out["hook"] = _rel(m.module.weight.grad.double().reshape(-1), exact)
    return out


def worker_all(rank, ws):
    return {
        "grads": _part_grads(rank, [5, 2, 9]),
        "training": _part_training(rank, ws),
        "mark": _part_ddp_mark(rank),
        "errors": _part_errors(rank, ws),
        "subgroup": _part_subgroup(rank),
        "hook_groups": _part_hook_groups(rank),
        "untouched": _part_untouched(rank),
        "lossy": _part_lossy_group(rank),
    }


@pytest.fixture(scope="module")
def world3():
    return H.run_world(worker_all, 3, timeout_s=180)


def test_gradients_unequal_batches_equal_full_batch(world3):
    for r, res in enumerate(world3):
        g = res["grads"]
        assert max(g["plain"]) <= REL, (r, g["plain"])
        assert max(g["hook"]) <= REL, (r, g["hook"])
        # DDP's default averaging is wrong with unequal batches (5, 2, 9): far from the reference
        assert max(g["default"]) > 1e-2, (r, g["default"])


def test_training_with_rebalancing_equals_full_batch(world3):
    cost_thr = [1.0 / c for c in COSTS]
    expected_final = split_batch(G, cost_thr)
    assert expected_final == [5, 1, 10]
    hist0 = world3[0]["training"]["history"]
    for r, res in enumerate(world3):
        t = res["training"]
        assert t["plain"] <= REL and t["hook"] <= REL, (r, t["plain"], t["hook"])
        assert t["moved"] > 1e-3  # the weights did change: the comparison is not trivial
        assert t["idx_ok"], r
        assert t["history"] == hist0, f"rank {r} chose different splits: {t['history']} vs {hist0}"
        # rebalances after steps warmup+K, +2K, +3K (1-based step counts 4, 7, 10)
        assert t["rebalanced"] == [s + 1 in (4, 7, 10) for s in range(STEPS)]
        seen = t["counts_seen"]
        assert seen[:4] == [(6, 5, 5)] * 4 and seen[4:] == [tuple(expected_final)] * (STEPS - 4), seen
        for a, b in zip(t["throughputs"], cost_thr):
            assert abs(a - b) <= 1e-9 * b
    assert [h[0] for h in hist0] == [0, 4, 7, 10]
    assert hist0[0][1] == (6, 5, 5) and all(h[1] == (5, 1, 10) for h in hist0[1:])


def test_measure_excludes_ddp_wait(world3):
    for r, res in enumerate(world3):
        m = res["mark"]
        assert 0 < m["with_hook"] < 0.25, (r, m)  # the 0.3 s sleep after backward is not counted
        assert m["without"] >= 0.05, (r, m)
        assert m["samples"] == (6, 5, 5)[r] + 3
    assert len({res["mark"]["counts"] for res in world3}) == 1


def test_errors(world3):
    for r, res in enumerate(world3):
        e = res["errors"]
        assert e["disagree"] and "disagree" in e["disagree"] and "rank 2: step 1" in e["disagree"], (r, e)
        assert "rank 0: step 2" in e["disagree"], (r, e)
        assert e["set_batch"] and "global_batch: rank 0: 16, rank 1: 16, rank 2: 17" in e["set_batch"], (r, e)
        assert e["set_init"] and "initial_throughputs: rank 0: [1.0, 2.0, 3.0], rank 1: [1.0, 2.0, 4.0], " \
            "rank 2: [1.0, 2.0, 3.0]" in e["set_init"], (r, e)
        assert "global_batch" not in e["set_init"] and "smoothing" not in e["set_init"], (r, e)
        assert e["set_init_none"] and "initial_throughputs: rank 0: [1.0, 1.0, 1.0], rank 1: None" \
            in e["set_init_none"], (r, e)
        assert e["set_smooth"] and "smoothing: rank 0: 0.0, rank 1: 0.25, rank 2: 0.5" in e["set_smooth"], (r, e)
        for needle in ("rebalance_every: rank 0: 6, rank 1: 5, rank 2: 5", "warmup: rank 0: 0, rank 1: 1, rank 2: 0",
                       "min_per_rank: rank 0: 1, rank 1: 1, rank 2: 2"):
            assert e["set_many"] and needle in e["set_many"], (r, needle, e["set_many"])
        if r == 1:
            assert e["one_bad"] and "smoothing must be a number in [0, 1), got 1.0" in e["one_bad"], e
        else:
            assert e["one_bad"] and "rank(s) [1] of the group rejected their arguments" in e["one_bad"], (r, e)
        assert e["missing"] and "rank(s) [1] recorded no compute timing" in e["missing"], (r, e)
        assert "too small for 3 ranks" in e["too_small"]
        assert "smoothing" in e["smoothing"]
        assert "2 values for a group of 3" in e["initial_len"]
        assert "rebalance_every must be >= 1" in e["bad_k"]
        assert "seconds" in e["bad_seconds"] and f"rank {r}" in e["bad_seconds"]
        assert "sized dataset" in e["bad_sampler"]
        assert "global_count" in e["bad_loss"]


def test_subgroup(world3):
    assert world3[1]["subgroup"] is None
    a, b = world3[0]["subgroup"], world3[2]["subgroup"]
    assert a["first"] == b["first"] == (2, 8)           # initial_throughputs 1:4
    assert a["counts"] == b["counts"] == (8, 2)         # measured 1 : 1/3 -> 7.5 / 2.5, tie to rank 0
    assert (a["slice"], b["slice"]) == ((0, 8), (8, 10))
    assert (a["local"], b["local"]) == (8, 2)
    assert a["split_for"] == b["split_for"] == [4, 1]   # 3.75 / 1.25


def test_sum_hook_uses_ddp_group(world3):
    for r, res in enumerate(world3):
        h = res["hook_groups"]
        # pair {0, 1}: (1 + 2) / 2 per input; rank 2 alone: 3 / 1 (a world sum would give 3 + 3 = 6 on every rank)
        want = [[1.5, 1.5]] if r < 2 else [[3.0, 3.0]]
        assert h["register"] == want and h["state"] == want, (r, h)
        assert h["no_group"] and "group is None" in h["no_group"] and "ddp.process_group" in h["no_group"], (r, h)
        assert h["none_state"] and "state is None" in h["none_state"], (r, h)
        assert h["wrong_group"] and "global ranks [0, 1, 2]" in h["wrong_group"], (r, h)


def test_allreduce_gradients_leaves_untouched_none(world3):
    for r, res in enumerate(world3):
        u = res["untouched"]
        assert u["ga"] == [6.0] * 3, (r, u)          # 1 + 2 + 3
        assert u["gb"] == [4.0] * 3, (r, u)          # only rank 1: 2 * b
        assert u["gc"] is None and u["c"] == [3.0] * 3, (r, u)   # weight decay did not touch it


def test_exact_on_lossy_plait_group(world3):
    if not H.IS_PLAIT:
        pytest.skip("plait-only: int8 group compression")
    for r, res in enumerate(world3):
        lo = res["lossy"]
        assert lo["raw"] > 1e-4, (r, lo)             # the group really compresses
        assert lo["plain"] <= 1e-6 and lo["hook"] <= 1e-6, (r, lo)   # float32 rounding only
