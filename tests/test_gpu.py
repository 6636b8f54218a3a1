"""CUDA tensors through plait on one GPU shared by every rank (each rank calls torch.cuda.set_device(0)).

Every test is marked ``gpu`` (skipped without torch.cuda.is_available()) and runs a multi-process world with
tests/_harness.run_world. Results are exact against the CPU references of tests/_collcheck (integer-valued data);
nothing here asserts on a time measurement. What runs:

- every collective x dtype x op on CUDA tensors, world sizes 1-4, with ring / tree / direct forced through
  plait.Options (the device engine: CUDA IPC staging buffers and stream memory operations), with the default staging
  buffer and with PLAIT_DEVICE_BUFFER_BYTES=4096 (slicing, and growth of the staging buffer), and messages larger
  than the default 64 MiB staging buffer;
- DDP training on cuda:0 over plait against the same training over gloo's CUDA path;
- stream semantics: the host call returns while the caller's stream is still busy (a torch.cuda._sleep ahead of the
  call), the collective sees what the caller's stream wrote before the call, and work queued after it sees the
  result; async_op + wait + Future.then; tensors freed right after the call (record_stream);
- send / recv and batch_isend_irecv on CUDA tensors (staged through host memory);
- fake hosts (PLAIT_HOST_ID per rank): CUDA tensors staged through host memory, run on the host engine;
- errors: CPU and CUDA tensors mixed in one call; ranks disagreeing on the size of a device all-reduce.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import _collcheck as C
import _harness as H

pytestmark = [pytest.mark.gpu, pytest.mark.plait_only]

DEV = "cuda"
COUNTS = [0, 1, 7, 1003, 2500]  # 2500 x 8 B > a 4 KiB staging buffer: several slices, and growth for the rest
ALGOS = ["auto", "ring", "tree", "direct"]
SMALL_STAGING = {"PLAIT_DEVICE_BUFFER_BYTES": "4096"}
SLEEP_S = 0.5  # GPU time the caller's stream is kept busy ahead of a call (torch.cuda._sleep)


@pytest.fixture(scope="module", autouse=True)
def _plait_cuda_built():
    """torch sees a GPU here (the gpu marker); plait must be able to use it too, or every test below is moot."""
    import plait

    C_ = plait._C
    if not C_.cuda_compiled():
        pytest.fail("torch sees a CUDA device but plait was built without CUDA (nvcc not found at build time): "
                    "rebuild on this machine with the CUDA toolkit on PATH", pytrace=False)
    if C_.cuda_device_count() == 0:
        pytest.fail("torch sees a CUDA device but plait's CUDA runtime sees none (driver older than the toolkit "
                    "plait was built with?)", pytrace=False)


# ------------------------------------------------------------------------------------------------------------------
# helpers (run in the worker processes)


def _setup():
    """Every rank on cuda:0: several ranks share one GPU."""
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that torch.cuda._sleep spins for about `seconds` (calibrated with CUDA events)."""
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    n = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(n)
    end.record()
    end.synchronize()
    per_s = n / max(start.elapsed_time(end) / 1e3, 1e-6)
    return int(per_s * seconds)


def _result(c: C.Checker, **extra):
    return dict(failures=c.failures, checks=c.checks, **extra)


def _assert_no_failures(results, min_checks=1):
    failures = [f for r in results for f in r["failures"]]
    checks = sum(r["checks"] for r in results)
    print(f"{checks} checks on {len(results)} ranks")
    assert checks >= min_checks, f"only {checks} checks ran"
    if failures:
        pytest.fail(f"{len(failures)} wrong results, e.g.:\n" + "\n".join(failures[:40]), pytrace=False)


def _rot(items, i, k):
    """k items of `items` starting at position i*k (cyclic)."""
    if k >= len(items):
        return list(items)
    return [items[(i * k + j) % len(items)] for j in range(k)]


# ------------------------------------------------------------------------------------------------------------------
# a. every collective x dtype x op, forced algorithms, exact against the CPU reference


