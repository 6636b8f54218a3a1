"""Correctness of every collective, exact against a torch reference, on world sizes 1..8 (odd ones too).

One launch per world size covers the algorithm x transport matrix: inside the worker, one full-world subgroup
per (algo, transport) is created with ``plait.Options`` (small ``chunk_bytes`` / ``shm_ring_bytes`` so that
the multi-chunk and ring-buffer wrap-around paths run on small inputs), and every collective runs on each.
All dtypes x ops x counts run on the default group; forced-config subgroups run all_reduce over all dtypes
(at 8 ranks a rotating subset) and the other collectives over a rotating subset of dtypes, so that every
(config, collective) pair and every (collective, dtype) pair is covered. ``-m slow`` adds the full cross
product at 8 ranks and large messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _collcheck as C
import _harness as H

COUNTS = [0, 1, 7, 1003]  # 1003 elements: dozens of 64-byte chunks, not a multiple of any vector width or of ws
ALGOS = ["auto", "ring", "tree", "direct"]
TRANSPORTS = ["shm", "tcp"]


def config_list():
    """(name, plait.Options kwargs or None); None = the default group."""
    cfgs = [("default", None)]
    if H.IS_PLAIT:
        for a in ALGOS:
            for t in TRANSPORTS:
                cfgs.append((f"{a}/{t}", dict(algo=a, transport=t, chunk_bytes=64, shm_ring_bytes=256)))
        # chunk / ring sizes that are not powers of two nor multiples of wide vector widths
        cfgs.append(("ring/shm/chunk96", dict(algo="ring", transport="shm", chunk_bytes=96, shm_ring_bytes=352)))
        cfgs.append(("auto/auto/small", dict(chunk_bytes=64, shm_ring_bytes=256)))
    else:
        cfgs.append(("gloo-subgroup", None))
    return cfgs


def _rot(items, i, k):
    """k items of `items` starting at position i*k (cyclic)."""
    if k >= len(items):
        return list(items)
    return [items[(i * k + j) % len(items)] for j in range(k)]


def _make_group(name, opts):
    if name == "default":
        return dist.group.WORLD
    if opts is None:
        return dist.new_group(backend=H.BACKEND)
    return dist.new_group(backend="plait", pg_options=H.make_options(opts))


def worker_matrix(rank, ws, level):
    """level: "full" = every dtype on every config; "reduced" = rotating dtype subsets on forced configs."""
    vgroup = dist.new_group(backend="gloo")  # verification channel independent of the backend under test
    cfgs = config_list()
    groups = [(name, _make_group(name, opts)) for name, opts in cfgs]
    failures = []
    checks = 0
    for i, (name, g) in enumerate(groups):
        c = C.Checker(label=f"ws={ws} cfg={name}: ")
        full = level == "full" or name == "default"
        ar_dtypes = C.ALL_DTYPES if (full or level == "reduced") else _rot(C.ALL_DTYPES, i, 3)
        other = C.ALL_DTYPES if full else _rot(C.ALL_DTYPES, i, 3 if level == "reduced" else 2)
        C.check_all_reduce(c, g, rank, ws, ar_dtypes, COUNTS)
        C.check_all_reduce(c, g, rank, ws, _rot(ar_dtypes, i, 2), [5, 1003], async_batch=False)
        C.check_all_reduce_coalesced(c, g, rank, ws, other, [1, 7, 0, 1003])
        C.check_other_collectives(c, g, rank, ws, other, COUNTS)
        C.check_random_float_consistency(c, g, vgroup, rank, ws, [1003, 4099] if full else [1003])
        dist.barrier(group=g)
        failures += c.failures
        checks += c.checks
    dist.barrier(group=vgroup)
    return {"failures": failures, "checks": checks}


def _assert_no_failures(results):
    failures = [f for r in results for f in r["failures"]]
    checks = sum(r["checks"] for r in results)
    print(f"{checks} checks on {len(results)} ranks")
    assert checks > 0
    if failures:
        pytest.fail(f"{len(failures)} wrong results, e.g.:\n" + "\n".join(failures[:40]), pytrace=False)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("ws", [1, 2, 3, 4, 5])
def test_collectives_matrix(ws):
    _assert_no_failures(H.run_world(worker_matrix, ws, "reduced" if ws >= 4 else "full", timeout_s=400))


@pytest.mark.timeout(540)
def test_collectives_matrix_8_ranks():
    _assert_no_failures(H.run_world(worker_matrix, 8, "reduced", timeout_s=520))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("ws", [4, 8])
def test_collectives_matrix_full(ws):
    _assert_no_failures(H.run_world(worker_matrix, ws, "full", timeout_s=1150))


# ------------------------------------------------------------------------------------------------------------------
# large messages (default chunk sizes; many chunks; > any default shm ring)


def worker_large(rank, ws, counts):
    cfgs = [("default", None)]
    if H.IS_PLAIT:
        cfgs += [(f"{a}/{t}", dict(algo=a, transport=t)) for a in ["ring", "tree", "direct"] for t in TRANSPORTS]
    c = C.Checker(label=f"ws={ws} large: ")
    for name, opts in cfgs:
        g = _make_group(name, opts)
        c.label = f"ws={ws} large cfg={name}: "
        for n in counts:
            for dt, op in [(torch.float32, "SUM"), (torch.bfloat16, "MAX"), (torch.int64, "SUM")]:
                t = C.gen(op, dt, n, rank, salt="large")
                dist.all_reduce(t, op=C.make_op(op), group=g)
                # the reference needs every rank's input: build it incrementally to bound memory
                exp = C.reference(op, [C.gen(op, dt, n, r, salt="large") for r in range(ws)], dt)
                c.equal(f"all_reduce {C.dt_name(dt)} n={n} op={op}", t, exp)
            dt = torch.float32
            t = C.gen("data", dt, n, rank, salt="lb")
            dist.broadcast(t, src=ws - 1, group=g)
            c.equal(f"broadcast n={n}", t, C.gen("data", dt, n, ws - 1, salt="lb"))
            per = n // ws
            out = torch.empty(per * ws, dtype=dt)
            dist.all_gather_into_tensor(out, C.gen("data", dt, per, rank, salt="lag"), group=g)
            c.equal(f"all_gather_into_tensor n={per}",
                    out, torch.cat([C.gen("data", dt, per, r, salt="lag") for r in range(ws)]))
    return {"failures": c.failures, "checks": c.checks}


@pytest.mark.timeout(300)
def test_large_messages_3_ranks():
    # ~4 MiB float32: many default-size chunks, larger than a typical shm ring
    _assert_no_failures(H.run_world(worker_large, 3, [(1 << 20) + 3], timeout_s=280))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ws", [2, 8])
def test_large_messages_slow(ws):
    _assert_no_failures(H.run_world(worker_large, ws, [(1 << 22) + 1, 3 << 20], timeout_s=880))


# ------------------------------------------------------------------------------------------------------------------
# parity with gloo inside the same processes


def worker_gloo_parity(rank, ws):
    gg = dist.new_group(backend="gloo")
    c = C.Checker(label=f"ws={ws} gloo parity: ")
    for dt in C.ALL_DTYPES:
        for op in ["SUM", "PRODUCT", "MIN", "MAX"] if dt != torch.bool else ["MIN", "MAX"]:
            for n in [1, 7, 1003]:
                a = C.gen(op, dt, n, rank, salt="parity")
                b = a.clone()
                dist.all_reduce(a, op=C.make_op(op))
                dist.all_reduce(b, op=C.make_op(op), group=gg)
                c.equal(f"all_reduce vs gloo {C.dt_name(dt)} n={n} op={op}", a, b)
        n = 37
        a = C.gen("data", dt, n, rank, salt="parity-ag")
        o1 = [torch.empty_like(a) for _ in range(ws)]
        o2 = [torch.empty_like(a) for _ in range(ws)]
        dist.all_gather(o1, a)
        dist.all_gather(o2, a, group=gg)
        for r in range(ws):
            c.equal(f"all_gather vs gloo {C.dt_name(dt)} [from {r}]", o1[r], o2[r])
        b1 = a.clone()
        b2 = a.clone()
        dist.broadcast(b1, src=ws - 1)
        dist.broadcast(b2, src=ws - 1, group=gg)
        c.equal(f"broadcast vs gloo {C.dt_name(dt)}", b1, b2)
    return {"failures": c.failures, "checks": c.checks}


@pytest.mark.timeout(240)
def test_parity_with_gloo():
    _assert_no_failures(H.run_world(worker_gloo_parity, 3, timeout_s=220))
