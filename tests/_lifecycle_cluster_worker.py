"""A rank of test_lifecycle.py's unreachable-host test, run on an emulated host (network namespace):

    python _lifecycle_cluster_worker.py OUTDIR RANK

Two ranks, one per host, rendezvous through FileStores in OUTDIR (the namespaces share the file system, so the
store stays reachable while a host's network is down: what fails is plait's own connections). The test drives the
phases through files in OUTDIR:

  phase 0   init over store0, an all-reduce (exact); writes ready0-R.json; waits for "down" (the test took host 2's
            link down);
  phase 1   an all-reduce (fails: the peer is unreachable), destroy_process_group(), init over store1 while the
            peer is still unreachable (must raise within the group timeout naming the peer); writes fail1-R.json;
            waits for "up" (the link is back);
  phase 2   init over store2, all-reduce (exact), destroy; writes done-R.json with the resources held compared to
            before the first init.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _resources as R  # noqa: E402

TIMEOUT_S = 8.0


def _write(out, name, obj):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(out, name))


def _wait_file(out, name, limit=180):
    end = time.time() + limit
    while not os.path.exists(os.path.join(out, name)):
        if time.time() > end:
            raise TimeoutError(f"the test never wrote {name}")
        time.sleep(0.05)


def _init(out, rank, store, timeout_s=TIMEOUT_S):
    dist.init_process_group("plait", init_method=f"file://{out}/{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _allreduce_exact(rank):
    x = torch.arange(100003, dtype=torch.int64) * (rank + 1)
    dist.all_reduce(x)
    return bool(torch.equal(x, torch.arange(100003, dtype=torch.int64) * 3))


def main(out, rank):
    import plait  # noqa: F401

    torch.set_num_threads(1)
    # A first init/destroy cycle on a store of this rank's own (world of 1): what torch and plait start once.
    dist.init_process_group("plait", init_method=f"file://{out}/solo{rank}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(4))
    dist.destroy_process_group()
    base = R.snapshot()
    base_fds = R.fd_targets()

    _init(out, rank, "store0", 60.0)  # the two ranks start at different times
    ok0 = _allreduce_exact(rank)
    topo = plait.topology()
    _write(out, f"ready0-{rank}.json", dict(ok=ok0, nhosts=topo["nhosts"]))
    _wait_file(out, "down")

    t0 = time.time()
    try:
        _allreduce_exact(rank)
        fail_msg = "no error"
    except RuntimeError as e:
        fail_msg = str(e)
    fail_s = time.time() - t0
    t0 = time.time()
    dist.destroy_process_group()
    destroy_s = time.time() - t0
    t0 = time.time()
    try:
        _init(out, rank, "store1")
        init_msg = "no error"
    except Exception as e:  # noqa: BLE001
        init_msg = f"{type(e).__name__}: {e}"
    init_s = time.time() - t0
    initialized = dist.is_initialized()
    time.sleep(0.3)
    snap_fail = R.snapshot()
    after_fail = R.diff(base, snap_fail)
    if after_fail:
        after_fail["new_fds"] = sorted(v for k, v in R.fd_targets().items() if base_fds.get(k) != v)
    _write(out, f"fail1-{rank}.json", dict(fail_msg=fail_msg, fail_s=fail_s, destroy_s=destroy_s,
                                           init_msg=init_msg, init_s=init_s, initialized=initialized,
                                           leaks_after_failed_init=after_fail))
    _wait_file(out, "up")

    t0 = time.time()
    _init(out, rank, "store2", 60.0)
    ok2 = _allreduce_exact(rank)
    reinit_s = time.time() - t0
    dist.destroy_process_group()
    time.sleep(0.3)
    now = R.snapshot()
    _write(out, f"done-{rank}.json", dict(ok=ok2, reinit_s=reinit_s, leaks=R.diff(base, now),
                                          leaks_since_failed_init=R.diff(snap_fail, now)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