def worker_collectives(rank, ws, dtypes, other_dtypes_per_algo, counts):
    import plait

    _setup()
    vgroup = dist.new_group(backend="gloo")  # verification channel (CPU), independent of plait
    failures, checks, engines = [], 0, {}
    for i, algo in enumerate(ALGOS):
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
        c = C.Checker(label=f"ws={ws} algo={algo} cuda: ")
        C.check_all_reduce(c, g, rank, ws, dtypes, counts, device=DEV)
        C.check_all_reduce(c, g, rank, ws, [torch.int32, torch.bfloat16], [5, 3001], async_batch=False, device=DEV)
        C.check_all_reduce_coalesced(c, g, rank, ws, _rot(dtypes, i, 2), [1, 7, 0, 1003], device=DEV)
        # the other collectives pick their schedule from the group's algo: every one on every algo, over a rotating
        # subset of dtypes (every dtype on the default algo)
        other = dtypes if algo == "auto" else _rot(dtypes, i, other_dtypes_per_algo)
        C.check_other_collectives(c, g, rank, ws, other, counts, device=DEV)
        C.check_random_float_consistency(c, g, vgroup, rank, ws, [1003, 4099] if algo == "auto" else [1003],
                                         device=DEV)
        dist.barrier(group=vgroup)
        engines[algo] = plait.topology(g)["device_engine"]
        failures += c.failures
        checks += c.checks
    # the default group (plait, auto) too
    c = C.Checker(label=f"ws={ws} default group cuda: ")
    C.check_all_reduce(c, None, rank, ws, [torch.float32, torch.int64], [1, 1003], device=DEV)
    C.check_all_gather(c, None, rank, ws, [torch.float16], [1, 1003], device=DEV)
    failures += c.failures
    checks += c.checks
    torch.cuda.synchronize()
    return dict(failures=failures, checks=checks, engines=engines)


