"""plait.parallel.pipeline: partition(), Pipeline (GPipe / 1F1B) parity with the unsplit model, failures that make
every rank raise, bad input, and torch.distributed.pipelining running on the backend under test.

Parity rule: float64 models, the same batch through the unsplit model on every rank as reference. A pipeline splits
the batch into micro-batches, so the loss is a weighted sum of micro-batch means and a parameter gradient a sum of
micro-batch gradients: equal to the reference up to rounding, compared at 1e-12 relative (max |a-b| / max |b|).
Whether the results are also bitwise equal is recorded (with one micro-batch they are: the arithmetic is the same).

Launches (each costs a few seconds of torch import): one 4-rank world covers 2, 3 and 4 stages on subgroups (the
2-stage group is global ranks {1, 3} and the 3-stage group {1, 2, 3}, so peers' global ranks differ from their
group ranks), both schedules and micro-batch counts from 1 to more than the stage count, uneven chunks included; one
4-rank world for failures; one 2-rank world for torch.distributed.pipelining.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import _harness as H
from plait.parallel.pipeline import Pipeline, PipelineError, partition, profile_layers, schedule_ops

RTOL = 1e-12


# ------------------------------------------------------------------------------------------------------------------
# partition(): pure Python


def test_partition_speeds_seed_example():
    # the seed: a device half as fast gets a third of the layers
    assert partition([1.0] * 6, 2, speeds=[1, 0.5]) == [4, 2]
    assert partition([1.0] * 6, 2, speeds=[0.5, 1]) == [2, 4]
    # bottleneck 4 either way ([4, 2, 3] has stage times 4, 4, 3); [4, 1, 4] (times 4, 2, 4) is better balanced
    assert partition([1.0] * 9, 3, speeds=[1, 0.5, 1]) == [4, 1, 4]
    assert partition([1.0] * 8, 2) == [4, 4]


def test_partition_minimises_bottleneck_exactly():
    import itertools
    import random

    rng = random.Random(7)
    for trial in range(60):
        n = rng.randint(1, 9)
        S = rng.randint(1, n)
        costs = [rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, rng.random()]) for _ in range(n)]
        speeds = [rng.choice([0.5, 1.0, 2.0]) for _ in range(S)]
        got = partition(costs, S, speeds)
        assert len(got) == S and sum(got) == n and min(got) >= 1, got

        def bottleneck(bal):
            out, k = 0.0, 0
            for s, b in enumerate(bal):
                out = max(out, sum(costs[k:k + b]) / speeds[s])
                k += b
            return out

        best = min(bottleneck([b - a for a, b in zip((0,) + cut, cut + (n,))])
                   for cut in itertools.combinations(range(1, n), S - 1))
        assert bottleneck(got) <= best * (1 + 1e-12), (costs, speeds, got, best)
        assert partition(list(costs), S, list(speeds)) == got  # deterministic


def test_partition_ties_and_balance_beyond_the_bottleneck():
    # 3 equal layers on 2 equal stages: a tie; later stages get more layers
    assert partition([1, 1, 1], 2) == [1, 2]
    # the bottleneck (10) is fixed; the rest is balanced, not [1, 1, 3]
    assert partition([10, 1, 1, 1, 1], 3) == [1, 2, 2]
    # per-stage cost rows (each rank's own measurement): stage 1's rank is 3x slower
    rows = [[1.0] * 8, [3.0] * 8]
    assert partition(rows, 2) == [6, 2]
    assert partition([5.0], 1) == [1]


def test_partition_bad_input():
    with pytest.raises(ValueError, match="3 layers cannot fill 4 stages"):
        partition([1, 1, 1], 4)
    with pytest.raises(ValueError, match="speeds"):
        partition([1, 1], 2, speeds=[1])
    with pytest.raises(ValueError, match=r"speeds\[1\]"):
        partition([1, 1], 2, speeds=[1, 0])
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        partition([1, float("nan")], 2)
    with pytest.raises(ValueError, match="num_stages"):
        partition([1, 1], 0)
    # cost / speed overflows to inf for every split: no finite answer (it used to return [-1, 4])
    with pytest.raises(ValueError, match="finite slowest-stage time"):
        partition([1, 1, 1], 2, speeds=[1e-320, 1])


def test_profile_layers_leaves_the_model_and_rng_alone():
    torch.manual_seed(0)
    act = nn.ReLU()  # one module object listed twice: two layers, both profiled
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), act, nn.Dropout(0.5), nn.Linear(4, 4), act)
    m[0].weight.grad = torch.full((4, 4), 7.0)
    x = torch.randn(8, 4)
    bufs = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    expect = torch.rand(5)
    torch.manual_seed(1)
    costs = profile_layers(m, x, repeats=2, warmup=1)
    assert torch.equal(torch.rand(5), expect)  # the global random stream was not consumed (dropout ran)
    assert len(costs) == 6 and all(c >= 0 for c in costs), costs
    for k, v in m.state_dict().items():  # running stats and num_batches_tracked restored
        assert torch.equal(v, bufs[k]), k
    assert int(m[1].num_batches_tracked) == 0 and m.training
    assert torch.equal(m[0].weight.grad, torch.full((4, 4), 7.0)) and m[4].weight.grad is None


def test_schedule_ops():
    # 1F1B, 4 stages, 6 micro-batches: stage 0 warms up with 3 forwards, stage 3 alternates from the start
    assert schedule_ops("1f1b", 4, 0, 6)[:5] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0)]
    assert schedule_ops("1f1b", 4, 3, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    # fewer micro-batches than stages: warm-up is capped
    assert schedule_ops("1f1b", 4, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert schedule_ops("gpipe", 3, 1, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    for S in range(1, 5):
        for s in range(S):
            for n in range(1, 7):
                for sched in ("1f1b", "gpipe"):
                    ops = schedule_ops(sched, S, s, n)
                    assert ops[0] == ("F", 0)
                    assert sorted(ops) == sorted([("F", i) for i in range(n)] + [("B", i) for i in range(n)])
                    assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(n))


# ------------------------------------------------------------------------------------------------------------------
# parity with the unsplit model


class Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def _model():
    """float64 model whose activations change width, rank (3-D in the middle) and dtype (a float32 stretch)."""
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Linear(5, 12), nn.Tanh(),            # 0, 1
        nn.Unflatten(1, (3, 4)),                # 2: (B, 3, 4)
        nn.Linear(4, 6), nn.GELU(),             # 3, 4: (B, 3, 6)
        nn.Flatten(1),                          # 5: (B, 18)
        nn.Linear(18, 7), nn.Tanh(),            # 6, 7
        nn.Linear(7, 3),                        # 8
    ).double()


def _embed_model():
    torch.manual_seed(99)
    return nn.Sequential(nn.Embedding(11, 6), nn.Flatten(1), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 2)).double()


def _rel(a, b):
    a, b = a.double(), b.double()
    den = b.abs().max().item()
    d = (a - b).abs().max().item()
    return d / den if den else d


def _reference(model, x, y, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_pipe(model_fn, pg, x, y, loss_fn, sched, chunks, balance=None, lr=0.1, reduction="mean"):
    """Run one pipeline step and one SGD step; compare with the unsplit model. Returns a record."""
    ref_model = model_fn()
    ref_loss, ref_grads = _reference(ref_model, x, y, loss_fn)
    with torch.no_grad():
        for p in ref_model.parameters():
            p -= lr * p.grad
    pipe = Pipeline(model_fn(), group=pg, balance=balance)
    s, S = pipe.stage_index, pipe.num_stages
    loss = pipe.step(x if s == 0 else None, y if s == S - 1 else None, loss_fn=loss_fn, chunks=chunks,
                     schedule=sched, reduction=reduction)
    rec = dict(stage=s, S=S, sched=sched, chunks=chunks, balance=pipe.balance,
               loss_rel=_rel(loss, ref_loss), loss_bitwise=bool(torch.equal(loss, ref_loss.double())),
               grad_rel=0.0, grad_bitwise=True, weight_rel=0.0, nparams=0)
    ref_params = dict(ref_model.named_parameters())
    params = list(pipe.parameters())  # a stage may hold no parameters (activations only)
    opt = torch.optim.SGD(params, lr=lr) if params else None
    for name, p in pipe.stage.named_parameters():
        g = ref_grads[name]
        rec["grad_rel"] = max(rec["grad_rel"], _rel(p.grad, g))
        rec["grad_bitwise"] &= bool(torch.equal(p.grad, g))
        rec["nparams"] += 1
    if opt:
        opt.step()
    for name, p in pipe.stage.named_parameters():
        rec["weight_rel"] = max(rec["weight_rel"], _rel(p.detach(), ref_params[name].detach()))
    # a second step on the same pipeline (the step counter in the headers advances together)
    pipe.zero_grad()
    pipe.step(x if s == 0 else None, y if s == S - 1 else None, loss_fn=loss_fn, chunks=chunks, schedule=sched,
              reduction=reduction)
    # inference forward equals the stepped reference model's output on the last stage
    out = pipe(x if s == 0 else None, chunks=chunks)
    if s == S - 1:
        with torch.no_grad():
            rec["fwd_rel"] = _rel(out, ref_model(x))
    else:
        rec["fwd_rel"] = 0.0 if out is None else float("inf")
    return rec


def worker_parity(rank, ws):
    groups = {4: dist.group.WORLD, 3: dist.new_group([1, 2, 3]), 2: dist.new_group([1, 3]), 1: dist.new_group([2])}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randn(10, 3, generator=g, dtype=torch.float64)
    recs = []
    # balances put stage boundaries at the 3-D, the float32 and the plain activations
    balances = {4: [2, 3, 2, 2], 3: [3, 3, 3], 2: [5, 4], 1: [9]}
    for S, pg in groups.items():
        if dist.get_rank(pg) < 0:
            continue
        for sched in ("gpipe", "1f1b"):
            # 10 samples: chunks 1 (one micro-batch), 2, 3 (4+4+2), 4 (3+3+3+1), 8 (torch.chunk gives 5 of 2)
            for chunks in (1, 2, 3, 4, 8):
                recs.append(_check_pipe(_model, pg, x, y, F.mse_loss, sched, chunks, balances[S]))
        # default balance (equal costs) and a float32 stretch across a stage boundary
        recs.append(_check_pipe(_model, pg, x, y, F.mse_loss, "1f1b", 3))

        def cast_model():
            m = _model()
            return nn.Sequential(*list(m)[:6], Cast(torch.float32), Cast(torch.float64), *list(m)[6:])

        recs.append(_check_pipe(cast_model, pg, x, y, F.mse_loss, "1f1b", 4, {4: [3, 4, 2, 2], 3: [4, 3, 4],
                                                                             2: [6, 5], 1: [11]}[S]))
    # integer tokens into stage 0, a sum-reduced loss, on the 2-stage group
    if dist.get_rank(groups[2]) >= 0:
        tok = torch.randint(0, 11, (7, 4), generator=torch.Generator().manual_seed(3))
        lab = torch.randint(0, 2, (7,), generator=torch.Generator().manual_seed(4))
        for sched in ("gpipe", "1f1b"):
            recs.append(_check_pipe(_embed_model, groups[2], tok, lab,
                                    lambda o, t: F.cross_entropy(o, t, reduction="sum"), sched, 3, [2, 3],
                                    reduction="sum"))
    if dist.get_rank(groups[2]) >= 0:
        # one activation module object on both stages (named_children() would have dropped its second use), and an
        # in-place first layer on stage 1 (the received activation must not be an autograd leaf)
        def dup_model():
            torch.manual_seed(7)
            act = nn.Tanh()
            return nn.Sequential(nn.Linear(5, 12), act, nn.Linear(12, 7), act, nn.Linear(7, 3)).double()

        def inplace_model():
            torch.manual_seed(8)
            return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True),
                                 nn.Linear(8, 3)).double()

        for sched in ("gpipe", "1f1b"):
            recs.append(_check_pipe(dup_model, groups[2], x, y, F.mse_loss, sched, 3, [2, 3]))
            recs.append(_check_pipe(inplace_model, groups[2], x, y, F.mse_loss, sched, 3, [1, 4]))
    # 1F1B memory: a stage keeps the sends of its in-flight micro-batches only (at most S - s), not all 8
    pipe = Pipeline(_model(), group=dist.group.WORLD, balance=[2, 3, 2, 2])
    s = pipe.stage_index
    most = [0]
    send = pipe._send

    def counting_send(*a):
        send(*a)
        most[0] = max(most[0], len({e[2] for e in pipe._pending if e[2][0] == 1 and e[1].numel() > 0}))

    pipe._send = counting_send
    xb, yb = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    pipe.step(xb if s == 0 else None, yb if s == 3 else None, loss_fn=F.mse_loss, chunks=8, schedule="1f1b")
    act_pending = (most[0], 4 - s) if s < 3 else (0, 0)
    # auto balance from measured costs: every rank must agree (checked inside Pipeline) and cover all layers
    pipe = Pipeline(_model(), group=dist.group.WORLD, sample_input=x, profile_repeats=2)
    auto = pipe.balance
    pipe = Pipeline(_model(), group=dist.group.WORLD, speeds=[1, 1, 0.5, 1])
    speeds_bal = pipe.balance
    return dict(recs=recs, auto=auto, speeds_bal=speeds_bal, act_pending=act_pending)


@pytest.mark.timeout(240)
def test_pipeline_parity_with_unsplit_model():
    res = H.run_world(worker_parity, 4, timeout_s=200)
    worst = dict(loss_rel=0.0, grad_rel=0.0, weight_rel=0.0, fwd_rel=0.0)
    bitwise = {"all": 0, "loss": 0, "grads": 0}
    cases = set()
    for rank, r in enumerate(res):
        for rec in r["recs"]:
            for k in worst:
                assert rec[k] <= RTOL, f"rank {rank}: {k} = {rec[k]:.3g} > {RTOL}: {rec}"
                worst[k] = max(worst[k], rec[k])
            bitwise["all"] += 1
            bitwise["loss"] += rec["loss_bitwise"]
            bitwise["grads"] += rec["grad_bitwise"]
            cases.add((rec["S"], rec["sched"], rec["chunks"]))
            if rec["chunks"] == 1 and rec["stage"] == rec["S"] - 1:
                # one micro-batch: the same arithmetic as the unsplit model
                assert rec["loss_bitwise"] and rec["grad_bitwise"], rec
        assert sum(r["auto"]) == 9 and len(r["auto"]) == 4 and min(r["auto"]) >= 1, r["auto"]
        assert r["auto"] == res[0]["auto"]
        # equal layer costs, the third rank half as fast: it gets the fewest layers (bottleneck 3; a tie between
        # [3, 3, 1, 2], [3, 2, 1, 3] and [2, 3, 1, 3] goes to the later stages)
        assert r["speeds_bal"] == [2, 3, 1, 3], r["speeds_bal"]
        got, bound = r["act_pending"]
        assert got <= bound, f"rank {rank}: {got} micro-batches' activation sends pending (1F1B bound {bound})"
    # every stage count x schedule x micro-batch count ran (M < S included: chunks 1, 2, 3 at S = 4)
    for S in (1, 2, 3, 4):
        for sched in ("gpipe", "1f1b"):
            for chunks in (1, 2, 3, 4, 8):
                assert (S, sched, chunks) in cases
    print(f"\npipeline parity: worst relative differences {worst}; bitwise equal: {bitwise}")


# ------------------------------------------------------------------------------------------------------------------
# failures: every rank raises, promptly


class Boom(nn.Module):
    def __init__(self, at_call):
        super().__init__()
        self.calls = 0
        self.at_call = at_call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("boom in a layer")
        return x


def _run_failing(pg, make_model, balance, chunks, sched, x=None, y=None):
    pipe = Pipeline(make_model(), group=pg, balance=balance)
    s, S = pipe.stage_index, pipe.num_stages
    t0 = time.monotonic()
    try:
        pipe.step(x if s == 0 else None, y if s == S - 1 else None, loss_fn=F.mse_loss, chunks=chunks,
                  schedule=sched[s] if isinstance(sched, list) else sched)
    except PipelineError as e:
        return dict(stage=s, msg=str(e), s=time.monotonic() - t0)
    return dict(stage=s, msg="no error", s=time.monotonic() - t0)


def worker_failures(rank, ws):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    out = {}

    def boom_model():
        m = _model()
        return nn.Sequential(*list(m)[:7], Boom(at_call=2), *list(m)[7:])  # layer 7 raises on its 2nd call

    # a middle stage's layer raises on micro-batch 1 (stage 2 of 4 holds layers 5..7); a fresh group each time
    for sched in ("gpipe", "1f1b"):
        out[f"layer_{sched}"] = _run_failing(dist.new_group(list(range(ws))), boom_model, [3, 2, 3, 2], 4, sched,
                                             x=x, y=y)

    # mismatched shapes between stages: stage 1's first layer expects 9 features, stage 0 sends 12
    def bad_model():
        m = _model()
        return nn.Sequential(m[0], m[1], nn.Linear(9, 4).double(), *list(m)[3:])

    out["shape"] = _run_failing(dist.new_group(list(range(ws))), bad_model, [2, 3, 2, 2], 2, "1f1b", x=x, y=y)
    # ranks disagree on the schedule (chunks only matters on stage 0: the others learn the micro-batch count
    # from its messages)
    out["sched"] = _run_failing(dist.new_group(list(range(ws))), _model, [2, 3, 2, 2], 4,
                                ["gpipe", "1f1b", "1f1b", "1f1b"], x=x, y=y)
    # abort_groups: stage 0 (rank 0) of a 2-stage pipeline on ranks {0, 1} fails; rank 2 waits in an all-reduce on
    # {0, 2} (as a tensor-parallel partner of a failing stage would) and must raise too, not time out
    pp01, g02 = dist.new_group([0, 1]), dist.new_group([0, 2])
    t0 = time.monotonic()
    if rank in (0, 1):
        def boom_first():
            m = _model()
            return nn.Sequential(Boom(at_call=1), *list(m))

        pipe = Pipeline(boom_first(), group=pp01, balance=[4, 6], abort_groups=[g02] if rank == 0 else [])
        try:
            pipe.step(x if rank == 0 else None, y, loss_fn=F.mse_loss, chunks=2)
            msg = "no error"
        except PipelineError as e:
            msg = str(e)
    elif rank == 2:
        try:
            dist.all_reduce(torch.ones(3), group=g02)
            msg = "no error"
        except RuntimeError as e:
            msg = str(e)
    else:
        msg = "not involved"
    out["abort_groups"] = dict(msg=msg, s=time.monotonic() - t0)
    # a bad step argument on one rank (rank 1: reduction="avg") aborts the group: every rank raises at once
    pipe = Pipeline(_model(), group=dist.new_group(list(range(ws))), balance=[2, 3, 2, 2])
    t0 = time.monotonic()
    try:
        pipe.step(x if rank == 0 else None, y if rank == ws - 1 else None, loss_fn=F.mse_loss, chunks=2,
                  reduction="avg" if rank == 1 else "mean")
        msg = "no error"
    except PipelineError as e:
        msg = str(e)
    out["bad_arg"] = dict(msg=msg, s=time.monotonic() - t0)

    # inference: the last stage fails after the others sent everything; they raise too (not return normally)
    def boom_last():
        return nn.Sequential(*list(_model()), Boom(at_call=2))

    pipe = Pipeline(boom_last(), group=dist.new_group(list(range(ws))), balance=[2, 3, 2, 3])
    t0 = time.monotonic()
    try:
        pipe(x if rank == 0 else None, chunks=2)
        msg = "no error"
    except PipelineError as e:
        msg = str(e)
    out["infer"] = dict(msg=msg, s=time.monotonic() - t0)
    # bad construction arguments raise on every rank (and nothing hangs)
    pg = dist.new_group(list(range(ws)))
    msgs = {}
    tied = nn.Linear(5, 5).double()
    for what, kw in {"more stages than layers": dict(layers=[nn.Linear(2, 2)] * 3),
                     "bad balance": dict(balance=[3, 3, 3, 1]),
                     "disagreeing balance": dict(balance=[2, 2, 2, 3] if rank == 1 else [3, 2, 2, 2]),
                     "zero-layer stage": dict(balance=[0, 3, 3, 3]),
                     "bad balance on one rank": dict(balance=[2, 2, 2, 2] if rank == 2 else [3, 2, 2, 2]),
                     "tied across stages": dict(layers=[tied, nn.Tanh(), tied, nn.Tanh()]),
                     "sample_input on one rank": dict(sample_input=x if rank == 0 else None)}.items():
        kw = dict(kw)
        layers = kw.pop("layers", _model())
        try:
            Pipeline(layers, group=pg, **kw)
            msgs[what] = "no error"
        except (ValueError, TypeError) as e:
            msgs[what] = str(e)
    out["construct"] = msgs
    # the group used for the construction checks still works: a clean step after them
    pipe = Pipeline(_model(), group=pg, balance=[2, 3, 2, 2])
    loss = pipe.step(x if rank == 0 else None, y if rank == ws - 1 else None, loss_fn=F.mse_loss, chunks=3)
    out["after"] = float(loss)
    ref_model = _model()
    out["after_ref"] = float(F.mse_loss(ref_model(x), y))
    return out


@pytest.mark.plait_only  # relies on ProcessGroup.abort() reaching the peers (gloo's abort does not: they time out)
@pytest.mark.timeout(200)
def test_failures_make_every_rank_raise():
    res = H.run_world(worker_failures, 4, pg_timeout_s=60, timeout_s=150)
    for case in ("layer_gpipe", "layer_1f1b"):
        recs = [r[case] for r in res]
        for r in recs:
            assert r["msg"] != "no error", (case, recs)
            assert r["s"] < 10, f"{case}: stage {r['stage']} took {r['s']:.1f} s to raise (group timeout 60 s)"
        m = recs[2]["msg"]
        assert "stage 2 (rank 2)" in m and "layer 7 (Boom())" in m and "micro-batch 1" in m \
            and "boom in a layer" in m, m
        for r in recs[:2] + recs[3:]:
            # the others hear of rank 2's abort (not of a timeout)
            assert f"stage {r['stage']} (rank {r['stage']})" in r["msg"] and "peer rank 2" in r["msg"] \
                and "aborted" in r["msg"], r["msg"]
    recs = [r["shape"] for r in res]
    m = recs[1]["msg"]
    assert "stage 1 (rank 1)" in m and "layer 2 (Linear(in_features=9" in m and "(4, 12)" in m \
        and "last dimension 9" in m and "from stage 0 (rank 0)" in m, m
    assert all(r["msg"] != "no error" and r["s"] < 10 for r in recs), recs
    ab = [r["abort_groups"] for r in res]
    assert "stage 0 (rank 0), layer 0 (Boom())" in ab[0]["msg"], ab
    assert "aborted" in ab[1]["msg"] and "aborted" in ab[2]["msg"] and ab[3]["msg"] == "not involved", ab
    assert max(a["s"] for a in ab) < 10, ab
    recs = [r["sched"] for r in res]
    assert all(r["msg"] != "no error" and r["s"] < 10 for r in recs), recs
    assert "stage 0 (rank 0) runs schedule 'gpipe', this stage '1f1b'" in recs[1]["msg"], recs[1]["msg"]
    for rank, r in enumerate(res):
        c = r["construct"]
        assert "3 layers cannot fill 4 stages" in c["more stages than layers"] and f"rank {rank}" in \
            c["more stages than layers"], c
        assert "bad balance [3, 3, 3, 1]" in c["bad balance"] and "summing to the 9 layers" in c["bad balance"], c
        assert "disagree on the balance" in c["disagreeing balance"], c
        assert "bad balance [0, 3, 3, 3]" in c["zero-layer stage"], c
        if rank == 2:
            assert "bad balance [2, 2, 2, 2]" in c["bad balance on one rank"], c
        else:
            assert "another rank of the pipeline group has a bad balance" in c["bad balance on one rank"], c
        assert "parameter 'weight' of layer 0 (stage 0) is also parameter 'weight' of layer 2 (stage 2)" in \
            c["tied across stages"] and "not supported" in c["tied across stages"], c
        assert "some ranks of the pipeline group profile" in c["sample_input on one rank"] and \
            f"stage {rank} (rank {rank})" in c["sample_input on one rank"], c
        assert abs(r["after"] - r["after_ref"]) <= 1e-12 * abs(r["after_ref"]), r
    for case, culprit, text in (("bad_arg", 1, "reduction must be 'mean' or 'sum', got 'avg'"),
                                ("infer", 3, "layer 9 (Boom())")):
        recs = [r[case] for r in res]
        assert all(r["msg"] != "no error" and r["s"] < 10 for r in recs), (case, recs)
        assert text in recs[culprit]["msg"], recs[culprit]
        for rank, r in enumerate(recs):
            if rank != culprit:
                assert "aborted" in r["msg"], (case, rank, r)
    for case in ("layer_gpipe", "layer_1f1b", "shape", "sched", "abort_groups", "bad_arg", "infer"):
        print(f"\n{case}:")
        for r in res:
            print(f"  {r[case]['s']:.3f} s  {r[case]['msg']}")
    print("\nconstruction:", *res[1]["construct"].values(), sep="\n  ")


# ------------------------------------------------------------------------------------------------------------------
# torch.distributed.pipelining on the backend under test


def worker_torch_pipelining(rank, ws):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64)
    out = {}
    for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        ref = _model()
        ref_loss, ref_grads = _reference(ref, x, y, F.mse_loss)
        full = _model()
        bounds = [(0, 5), (5, 9)]
        lo, hi = bounds[rank]
        sub = nn.Sequential(*[full[i] for i in range(lo, hi)])
        stage = PipelineStage(sub, rank, ws, torch.device("cpu"))
        sched = cls(stage, n_microbatches=4, loss_fn=F.mse_loss)
        losses = []
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y, losses=losses)
        grad_rel = max(_rel(full[i].weight.grad, ref_grads[f"{i}.weight"]) for i in range(lo, hi)
                       if hasattr(full[i], "weight"))
        # torch's schedules scale micro-batch losses by 1/n_microbatches: their mean is the full-batch loss here
        # (4 equal micro-batches of 3)
        loss_rel = _rel(torch.stack(losses).mean(), ref_loss) if losses else 0.0
        out[name] = dict(grad_rel=grad_rel, loss_rel=loss_rel)
    return out


@pytest.mark.timeout(150)
def test_torch_distributed_pipelining_runs():
    res = H.run_world(worker_torch_pipelining, 2, timeout_s=120)
    for r in res:
        for name, v in r.items():
            assert v["grad_rel"] <= RTOL and v["loss_rel"] <= RTOL, (name, v)
