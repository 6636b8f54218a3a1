"""The host path for device tensors, on machines without a GPU (PLAIT_DEVICE=emulate).

On one host a share of each device all-reduce (all of every device collective with PLAIT_HOST_PATH=force) is
downloaded into page-locked staging that the local ranks share, summed there by the CPU, and uploaded back, chunk by
chunk on two copy streams; groups across hosts stage device buffers through private host memory for the host engine.
These tests check, exactly against torch references on integer-valued data:

  - every collective forced through the host path, with tiny staging windows and chunks (many windows and chunks);
  - all-reduces split between the device engine and the host path (PLAIT_HOST_SHARE), with the bytes each path
    summed (topology()'s counters) exactly floor(count x share) elements through the host;
  - the same with asynchronous emulated copy engines (PLAIT_EMU_PCIE_GBPS: downloads and uploads on their own threads
    taking time, so the pipeline's waits matter), on one host and across (fake) hosts;
  - that random float data reduces to bitwise the same result on every rank, forced and split;
  - auto mode: the rates are measured at the first all-reduce of 1 MiB or more, identically on every rank, and the
    group's split agrees with plait.plan_host_path on those rates; nothing is measured below 1 MiB;
  - the planner's formula on hand-computed cases, and the knobs (off / force / share / bad values);
  - a rank dying mid host-path transfer: every survivor raises naming it, and nothing is left in /dev/shm.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

import _collcheck as C
import _harness as H
from test_device import COUNTS

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="the host path is plait's")

# 4 KiB staging windows and host chunks: every collective above a few hundred elements takes many windows / chunks.
SMALL = {"PLAIT_DEVICE": "emulate", "PLAIT_DEVICE_BUFFER_BYTES": "4096", "PLAIT_HOST_CHUNK_BYTES": "4096"}
FORCE = {**SMALL, "PLAIT_HOST_PATH": "force"}
# COUNTS: 0, 1, 7, 1003, 2500 (2500 x 8 B: 5 chunks of 4 KiB); PATH_CALLS below add ~40 chunks (20011 x 8 B)
PCIE = {"PLAIT_EMU_PCIE_GBPS": "2"}  # emulated copy engines: each download / upload takes bytes / (2 GB/s)
FOUR = [torch.float32, torch.int64, torch.float16, torch.bfloat16]


def _hosts(layout):
    return {r: {"PLAIT_HOST_ID": f"fakehost{h}"} for r, h in enumerate(layout)}


def _layout_id(layout):
    return "hosts" + "".join(map(str, layout))


def worker_collectives(rank, ws, dtypes, algos, other_dtypes, others_on=("auto", "ring")):
    """all_reduce (every op, async batches and blocking), all_reduce_coalesced on every algo; the other collectives
    on the algos in `others_on`; returns the failures and the device engine each group ran on."""
    import plait

    failures, checks, engines = [], 0, {}
    for algo in algos:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
        c = C.Checker(label=f"ws={ws} algo={algo}: ")
        C.check_all_reduce(c, g, rank, ws, dtypes, COUNTS)
        C.check_all_reduce(c, g, rank, ws, [torch.int32], [5, 3001], async_batch=False)
        C.check_all_reduce_coalesced(c, g, rank, ws, dtypes[:2], [1, 7, 0, 1003])
        if algo in others_on and other_dtypes:
            C.check_other_collectives(c, g, rank, ws, other_dtypes, COUNTS)
        engines[algo] = plait.topology(g)["device_engine"]
        failures += c.failures
        checks += c.checks
    # what the default group's planner says for a large device all-reduce under these knobs
    plan = _plan(plait.plan_allreduce(64 << 20, device=True))
    # which path summed which bytes: known all-reduces on a fresh group, against the share in the parent
    g = dist.new_group(backend="plait")
    for dt, n in PATH_CALLS:
        t = C.gen("SUM", dt, n, rank, salt="paths")
        dist.all_reduce(t, group=g)
        c = C.Checker(label=f"ws={ws} path bytes: ")
        c.equal(f"all_reduce {C.dt_name(dt)} n={n}", t,
                C.reference("SUM", [C.gen("SUM", dt, n, r, salt="paths") for r in range(ws)], dt))
        failures += c.failures
    topo = plait.topology(g)
    paths = (topo["device_engine_bytes"], topo["host_path_bytes"])
    return dict(failures=failures, checks=checks, engines=engines, plan=plan, paths=paths)


PATH_CALLS = [(torch.float32, 1), (torch.float32, 1003), (torch.float64, 20011), (torch.bfloat16, 7), (torch.int64, 0),
              (torch.float16, 30001)]


def _expected_paths(share):
    """(device engine bytes, host path bytes) of PATH_CALLS with `share` through the host path: the host takes
    floor(count * share) elements of each all-reduce."""
    dev = host = 0
    for dt, n in PATH_CALLS:
        es = torch.empty((), dtype=dt).element_size()
        nh = min(n, math.floor(n * share))
        dev, host = dev + (n - nh) * es, host + nh * es
    return dev, host


def _plan(p):
    return dict(host_share=p.host_share, host_path_us=p.host_path_us, device_only_us=p.device_only_us,
                host_only_us=p.host_only_us, why=p.host_path_why)


def _assert_clean(res, engines, share, why, min_checks=100):
    for v in res:
        assert v["failures"] == [], v["failures"][:10]
        assert v["checks"] > min_checks, v["checks"]
        assert set(v["engines"].values()) == engines, v["engines"]
        assert v["plan"]["host_share"] == share and why in v["plan"]["why"], v["plan"]
        assert v["plan"] == res[0]["plan"]
        assert v["paths"] == _expected_paths(share), (v["paths"], _expected_paths(share))


# ---------------------------------------------------------------------------------------------------------------
# 1. every collective through the host path (PLAIT_HOST_PATH=force)


@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_forced_host_path_all_collectives(ws):
    if ws in (2, 3):
        dts, algos, others = C.ALL_DTYPES, ["auto", "ring", "tree", "direct"], [torch.float32, torch.bfloat16,
                                                                                  torch.int64]
    else:
        dts, algos, others = FOUR, ["auto", "ring"], [torch.float32, torch.int64]
    res = H.run_world(worker_collectives, ws, dts, algos, others, env=FORCE, timeout_s=300)
    _assert_clean(res, {"emulated host path"}, 1.0, "PLAIT_HOST_PATH=force")  # alone too (ws=1)


# ---------------------------------------------------------------------------------------------------------------
# 2. all-reduces split between the device engine and the host path (PLAIT_HOST_SHARE)


@pytest.mark.parametrize("ws,share", [(2, "1.0"), (3, "0.37"), (3, "1.0"), (4, "0.37")])
def test_split_with_device_engine(ws, share):
    dts = FOUR if ws != 3 else C.ALL_DTYPES
    others = [torch.float32, torch.int64] if ws == 3 and share == "0.37" else []  # not split: they just still work
    env = {**SMALL, "PLAIT_HOST_SHARE": share}
    algos = ["auto", "direct"] if ws == 3 else ["auto"]
    res = H.run_world(worker_collectives, ws, dts, algos, others, env=env, timeout_s=300)
    _assert_clean(res, {"emulated"}, float(share), f"PLAIT_HOST_SHARE={float(share):g}")


# ---------------------------------------------------------------------------------------------------------------
# 3. asynchronous emulated copy engines (PLAIT_EMU_PCIE_GBPS), one host and across fake hosts


@pytest.mark.parametrize("mode", ["force", "split"])
def test_emulated_pcie_one_host(mode):
    env = {**SMALL, **PCIE, **({"PLAIT_HOST_PATH": "force"} if mode == "force" else {"PLAIT_HOST_SHARE": "0.37"})}
    res = H.run_world(worker_collectives, 3, FOUR, ["auto"], [torch.float32, torch.int64], env=env, timeout_s=300)
    if mode == "force":
        _assert_clean(res, {"emulated host path"}, 1.0, "PLAIT_HOST_PATH=force")
    else:
        _assert_clean(res, {"emulated"}, 0.37, "PLAIT_HOST_SHARE=0.37")


@pytest.mark.parametrize("layout", [(0, 1, 0, 1), (0, 0, 1)], ids=_layout_id)
def test_emulated_pcie_across_hosts(layout):
    res = H.run_world(worker_collectives, len(layout), FOUR, ["auto"], [torch.float32, torch.float16],
                      env={**SMALL, **PCIE}, rank_env=_hosts(layout), timeout_s=300)
    _assert_clean(res, {"emulated via host"}, 1.0, "spans hosts")


# ---------------------------------------------------------------------------------------------------------------
# 4. random float data: bitwise the same result on every rank


RANDOM_COUNTS = [1, 1003, 20011, 50003]


def worker_random(rank, ws, algos):
    """all_reduce of random (non-integer) data; returns {(algo, dtype, op, n): sha256 of the result} and the worst
    error against the float64 reference."""
    import plait

    hashes, worst = {}, 0.0
    for algo in algos:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
        for dt in [torch.float32, torch.bfloat16]:
            for op in ["SUM", "AVG"]:
                for n in RANDOM_COUNTS:
                    xs = [torch.randn(n, generator=torch.Generator().manual_seed(C._seed("rnd", algo, n, r, op)))
                          .to(dt) for r in range(ws)]
                    t = xs[rank].clone()
                    dist.all_reduce(t, op=C.make_op(op), group=g)
                    hashes[(algo, C.dt_name(dt), op, n)] = hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()
                    ref = torch.stack([x.double() for x in xs]).sum(0) / (ws if op == "AVG" else 1)
                    tol = 1e-5 if dt == torch.float32 else 2e-2
                    err = ((t.double() - ref).abs() / (ref.abs() + 1)).max().item()
                    worst = max(worst, err / tol)
    return dict(hashes=hashes, worst=worst, engine=plait.topology(g)["device_engine"])


@pytest.mark.parametrize("mode", ["force", "split", "via-host"])
def test_random_floats_bitwise_identical_on_every_rank(mode):
    env, rank_env, ws, engine = dict(SMALL), None, 3, "emulated"
    if mode == "force":
        env["PLAIT_HOST_PATH"], engine = "force", "emulated host path"
    elif mode == "split":
        env["PLAIT_HOST_SHARE"] = "0.37"
    else:
        rank_env, engine = _hosts((0, 0, 1)), "emulated via host"
    res = H.run_world(worker_random, ws, ["ring", "direct"], env=env, rank_env=rank_env, timeout_s=300)
    assert len(res[0]["hashes"]) == 2 * 2 * 2 * len(RANDOM_COUNTS)
    for r, v in enumerate(res):
        assert v["engine"] == engine, v["engine"]
        assert v["worst"] <= 1.0, f"rank {r}: error {v['worst']} x the tolerance against the float64 reference"
        diff = [k for k in v["hashes"] if v["hashes"][k] != res[0]["hashes"][k]]
        assert not diff, f"rank {r}'s results differ bitwise from rank 0's for {diff[:8]}"


# ---------------------------------------------------------------------------------------------------------------
# 5. auto mode: measured once at the first all-reduce of 1 MiB or more, identically on every rank


AUTO_SMALL = [1000, (1 << 18) - 1]  # float32; (2^18 - 1) x 4 B: just below 1 MiB
AUTO_BIG = [1 << 20, (3 << 20) + 5]  # float32: 4 MiB (measures), then 12 MiB + 20 B


def worker_auto(rank, ws):
    import plait

    c = C.Checker(label=f"ws={ws} auto: ")
    out = {}
    # below 1 MiB only: nothing is measured, the host path takes nothing
    for n in AUTO_SMALL:
        t = C.gen("SUM", torch.float32, n, rank)
        dist.all_reduce(t)
        c.equal(f"small all_reduce n={n}", t, C.reference("SUM", [C.gen("SUM", torch.float32, n, r)
                                                                    for r in range(ws)], torch.float32))
    topo = plait.topology()
    out["before"] = dict(rates=topo["host_path"], measurements=topo["host_path_measurements"],
                         paths=(topo["device_engine_bytes"], topo["host_path_bytes"]),
                         small=_plan(plait.plan_allreduce((1 << 20) - 4, device=True)),
                         big=_plan(plait.plan_allreduce(64 << 20, device=True)))
    # 4 MiB: measures the rates, then runs with the planned split; then an odd size with the same rates
    for n in AUTO_BIG:
        t = C.gen("SUM", torch.float32, n, rank, salt="auto")
        dist.all_reduce(t)
        c.equal(f"all_reduce n={n}", t, C.reference("SUM", [C.gen("SUM", torch.float32, n, r, salt="auto")
                                                            for r in range(ws)], torch.float32))
    topo = plait.topology()
    out["after"] = dict(rates=topo["host_path"], engine=topo["device_engine"],
                        measurements=topo["host_path_measurements"],
                        paths=(topo["device_engine_bytes"], topo["host_path_bytes"]),
                        plans={m: _plan(plait.plan_allreduce(m, device=True))
                               for m in [(1 << 20) - 4, 4 << 20, 64 << 20]})
    out["failures"] = c.failures
    return out


@pytest.mark.parametrize("ws,pcie", [(2, False), (3, True)], ids=["ws2", "ws3-pcie"])
def test_auto_mode_measures_once_and_agrees(ws, pcie):
    import plait

    env = {"PLAIT_DEVICE": "emulate", **(PCIE if pcie else {})}
    res = H.run_world(worker_auto, ws, env=env, timeout_s=300)
    for r, v in enumerate(res):
        assert v["failures"] == [], v["failures"]
        b = v["before"]
        assert b["rates"]["measured"] is False, b["rates"]
        assert b["small"]["host_share"] == 0 and "below" in b["small"]["why"], b["small"]
        assert b["big"]["host_share"] == 0 and "not measured" in b["big"]["why"], b["big"]
        assert b["measurements"] == 0 and b["paths"] == (4 * sum(AUTO_SMALL), 0), b
        a = v["after"]
        assert a["engine"] == "emulated", a["engine"]
        rates = a["rates"]
        assert rates["measured"] is True, rates
        for k in ["pcie_gbps", "sum_gbps", "path_gbps", "device_gbps"]:
            assert rates[k] > 0 and math.isfinite(rates[k]), rates
        assert rates["host_call_us"] >= 0 and rates["device_call_us"] >= 0, rates
        if pcie:  # the modelled link: downloads and uploads at once, each at 2 GB/s at most
            assert rates["pcie_gbps"] <= 2.2, rates
        # every rank the same rates and the same split (a disagreement would deadlock or corrupt)
        assert rates == res[0]["after"]["rates"], (r, rates, res[0]["after"]["rates"])
        assert a["plans"] == res[0]["after"]["plans"], (r, a["plans"], res[0]["after"]["plans"])
        assert a["plans"][(1 << 20) - 4]["host_share"] == 0 and "below" in a["plans"][(1 << 20) - 4]["why"]
    # the group's split is the planner's on the measured rates
    rates = res[0]["after"]["rates"]

    def planned(m):
        return plait.plan_host_path(m, rates["pcie_gbps"], rates["sum_gbps"], rates["device_gbps"],
                                    rates["host_call_us"], rates["device_call_us"], rates["path_gbps"])

    for m in [4 << 20, 64 << 20]:
        p = planned(m)
        got = res[0]["after"]["plans"][m]
        assert (p.share, p.predicted_us, p.device_only_us, p.host_only_us, p.why) == \
            (got["host_share"], got["host_path_us"], got["device_only_us"], got["host_only_us"], got["why"])
        assert 0 <= p.share <= 1
    # measured once, at the first all-reduce of 1 MiB or more, and each large all-reduce was split as planned
    host = sum(4 * math.floor(n * planned(4 * n).share) for n in AUTO_BIG)
    for v in res:
        assert v["after"]["measurements"] == 1, v["after"]
        assert v["after"]["paths"] == (4 * (sum(AUTO_SMALL) + sum(AUTO_BIG)) - host, host), (v["after"], host)


# ---------------------------------------------------------------------------------------------------------------
# 6. the planner, by hand


def _expected(M, pcie, sum_, dev, ch=0.0, cd=0.0, path=0.0):
    """The formula in csrc/plait/algo/cost_model.h (planHostSplit), written out independently."""
    bd = dev * 1e3
    bh = min(pcie, sum_) * 1e3
    if path > 0:
        bh = min(bh, path * 1e3)
    t_d = cd + M / bd
    t_h = ch + M / bh
    a = (M / bd + cd - ch) / (M * (1 / bh + 1 / bd)) if M > 0 else 0.0
    a = max(0.0, min(1.0, a))
    split = max(cd + (1 - a) * M / bd, ch + a * M / bh)
    if a <= 0 or t_d - split < ch:
        return 0.0, t_d, t_d, t_h
    return a, split, t_d, t_h


MIB64 = 64 << 20
PLANNER_CASES = {
    # name: (nbytes, pcie, sum, device, host_call_us, device_call_us, path, expect share > 0, words in why)
    "cpu-bound": (MIB64, 20.0, 10.0, 30.0, 20.0, 10.0, 0.0, True, ["CPU-bound", "host path share"]),
    "pcie-bound": (MIB64, 5.0, 50.0, 30.0, 15.0, 5.0, 0.0, True, ["PCIe-bound", "host path share"]),
    "path-bounds": (MIB64, 20.0, 30.0, 30.0, 15.0, 5.0, 8.0, True, ["end to end 8", "host path share"]),
    "device-too-fast": (MIB64, 10.0, 10.0, 1000.0, 50.0, 0.0, 0.0, False, ["device only", "fixed cost"]),
    "host-fixed-cost-rules": (1 << 20, 20.0, 20.0, 20.0, 200.0, 5.0, 0.0, False, ["device only", "fixed cost"]),
    "empty": (0, 20.0, 10.0, 30.0, 20.0, 10.0, 0.0, False, ["device only"]),
    "equal-rates": (MIB64, 40.0, 40.0, 40.0, 0.0, 0.0, 0.0, True, ["host path share"]),
}


@pytest.mark.parametrize("case", list(PLANNER_CASES))
def test_planner_hand_computed(case):
    import plait

    M, pcie, sum_, dev, ch, cd, path, shares, words = PLANNER_CASES[case]
    p = plait.plan_host_path(M, pcie, sum_, dev, host_call_us=ch, device_call_us=cd, path_gbps=path)
    share, pred, t_d, t_h = _expected(M, pcie, sum_, dev, ch, cd, path)
    assert isinstance(p, plait.HostPathPlan) and len(p) == 5
    assert (share > 0) == shares, (case, share)  # the case is what its name says
    assert p.share == pytest.approx(share, rel=1e-12, abs=1e-15), (p, share)
    assert p.predicted_us == pytest.approx(pred, rel=1e-12), (p, pred)
    assert p.device_only_us == pytest.approx(t_d, rel=1e-12), (p, t_d)
    assert p.host_only_us == pytest.approx(t_h, rel=1e-12), (p, t_h)
    for w in words:
        assert w in p.why, (w, p.why)
    if shares:
        # both paths finish together, and the split beats either path alone
        assert cd + (1 - p.share) * M / (dev * 1e3) == pytest.approx(p.predicted_us, rel=1e-9)
        assert p.predicted_us < min(t_d, t_h)
    else:
        assert p.predicted_us == p.device_only_us


def test_planner_specific_values():
    import plait

    # symmetric rates, no fixed costs: half and half, at half the time
    p = plait.plan_host_path(1 << 30, 10.0, 10.0, 10.0)
    assert p.share == pytest.approx(0.5) and p.predicted_us == pytest.approx((1 << 30) / 1e4 / 2)
    # a host path 3x the device: 3/4 through the host
    p = plait.plan_host_path(1 << 30, 30.0, 60.0, 10.0)
    assert p.share == pytest.approx(0.75) and "PCIe-bound" in p.why
    # path_gbps below min(pcie, sum) is the host path's rate; above it, it changes nothing
    assert plait.plan_host_path(1 << 30, 30.0, 60.0, 10.0, path_gbps=10.0).share == pytest.approx(0.5)
    assert plait.plan_host_path(1 << 30, 30.0, 60.0, 10.0, path_gbps=100.0)[:4] == p[:4]
    assert plait.plan_host_path(0, 1.0, 1.0, 1.0, device_call_us=7.0)[:4] == (0.0, 7.0, 7.0, 0.0)


@pytest.mark.parametrize("kw", [
    dict(nbytes=-1), dict(pcie_gbps=0.0), dict(sum_gbps=-1.0), dict(device_gbps=0.0), dict(device_gbps=float("nan")),
    dict(host_call_us=-1.0), dict(device_call_us=-0.5), dict(path_gbps=-2.0), dict(pcie_gbps=float("nan")),
], ids=lambda kw: next(iter(kw)) + "=" + str(next(iter(kw.values()))))
def test_planner_rejects_bad_arguments(kw):
    import plait

    args = dict(nbytes=1 << 20, pcie_gbps=10.0, sum_gbps=10.0, device_gbps=10.0)
    args.update(kw)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        plait.plan_host_path(**args)


def worker_knob_plan(rank, ws):
    import plait

    n = (2 << 20) + 3  # above 1 MiB: auto mode would measure here
    t = C.gen("SUM", torch.float32, n, rank)
    dist.all_reduce(t)
    ok = torch.equal(t, C.reference("SUM", [C.gen("SUM", torch.float32, n, r) for r in range(ws)], torch.float32))
    topo = plait.topology()
    return dict(ok=ok, engine=topo["device_engine"], measured=topo["host_path"]["measured"],
                measurements=topo["host_path_measurements"],
                paths=(topo["device_engine_bytes"], topo["host_path_bytes"]),
                plans={m: _plan(plait.plan_allreduce(m, device=True)) for m in [4096, 64 << 20]})


def test_host_path_off():
    """PLAIT_HOST_PATH=off: the device engine alone, nothing measured even above 1 MiB. (force, PLAIT_HOST_SHARE
    and groups across hosts: their plans are checked by the collective tests above.)"""
    res = H.run_world(worker_knob_plan, 2, env={"PLAIT_DEVICE": "emulate", "PLAIT_HOST_PATH": "off"}, timeout_s=120)
    for v in res:
        assert v["ok"] and v["engine"] == "emulated", v
        assert v["measured"] is False and v["measurements"] == 0, v
        assert v["paths"] == (4 * ((2 << 20) + 3), 0), v
        for m, p in v["plans"].items():
            assert p["host_share"] == 0 and "PLAIT_HOST_PATH=off" in p["why"], (m, p)


# ---------------------------------------------------------------------------------------------------------------
# 7. bad knob values fail loudly on every rank


def worker_first_use(rank, ws):
    t = torch.ones(5000)
    dist.all_reduce(t)
    return t[0].item()


@pytest.mark.parametrize("knob,value", [("PLAIT_HOST_SHARE", "1.5"), ("PLAIT_HOST_PATH", "bogus")])
def test_bad_knob_values_fail_on_every_rank(knob, value):
    env = {"PLAIT_DEVICE": "emulate", knob: value}
    res = H.run_world(worker_first_use, 2, env=env, expect_fail=True, pg_timeout_s=30, timeout_s=120)
    for r in res:
        assert r.reported and not r.ok, f"{r.describe()}"
        assert f"{knob}={value}" in (r.exc_msg or ""), r.exc_msg


# ---------------------------------------------------------------------------------------------------------------
# 8. a rank dying mid host-path transfer


def worker_dies(rank, ws, piddir):
    with open(os.path.join(piddir, str(rank)), "w") as f:
        f.write(str(os.getpid()))
    n = 1 << 18
    t = C.gen("SUM", torch.float32, n, rank)
    dist.all_reduce(t)
    if rank == ws - 1:
        os._exit(0)  # gone without a word, while the others wait for it mid host-path transfer
    dist.all_reduce(t)
    return "no error"


def _plait_shm():
    return {n for n in os.listdir("/dev/shm") if n.startswith("plait")}


@pytest.mark.parametrize("case", ["force", "split", "across-hosts"])
def test_dead_peer_during_host_path_is_loud_and_leaves_nothing(case):
    env = dict(SMALL)
    rank_env = None
    if case == "force":
        env["PLAIT_HOST_PATH"] = "force"
    elif case == "split":
        env["PLAIT_HOST_SHARE"] = "0.5"
    else:
        rank_env = _hosts((0, 0, 1))
    before = _plait_shm()
    with tempfile.TemporaryDirectory(prefix="plait_test_pids_") as piddir:
        res = H.run_world(worker_dies, 3, piddir, env=env, rank_env=rank_env, expect_fail=True, pg_timeout_s=60,
                          timeout_s=150)
        pids = {open(os.path.join(piddir, p)).read() for p in os.listdir(piddir)}
    assert len(pids) == 3
    assert not res[2].reported, res[2].describe()
    for r in res[:-1]:
        assert not r.hung, r.describe()
        assert r.reported and not r.ok, f"a survivor finished a collective with a dead peer: {r.describe()}"
        assert "rank 2" in (r.exc_msg or ""), r.exc_msg
        assert r.elapsed_s < 30, f"rank {r.rank} took {r.elapsed_s:.1f} s to notice (the group timeout is 60 s)"
    # nothing this world made is left: device flag segments carry their creator's pid; anything else new must go
    # within a few seconds (other jobs on this machine may be making their own meanwhile)
    ours = {n for n in _plait_shm() - before if any(f"-{pid}-" in n for pid in pids)}
    assert not ours, f"/dev/shm entries left by the dead world: {sorted(ours)}"
    deadline = time.monotonic() + 5
    while (left := _plait_shm() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"/dev/shm entries left after a peer died: {sorted(left)}"