def _check_engines(results, ws, want="cuda"):
    for v in results:
        if ws > 1:
            assert set(v["engines"].values()) == {want}, v["engines"]
        else:  # one rank may have nothing to exchange
            assert set(v["engines"].values()) <= {"", want}, v["engines"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_all_collectives_on_gpu(ws):
    dtypes = C.ALL_DTYPES if ws in (2, 3) else [torch.float32, torch.int64, torch.bfloat16, torch.uint8, torch.bool]
    res = H.run_world(worker_collectives, ws, dtypes, 3, COUNTS, timeout_s=570)
    _assert_no_failures(res, min_checks=100 * ws)
    _check_engines(res, ws)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ws", [2, 3, 4])
def test_all_collectives_on_gpu_small_staging(ws):
    # a 4 KiB staging buffer: every message above it is sliced, and collectives that need more grow it
    dtypes = [torch.float32, torch.int64, torch.bfloat16, torch.uint8, torch.float16, torch.int8]
    res = H.run_world(worker_collectives, ws, dtypes, 2, COUNTS + [3001], env=SMALL_STAGING, timeout_s=570)
    _assert_no_failures(res, min_checks=100 * ws)
    _check_engines(res, ws)


# The host path (issue 13) on CUDA tensors: every collective forced through page-locked host memory summed by the
# CPU (one host), and the all-reduce split between the device engine and the host path; small windows and chunks so
# that the copy streams, tickets, fences and joins all run.
HOST_PATH_ENVS = {
    "force": {"PLAIT_HOST_PATH": "force", "PLAIT_HOST_CHUNK_BYTES": "4096", **SMALL_STAGING},
    "split": {"PLAIT_HOST_SHARE": "0.37", "PLAIT_HOST_CHUNK_BYTES": "4096", **SMALL_STAGING},
    "split-big-chunks": {"PLAIT_HOST_SHARE": "0.5"},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", list(HOST_PATH_ENVS))
@pytest.mark.parametrize("ws", [2, 3])
def test_host_path_on_gpu(ws, mode):
    dtypes = [torch.float32, torch.int64, torch.bfloat16, torch.float16, torch.uint8]
    res = H.run_world(worker_collectives, ws, dtypes, 2, COUNTS + [3001], env=HOST_PATH_ENVS[mode], timeout_s=570)
    _assert_no_failures(res, min_checks=100 * ws)
    _check_engines(res, ws, want="cuda host path" if mode == "force" else "cuda")


def worker_host_path_auto(rank, ws):
    import plait

    _setup()
    n = 16 << 20  # 64 MiB of float32: the planner measures the rates at the first all-reduce of 1 MiB or more
    t = torch.full((n,), float(rank + 1), device=DEV)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    ok = bool((t == ws * (ws + 1) / 2).all())
    p = plait.plan_allreduce(4 * n, device=True)
    return dict(ok=ok, rates=plait.topology()["host_path"], share=p.host_share, why=p.host_path_why)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ws", [2, 4])
def test_host_path_auto_on_gpu(ws):
    res = H.run_world(worker_host_path_auto, ws, timeout_s=270)
    assert all(r["ok"] for r in res), res
    assert all(r["rates"]["measured"] for r in res), res
    assert all(r["rates"] == res[0]["rates"] and r["share"] == res[0]["share"] for r in res), "ranks disagree"
    print(f"ws={ws}: host path rates {res[0]['rates']}; 64 MiB share {res[0]['share']}: {res[0]['why']}")


def worker_large(rank, ws):
    """Messages larger than the default 64 MiB staging buffer (sliced), on every algorithm."""
    import plait

    _setup()
    c = C.Checker(label=f"ws={ws} large cuda: ")
    big = {torch.float32: (16 << 20) + 3, torch.bfloat16: (32 << 20) + 1, torch.int64: (8 << 20) + 5}
    ops = {torch.float32: "SUM", torch.bfloat16: "MAX", torch.int64: "SUM"}
    refs = {dt: C.reference(ops[dt], [C.gen(ops[dt], dt, n, r, salt="big") for r in range(ws)], dt)
            for dt, n in big.items()}
    per = (4 << 20) + 1  # all_gather: ws x 16 MiB output
    ag_ref = torch.cat([C.gen("data", torch.float32, per, r, salt="big-ag") for r in range(ws)])
    bc = (16 << 20) + 7
    for algo in ALGOS:
        c.label = f"ws={ws} large cuda algo={algo}: "
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
        for dt, n in big.items():
            t = C.on(C.gen(ops[dt], dt, n, rank, salt="big"), DEV)
            dist.all_reduce(t, op=C.make_op(ops[dt]), group=g)
            c.equal(f"all_reduce {C.dt_name(dt)} n={n} op={ops[dt]}", t, refs[dt])
            del t
        out = torch.full((ws * per,), 7.0, device=DEV)
        dist.all_gather_into_tensor(out, C.on(C.gen("data", torch.float32, per, rank, salt="big-ag"), DEV), group=g)
        c.equal(f"all_gather_into_tensor n={per}", out, ag_ref)
        del out
        t = C.on(C.gen("data", torch.float32, bc, rank, salt="big-bc"), DEV)
        dist.broadcast(t, src=ws - 1, group=g)
        c.equal(f"broadcast n={bc}", t, C.gen("data", torch.float32, bc, ws - 1, salt="big-bc"))
        del t
        torch.cuda.empty_cache()
    return _result(c)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ws", [2, 3, 4])
def test_large_messages_on_gpu(ws):
    _assert_no_failures(H.run_world(worker_large, ws, timeout_s=570), min_checks=20 * ws)


# ------------------------------------------------------------------------------------------------------------------
# b. DDP on cuda:0 over plait vs gloo's CUDA path


def _gpu_mlp(bn: bool):
    import torch.nn as nn

    torch.manual_seed(1234)
    layers = [nn.Linear(16, 32), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm1d(32))  # buffers: DDP broadcasts them from rank 0 every step
    layers += [nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)]
    return nn.Sequential(*layers).to(DEV)


def _train_ddp_gpu(pg, rank, steps, ddp_kwargs, bn):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_gpu_mlp(bn), device_ids=[0] if DEV == "cuda" else None, process_group=pg, **ddp_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(8, 16, generator=g).to(DEV)  # a fixed batch per rank: the loss must go down
    y = torch.randn(8, 4, generator=g).to(DEV)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    return [p.detach().cpu() for p in model.module.parameters()], \
        [b.detach().cpu() for b in model.module.buffers()], losses


def worker_ddp_gpu(rank, ws, steps, ddp_kwargs, bn):
    _setup()
    gloo = dist.new_group(backend="gloo")
    p_plait, b_plait, l_plait = _train_ddp_gpu(dist.group.WORLD, rank, steps, ddp_kwargs, bn)
    p_gloo, b_gloo, l_gloo = _train_ddp_gpu(gloo, rank, steps, ddp_kwargs, bn)
    mine = torch.cat([p.reshape(-1).to(torch.float64) for p in p_plait])
    outs = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(outs, mine, group=gloo)  # CPU tensors over gloo
    return {"plait": p_plait, "gloo": p_gloo, "bufs_plait": b_plait, "bufs_gloo": b_gloo, "loss_plait": l_plait,
            "loss_gloo": l_gloo, "same_across_ranks": all(torch.equal(o, outs[0]) for o in outs)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "ws,ddp_kwargs,bn",
    [
        (2, {}, True),
        (3, dict(bucket_cap_mb=0.001, gradient_as_bucket_view=True), False),
        (4, dict(bucket_cap_mb=0.002), True),
    ],
    ids=["2r-bn", "3r-tinybuckets", "4r-buckets-bn"],
)
def test_ddp_parity_with_gloo_on_gpu(ws, ddp_kwargs, bn):
    results = H.run_world(worker_ddp_gpu, ws, 10, ddp_kwargs, bn, timeout_s=280)
    for r, res in enumerate(results):
        assert res["same_across_ranks"], f"DDP (plait, cuda) parameters differ bitwise between ranks (seen on rank {r})"
        for i, (a, b) in enumerate(zip(res["plait"], res["gloo"])):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), \
                f"rank {r} parameter {i}: plait vs gloo max diff {(a - b).abs().max().item()}"
        for i, (a, b) in enumerate(zip(res["bufs_plait"], res["bufs_gloo"])):
            assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), \
                f"rank {r} buffer {i}: plait vs gloo max diff {(a.double() - b.double()).abs().max().item()}"
        assert res["loss_plait"][-1] < res["loss_plait"][0], "training over plait did not reduce the loss"


