"""The soak (scripts/soak.py) in short, and what the soak found.

``test_soak_short`` runs the soak script itself: a few thousand random collectives (every op, dtype, reduction,
persistent groups with different plait.Options, subgroups, an ephemeral group destroyed and re-created every 100
collectives) on 4 ranks; every result is checked exactly inside the script, which exits 1 on any wrong result, any
failed rank, or a resource that grows (fds, threads, /dev/shm maps and names: slope > 0 and the final value above the
warm-up maximum; private RSS (RssAnon): a slope bound, looser here than the full soak's 1 MiB per 10k collectives
because a short run is still warming up: per-group buffers grow to the largest message seen). The test also reads
the JSON and asserts the figures directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import _harness as H

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="the soak runs plait")

ROOT = os.path.dirname(H.TESTS_DIR)
SOAK = os.path.join(ROOT, "scripts", "soak.py")


def test_soak_short(tmp_path):
    out = tmp_path / "soak.json"
    n = 3000
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, SOAK, "--collectives", str(n), "--world", "4", "--seed", "7",
                        "--max-bytes", str(1 << 20), "--group-every", "100", "--sample-every", "200",
                        "--warmup", "0.2", "--rss-slope-mib", "200", "--pg-timeout", "60", "--timeout", "500",
                        "--json", str(out)], capture_output=True, text=True, timeout=560)
    report = p.stdout + "\n" + p.stderr[-4000:]
    assert p.returncode == 0, report
    assert "soak: PASS" in p.stdout, report
    d = json.loads(out.read_text())
    assert d["status"] == "PASS" and not d["failures"] and not d["errors"] and not d["violations"], report
    assert d["collectives"] == n
    # every kind of call was drawn and every rank checked results
    assert set(d["op_counts"]) >= {"all_reduce", "plait_all_reduce", "plait_all_reduce_compressed", "broadcast",
                                   "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                                   "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
                                   "barrier", "send_recv", "batch_isend_irecv"}, d["op_counts"]
    assert sum(d["op_counts"].values()) == n
    assert d["checks"] > 2 * n
    assert d["groups_created"] >= 8 + n // 100  # persistent ones and one ephemeral per period
    for r in range(4):
        m = d["metrics"][str(r)]
        # flat after the warm-up: no more descriptors, threads or shared memory at the end than during the warm-up
        for k in ("fds", "threads", "shm_maps"):
            assert m[k]["end"] <= m[k]["warmup_max"], (r, k, m[k])
        assert m["shm_names"]["end"] == 0, (r, m["shm_names"])
        assert m["anon_mib"]["slope_per_10k"] < 200, (r, m["anon_mib"])
    print(f"soak {n} collectives: {d['wall_s']:.1f} s in the ranks, {time.monotonic() - t0:.1f} s in all")


def test_soak_reports_a_wrong_result(tmp_path, monkeypatch):
    """The soak's checks can fail: with PLAIT_SOAK_CORRUPT=K every rank's result of collective K is altered after
    the call, and the script must exit 1 naming it."""
    out = tmp_path / "soak.json"
    env = dict(os.environ, PLAIT_SOAK_CORRUPT="5")
    p = subprocess.run([sys.executable, SOAK, "--collectives", "40", "--world", "2", "--group-every", "20",
                        "--sample-every", "20", "--max-bytes", "4096", "--json", str(out), "--timeout", "200"],
                       capture_output=True, text=True, timeout=260, env=env)
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert "WRONG RESULT" in p.stdout and "collective 5:" in p.stdout, p.stdout
    d = json.loads(out.read_text())
    assert d["status"] == "FAIL" and d["failures"]


# ------------------------------------------------------------------------------------------------------------------
# Found by the soak: a rank that finished its part of a reduce early (a leaf of the tree) and destroyed the group at
# once made the root fail with "peer rank N (same host) died", although N's data was in the shared-memory ring: the
# root's receive from N waited (in rank order) on another child's data, so nothing could move when the root noticed
# N's lock released (csrc/plait/engine.cc, Comm::checkPeersAlive). Fixed: Comm::goneDataSuffices lets it wait when
# everything still owed from N is in the ring.


def worker_reduce_then_destroy(rank, ws, transport="shm"):
    import gc

    import torch
    import torch.distributed as dist
    import plait

    g = dist.new_group([0, 1, 2], backend="plait", pg_options=plait.Options(transport=transport))
    t = torch.full((1000,), float(rank + 1))
    err = None
    try:
        if rank == 1:
            time.sleep(1.5)  # the root's first child is late: the root's receive from rank 2 waits behind it
        dist.reduce(t, dst=0, group=g)
        if rank == 2:
            dist.destroy_process_group(g)  # done with the group: its part of the reduce is sent
            del g  # the last reference: the backend goes (and with it the lock its peers watch)
            gc.collect()
    except RuntimeError as e:
        err = str(e)
    dist.barrier()
    if rank != 2:
        try:
            dist.destroy_process_group(g)
        except RuntimeError:
            pass
    return err, t[:4].tolist()


def test_destroy_right_after_reduce_does_not_fail_the_root():
    res = H.run_world(worker_reduce_then_destroy, 3, "shm")
    assert res[0] == (None, [6.0] * 4), res
    assert res[1][0] is None and res[2][0] is None, res


def test_destroy_right_after_reduce_over_tcp():
    """Over TCP the leaf's bytes sit in the root's socket buffer; the root reads them when their turn comes."""
    res = H.run_world(worker_reduce_then_destroy, 3, "tcp")
    assert res[0] == (None, [6.0] * 4), res
    assert res[1][0] is None and res[2][0] is None, res


# Found by the soak: plait.all_reduce's lookup cache (python/plait/_backend.py, _FAST) kept a destroyed group, and
# with it the backend's sockets and shared-memory mappings, until the cache's next miss; a job that called
# plait.all_reduce only on groups already cached never let them go.


def worker_fast_cache_after_destroy(rank, ws):
    import gc
    import weakref

    import torch
    import torch.distributed as dist
    import plait

    def fds():
        return len(os.listdir("/proc/self/fd"))

    t = torch.ones(4)
    plait.all_reduce(t)  # the world is cached
    before = fds()
    g = dist.new_group(backend="plait", pg_options=plait.Options(transport="tcp"))
    plait.all_reduce(t, group=g)
    during = fds()
    dist.barrier(group=g)
    dist.destroy_process_group(g)
    ref = weakref.ref(g)
    del g
    gc.collect()
    plait.all_reduce(t)  # a hit: nothing else changes
    gc.collect()
    return ref() is None, before, during, fds(), t.tolist()


def test_destroyed_group_leaves_the_all_reduce_cache():
    res = H.run_world(worker_fast_cache_after_destroy, 2)
    for freed, before, during, after, vals in res:
        assert vals == [8.0] * 4  # 1 -> 2 (world) -> 4 (g) -> 8 (world)
        assert during > before  # the tcp group's sockets
        assert freed and after == before, (freed, before, during, after)