# ------------------------------------------------------------------------------------------------------------------
# c, d. stream semantics: the host does not wait for the GPU; async work, futures; tensors freed after the call


def worker_stream_not_blocked(rank, ws):
    _setup()
    ctl = dist.new_group(backend="gloo")
    n = (1 << 20) + 3
    want = float(sum(r + 1 for r in range(ws)))
    t = torch.zeros(n, device=DEV)
    dist.all_reduce(t)  # warm-up: connections, staging buffers, communication stream
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    torch.cuda.synchronize()
    cycles = _sleep_cycles(SLEEP_S)
    s = torch.cuda.current_stream()
    out = {}

    # synchronous call
    t.fill_(-1000.0)
    torch.cuda.synchronize()
    dist.barrier(group=ctl)
    torch.cuda._sleep(cycles)
    t.fill_(float(rank + 1))  # queued after the sleep on the caller's stream: the collective must see it
    t0 = time.perf_counter()
    dist.all_reduce(t)
    out["sync_call_s"] = time.perf_counter() - t0  # reported, not asserted
    out["sync_returned_while_stream_busy"] = not s.query()
    doubled = t * 2  # queued after the call: must see the result
    torch.cuda.synchronize()
    out["sync_exact"] = torch.equal(t.cpu(), torch.full((n,), want))
    out["sync_ordered_after"] = torch.equal(doubled.cpu(), torch.full((n,), 2 * want))

    # async call, then wait(): the caller's stream waits, the host does not
    t.fill_(-1000.0)
    torch.cuda.synchronize()
    dist.barrier(group=ctl)
    torch.cuda._sleep(cycles)
    t.fill_(float(rank + 1))
    w = dist.all_reduce(t, async_op=True)
    out["async_not_completed_while_stream_busy"] = not w.is_completed()
    t0 = time.perf_counter()
    w.wait()
    out["wait_s"] = time.perf_counter() - t0
    out["wait_returned_while_stream_busy"] = not s.query()
    doubled = t * 2
    torch.cuda.synchronize()
    out["async_completed_after_sync"] = w.is_completed()
    out["async_exact"] = torch.equal(t.cpu(), torch.full((n,), want))
    out["async_ordered_after"] = torch.equal(doubled.cpu(), torch.full((n,), 2 * want))
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_caller_stream_not_blocked(ws):
    res = H.run_world(worker_stream_not_blocked, ws, timeout_s=220)
    for r, v in enumerate(res):
        print(f"rank {r}: all_reduce returned after {v['sync_call_s'] * 1e3:.2f} ms, wait() after "
              f"{v['wait_s'] * 1e3:.2f} ms (caller's stream busy for ~{SLEEP_S} s)")
        bad = {k: x for k, x in v.items() if isinstance(x, bool) and not x}
        assert not bad, f"rank {r}: {sorted(bad)} false: {v}"


def worker_async_and_futures(rank, ws):
    _setup()
    c = C.Checker(label=f"ws={ws} async cuda: ")
    cases = [(torch.float32, "SUM", 1003), (torch.int64, "MAX", (1 << 18) + 1), (torch.bfloat16, "SUM", 77),
             (torch.float16, "PRODUCT", 4099)]
    # several collectives in flight, waited in reverse order; a Future.then chained on each
    pending = []
    for dt, op, n in cases:
        t = C.on(C.gen(op, dt, n, rank, salt="async"), DEV)
        w = dist.all_reduce(t, op=C.make_op(op), async_op=True)
        fut = w.get_future().then(lambda f: f.value()[0].to(torch.float64) * 2 + 1)
        pending.append((dt, op, n, t, w, fut))
    for dt, op, n, t, w, fut in reversed(pending):
        w.wait()
        exp = C.reference(op, [C.gen(op, dt, n, r, salt="async") for r in range(ws)], dt)
        c.equal(f"async all_reduce {C.dt_name(dt)} n={n} op={op}", t, exp)
        got = fut.wait()  # a CUDA-aware future: the caller's stream waits for the callback's work
        c.equal(f"future.then on all_reduce {C.dt_name(dt)} n={n} op={op}", got, exp.to(torch.float64) * 2 + 1)
    # Future.then without waiting on the Work first
    t = C.on(C.gen("SUM", torch.int32, 5000, rank, salt="fut"), DEV)
    fut = dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0] + 1)
    exp = C.reference("SUM", [C.gen("SUM", torch.int32, 5000, r, salt="fut") for r in range(ws)], torch.int32)
    c.equal("future.then without wait", fut.wait(), exp + 1)
    # async all_gather / reduce_scatter (out of place)
    n = 2049
    ag_out = torch.full((ws * n,), 9, dtype=torch.int32, device=DEV)
    w1 = dist.all_gather_into_tensor(ag_out, C.on(C.gen("data", torch.int32, n, rank, salt="aag"), DEV),
                                     async_op=True)
    rs_in = [C.gen("SUM", torch.float32, ws * n, r, salt="ars") for r in range(ws)]
    rs_out = torch.full((n,), 9.0, device=DEV)
    w2 = dist.reduce_scatter_tensor(rs_out, C.on(rs_in[rank], DEV), async_op=True)
    w2.wait()
    w1.wait()
    c.equal("async all_gather_into_tensor",
            ag_out, torch.cat([C.gen("data", torch.int32, n, r, salt="aag") for r in range(ws)]))
    c.equal("async reduce_scatter_tensor", rs_out,
            C.reference("SUM", rs_in, torch.float32)[rank * n:(rank + 1) * n])
    torch.cuda.synchronize()
    return _result(c)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_async_work_and_futures(ws):
    _assert_no_failures(H.run_world(worker_async_and_futures, ws, timeout_s=220), min_checks=11 * ws)


def worker_freed_after_call(rank, ws):
    """Tensors dropped right after the call must stay alive (record_stream) until the communication stream is done.

    Rank 0 holds its stream back (a sleep) ahead of a first all-reduce, so every rank's communication stream waits
    inside that all-reduce for rank 0 and runs the calls after it late, while the host and the caller's stream go
    on. Each rank then passes tensors to async collectives, drops them at once (and the Work, for the in-place
    all-reduce), and allocates the same size again, filled with garbage on the caller's stream. Without
    record_stream the caching allocator would hand the freed block straight back (nothing else of that size is
    cached) and the garbage would be what the collective reads: rank 0's kept all-reduce result (the sum of every
    rank's dropped input) would be wrong, and so would the outputs of the out-of-place collectives. Between the
    barrier and the final wait no call here makes the host wait for the GPU.
    """
    _setup()
    ctl = dist.new_group(backend="gloo")
    n = 1 << 20
    f32 = torch.float32
    # warm-up at every size used below, so no staging buffer grows (growth is collective) during the test
    w = torch.ones(n, device=DEV)
    dist.all_reduce(w)
    dist.all_gather_into_tensor(torch.empty(ws * n, device=DEV), w)
    dist.reduce_scatter_tensor(torch.empty(n, device=DEV), torch.ones(ws * n, device=DEV))
    torch.cuda.synchronize()
    del w
    torch.cuda.empty_cache()  # no cached free blocks: a block freed below is the one the next allocation would get
    cycles = _sleep_cycles(SLEEP_S)
    # everything the calls read is on the device before the clock starts (a host-to-device copy would wait)
    first = torch.ones(n, device=DEV)
    tmp = C.on(C.gen("SUM", f32, n, rank, salt="tmp"), DEV)
    ag_in = C.on(C.gen("data", f32, n, rank, salt="ag"), DEV)
    rs_in = C.on(C.gen("SUM", f32, ws * n, rank, salt="rs"), DEV)
    ag_out = torch.full((ws * n,), 7.0, device=DEV)
    rs_out = torch.full((n,), 3.0, device=DEV)
    torch.cuda.synchronize()
    c = C.Checker(label=f"ws={ws} freed-after-call: ")
    early = {}
    dist.barrier(group=ctl)

    if rank == 0:
        torch.cuda._sleep(cycles)
    w_first = dist.all_reduce(first, async_op=True)  # rank 0 joins ~SLEEP_S late on the GPU

    # after each drop, exactly one allocation of the dropped size: it would get the freed block if not protected
    garbage = []
    ptr = tmp.data_ptr()
    w_tmp = dist.all_reduce(tmp, async_op=True)
    if rank == 0:
        keep = tmp  # rank 0 keeps its tensor (and the Work); the others drop both
    else:
        keep = None
        del tmp, w_tmp
        garbage.append(torch.full((n,), 12345.0, device=DEV))
        early["all_reduce input"] = garbage[-1].data_ptr() == ptr

    ptr = ag_in.data_ptr()
    w_ag = dist.all_gather_into_tensor(ag_out, ag_in, async_op=True)
    del ag_in
    garbage.append(torch.full((n,), -777.0, device=DEV))
    early["all_gather_into_tensor input"] = garbage[-1].data_ptr() == ptr

    ptr = rs_in.data_ptr()
    w_rs = dist.reduce_scatter_tensor(rs_out, rs_in, async_op=True)
    del rs_in
    garbage.append(torch.full((ws * n,), 999.0, device=DEV))
    early["reduce_scatter_tensor input"] = garbage[-1].data_ptr() == ptr
    garbage += [torch.full((n,), 4242.0, device=DEV) for _ in range(3)]

    for work in [w_first, w_ag, w_rs] + ([w_tmp] if rank == 0 else []):
        work.wait()
    torch.cuda.synchronize()

    c.equal("first all_reduce", first, torch.full((n,), float(ws)))
    if rank == 0:
        c.equal("all_reduce summing the other ranks' dropped inputs", keep,
                C.reference("SUM", [C.gen("SUM", f32, n, r, salt="tmp") for r in range(ws)], f32))
    c.equal("all_gather_into_tensor with a dropped input", ag_out,
            torch.cat([C.gen("data", f32, n, r, salt="ag") for r in range(ws)]))
    c.equal("reduce_scatter_tensor with a dropped input", rs_out,
            C.reference("SUM", [C.gen("SUM", f32, ws * n, r, salt="rs") for r in range(ws)], f32)[rank * n:
                                                                                                (rank + 1) * n])
    for g in garbage:  # the garbage itself was not overwritten by a late collective either
        v = g.view(-1)[0].item()
        if v not in (12345.0, -777.0, 999.0, 4242.0) or not torch.equal(g, torch.full_like(g, v)):
            c.fail(f"a tensor allocated after the calls was overwritten (first element {v})")
    return _result(c, early=early)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_tensors_freed_right_after_the_call(ws):
    res = H.run_world(worker_freed_after_call, ws, timeout_s=220)
    _assert_no_failures(res, min_checks=3 * ws)
    early = [(r, what) for r, v in enumerate(res) for what, hit in v["early"].items() if hit]
    assert not early, (f"the caching allocator handed out the block of a tensor passed to a collective while the "
                       f"communication stream could still read it (not recorded on that stream?): {early}")


# ------------------------------------------------------------------------------------------------------------------
# e. send / recv, batch_isend_irecv


P2P_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
P2P_COUNTS = [1, 1003, (1 << 20) + 3]


def worker_p2p(rank, ws):
    _setup()
    c = C.Checker(label=f"ws={ws} p2p cuda: ")
    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    for dt in P2P_DTYPES:
        for n in P2P_COUNTS:
            # a ring exchange in one batch
            src = C.on(C.gen("data", dt, n, rank, salt="ring"), DEV)
            dst = torch.full((n,), 3, dtype=dt, device=DEV)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, src, nxt), dist.P2POp(dist.irecv, dst, prv)])
            for q in reqs:
                q.wait()
            c.equal(f"batch_isend_irecv ring {C.dt_name(dt)} n={n} from {prv}", dst,
                    C.gen("data", dt, n, prv, salt="ring"))
            # blocking ping-pong 0 <-> 1
            if rank in (0, 1):
                peer = 1 - rank
                mine = C.on(C.gen("data", dt, n, rank, salt="pp"), DEV)
                got = torch.full((n,), 5, dtype=dt, device=DEV)
                if rank == 0:
                    dist.send(mine, dst=peer)
                    dist.recv(got, src=peer)
                else:
                    dist.recv(got, src=peer)
                    dist.send(mine, dst=peer)
                c.equal(f"send/recv {C.dt_name(dt)} n={n} from {peer}", got, C.gen("data", dt, n, peer, salt="pp"))
    # several tagged isend / irecv in flight between every pair, the sends' tensors dropped at once
    reqs, recvs = [], []
    for peer in range(ws):
        if peer == rank:
            continue
        for tag in range(3):
            n = 100 + 37 * tag + peer
            reqs.append(dist.isend(C.on(C.gen("data", torch.int32, n, rank, salt=("tag", tag, peer)), DEV),
                                   dst=peer, tag=tag))
            buf = torch.full((100 + 37 * tag + rank,), -1, dtype=torch.int32, device=DEV)
            reqs.append(dist.irecv(buf, src=peer, tag=tag))
            recvs.append((peer, tag, buf))
    for q in reqs:
        q.wait()
    for peer, tag, buf in recvs:
        c.equal(f"isend/irecv tag={tag} from {peer}", buf,
                C.gen("data", torch.int32, 100 + 37 * tag + rank, peer, salt=("tag", tag, rank)))
    torch.cuda.synchronize()
    return _result(c)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ws", [2, 3, 4])
def test_send_recv_on_gpu(ws):
    _assert_no_failures(H.run_world(worker_p2p, ws, timeout_s=280), min_checks=15 * ws)


def worker_irecv_across_cuda_collectives(rank, ws):
    """Issue 10 item 1: an irecv on a CUDA tensor stays in flight while CUDA all-reduces run on the same group (the
    device engine's transfers must not free the point-to-point one)."""
    dev = _setup()
    n = 4099
    sums = []
    if rank == 1:
        r = torch.zeros(n, dtype=torch.int64, device=dev)
        w = dist.irecv(r, 0)
    for i in range(4):
        t = torch.full((1000 + i,), float(i + rank), device=dev)
        dist.all_reduce(t)
        sums.append(float(t.sum()))
    dist.barrier()
    if rank == 0:
        dist.send(torch.arange(n, device=dev) * 3, 1)
        return dict(ok=True, sums=sums)
    w.wait()
    torch.cuda.synchronize()
    return dict(ok=bool(torch.equal(r.cpu(), torch.arange(n) * 3)), sums=sums)


@pytest.mark.timeout(300)
def test_irecv_survives_cuda_collectives():
    res = H.run_world(worker_irecv_across_cuda_collectives, 2, timeout_s=280)
    want = [float((1000 + i) * (2 * i + 1)) for i in range(4)]
    for v in res:
        assert v["ok"] and v["sums"] == want, v


# ------------------------------------------------------------------------------------------------------------------
# f. ranks on different (fake) hosts: CUDA tensors staged through host memory


def worker_hosts(rank, ws):
    import plait

    _setup()
    failures, checks, engines = [], 0, {}
    for algo in ["auto", "ring", "tree", "direct", "hier"]:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo, chunk_bytes=4096))
        c = C.Checker(label=f"ws={ws} hosts algo={algo} cuda: ")
        dts = [torch.float32, torch.int64, torch.bfloat16, torch.uint8] if algo in ("auto", "hier") else \
            [torch.float32, torch.int32]
        C.check_all_reduce(c, g, rank, ws, dts, [0, 1, 7, 1003, 70001], device=DEV)
        C.check_all_reduce(c, g, rank, ws, [torch.float16], [5, 3001], async_batch=False, device=DEV)
        C.check_all_gather(c, g, rank, ws, dts, [0, 1, 7, 1003, 70001], device=DEV)
        engines[algo] = plait.topology(g)["device_engine"]
        failures += c.failures
        checks += c.checks
    torch.cuda.synchronize()
    return dict(failures=failures, checks=checks, engines=engines)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [(0, 1), (0, 0, 1, 1), (0, 1, 1), (0, 1, 0, 1)],
                         ids=lambda l: "hosts" + "".join(map(str, l)))
def test_fake_hosts_stage_cuda_tensors_through_host_memory(layout):
    env = {r: {"PLAIT_HOST_ID": f"fakehost{h}"} for r, h in enumerate(layout)}
    res = H.run_world(worker_hosts, len(layout), rank_env=env, timeout_s=280)
    _assert_no_failures(res, min_checks=100)
    _check_engines(res, len(layout), want="cuda via host")


# ------------------------------------------------------------------------------------------------------------------
# g. errors




def worker_mixed_devices(rank, ws):
    _setup()
    msgs = {}
    cpu4, cuda4 = torch.ones(4), torch.ones(4, device=DEV)
    msgs["all_gather_into_tensor cuda<-cpu"] = H.expect_raise(
        lambda: dist.all_gather_into_tensor(torch.zeros(ws * 4, device=DEV), cpu4), "cpu", "cuda")
    msgs["all_gather_into_tensor cpu<-cuda"] = H.expect_raise(
        lambda: dist.all_gather_into_tensor(torch.zeros(ws * 4), cuda4), "cpu", "cuda")
    msgs["reduce_scatter_tensor"] = H.expect_raise(
        lambda: dist.reduce_scatter_tensor(torch.zeros(4), torch.ones(ws * 4, device=DEV)), "cpu", "cuda")
    msgs["all_gather list"] = H.expect_raise(
        lambda: dist.all_gather([torch.zeros(4, device=DEV) for _ in range(ws)], cpu4), "cpu", "cuda")
    msgs["all_to_all_single"] = H.expect_raise(
        lambda: dist.all_to_all_single(torch.zeros(ws * 4, device=DEV), torch.ones(ws * 4)), "cpu", "cuda")
    assert hasattr(dist, "all_reduce_coalesced"), f"torch {torch.__version__} has no dist.all_reduce_coalesced"
    msgs["all_reduce_coalesced"] = H.expect_raise(
        lambda: dist.all_reduce_coalesced([torch.ones(4), torch.ones(4, device=DEV)]), "cpu", "cuda")
    # the group still works, on both devices
    x = torch.full((7,), float(rank + 1), device=DEV)
    dist.all_reduce(x)
    y = torch.full((7,), float(rank + 1))
    dist.all_reduce(y)
    want = float(sum(r + 1 for r in range(ws)))
    assert torch.equal(x.cpu(), torch.full((7,), want)), f"group unusable on CUDA after rejected calls: {x}"
    assert torch.equal(y, torch.full((7,), want)), f"group unusable on CPU after rejected calls: {y}"
    return msgs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [1, 2])
def test_mixed_cpu_and_cuda_tensors_rejected(ws):
    res = H.run_world(worker_mixed_devices, ws, timeout_s=100)
    for msgs in res:
        for what, m in msgs.items():
            assert "plait" in m.lower(), f"{what}: not plait's error: {m!r}"


def worker_size_mismatch(rank, ws):
    _setup()
    dist.all_reduce(torch.ones(4, device=DEV))
    torch.cuda.synchronize()
    t = torch.ones(1000 + 300 * rank, device=DEV)  # every rank a different size
    dist.all_reduce(t)
    # The device flags the disagreement (it cannot throw); the host sees it at a later call. Keep calling (without
    # synchronizing the device, whose stream may wait on a transfer that will never match) for a bounded time.
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        time.sleep(0.05)
        dist.all_reduce(torch.ones(4, device=DEV))
    return "no error"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("ws", [2, 3])
def test_device_size_mismatch_raises(ws):
    res = H.run_world(worker_size_mismatch, ws, expect_fail=True, pg_timeout_s=30, timeout_s=150,
                      shutdown_grace_s=20)
    summary = "\n".join(r.describe() for r in res)
    assert not any(r.hung for r in res), f"a rank hung:\n{summary}\n" + "\n".join(r.log[-2000:] for r in res if r.hung)
    # Every rank must raise (not only the first to notice), naming the size disagreement and the peer it saw it with.
    for r in res:
        assert r.reported and not r.ok, f"rank {r.rank} did not raise on the size mismatch:\n{summary}"
        assert "different number of bytes" in (r.exc_msg or ""), \
            f"rank {r.rank}'s error does not name the size mismatch:\n{summary}"
        assert "DistBackendError" in r.exc_mro, f"rank {r.rank} raised {r.exc_type}, not DistBackendError"
        assert "peer rank" in r.exc_msg, f"rank {r.rank}'s error does not name the peer: {r.exc_msg}"
