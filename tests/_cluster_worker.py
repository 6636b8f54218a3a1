"""Rank programs for test_cluster.py, run on emulated hosts (network namespaces), started by torchrun or with the
env:// variables set by the test. Each writes its findings as JSON into the directory given as argv[2].

    python _cluster_worker.py ddp OUTDIR      DDP parity plait vs gloo, every all-reduce algorithm exact
    python _cluster_worker.py fault OUTDIR    all-reduce in a loop until the group fails; records the error
    python _cluster_worker.py store OUTDIR    the rendezvous store's server alone (not a rank), until killed
    python _cluster_worker.py init OUTDIR     init + all_reduce with a short timeout (PLAIT_TEST_PG_TIMEOUT_S); records
                                              the outcome and when it came
    python _cluster_worker.py job OUTDIR      init + all_reduce (the job the rogue client attacks)
    python _cluster_worker.py rogue OUTDIR    the rogue client (not a rank): attacks rank 0's listener
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ALGOS = ["auto", "ring", "tree", "direct", "hier", "hier_ring", "hier_tree"]


def _write(out, name, obj):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(out, name))


def ddp(out):
    import plait
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("plait", timeout=datetime.timedelta(seconds=60))
    rank, ws = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    gloo = dist.new_group(backend="gloo")
    # Every all-reduce algorithm across the hosts, exact on integer data, several chunks per message.
    coll_errors = []
    for algo in ALGOS:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo, chunk_bytes=4096))
        for n in [1, 1003, 300_001]:
            for dt in [torch.int64, torch.float32, torch.bfloat16]:
                t = (torch.arange(n, dtype=torch.int64) % 17 * (rank + 1)).to(dt)
                dist.all_reduce(t, group=g)
                want = (torch.arange(n, dtype=torch.int64) % 17 * (ws * (ws + 1) // 2)).to(dt)
                if not torch.equal(t, want):
                    coll_errors.append(f"{algo} n={n} {dt}")
    # DDP: the same model trained with plait and with gloo.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 8))
    mp = DDP(copy.deepcopy(model), bucket_cap_mb=0.25)
    mg = DDP(copy.deepcopy(model), process_group=gloo, bucket_cap_mb=0.25)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (mp, mg)]
    gen = torch.Generator().manual_seed(1000 + rank)
    for step in range(12):
        x = torch.randn(32, 64, generator=gen)
        for m, o in zip((mp, mg), opts):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    pp = torch.cat([p.detach().reshape(-1) for p in mp.parameters()])
    pg = torch.cat([p.detach().reshape(-1) for p in mg.parameters()])
    everyone = [torch.empty_like(pp) for _ in range(ws)]
    dist.all_gather(everyone, pp, group=gloo)
    _write(out, f"rank{rank}.json", dict(
        rank=rank, ws=ws, local_rank=int(os.environ.get("LOCAL_RANK", -1)), topo=plait.topology(),
        coll_errors=coll_errors, max_diff=float((pp - pg).abs().max()), scale=float(pg.abs().max()),
        identical_across_ranks=all(torch.equal(e, pp) for e in everyone), plan=plait.plan_allreduce(64 << 20)[0]))
    dist.destroy_process_group()


def fault(out):
    import plait  # noqa: F401

    dist.init_process_group("plait", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    t = torch.ones(1 << 20)
    dist.all_reduce(t)
    _write(out, f"started{rank}.json", {})
    t0 = None
    try:
        while True:
            dist.all_reduce(t)
            if t0 is None and os.path.exists(os.path.join(out, "killed")):
                t0 = time.time()
    except Exception as e:  # noqa: BLE001
        killed_at = os.path.getmtime(os.path.join(out, "killed")) if os.path.exists(os.path.join(out, "killed")) \
            else None
        _write(out, f"error{rank}.json", dict(type=type(e).__name__, msg=str(e), at=time.time(),
                                             killed_at=killed_at))
    os._exit(0)  # the group is dead: skip destroy_process_group


def store(out):
    s = dist.TCPStore("0.0.0.0", int(os.environ["MASTER_PORT"]), is_master=True,
                      timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    _write(out, "store.json", {})
    while True:
        time.sleep(1)
    del s


def init(out):
    import plait  # noqa: F401

    rank = int(os.environ["RANK"])
    t0 = time.time()
    try:
        dist.init_process_group("plait", timeout=datetime.timedelta(seconds=float(os.environ["PLAIT_TEST_PG_TIMEOUT_S"])))
        t = torch.ones(4)
        dist.all_reduce(t)
        msg = "ok"
    except Exception as e:  # noqa: BLE001
        msg = str(e)
    _write(out, f"init{rank}.json", dict(msg=msg, start=t0, at=time.time()))
    os._exit(0)


def job(out):
    import plait  # noqa: F401

    dist.init_process_group("plait", timeout=datetime.timedelta(seconds=60))
    rank, ws = dist.get_rank(), dist.get_world_size()
    t = torch.arange(1003, dtype=torch.int64) * (rank + 1)
    dist.all_reduce(t)
    ok = torch.equal(t, torch.arange(1003, dtype=torch.int64) * (ws * (ws + 1) // 2))
    _write(out, f"rank{rank}.json", dict(ok=ok, topo=plait.topology()))
    dist.destroy_process_group()


def rogue(out):
    from test_multihost import attack

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    report = {}
    try:
        attack(store, report, last_rank=int(os.environ["WORLD_SIZE"]) - 1)
    except Exception as e:  # noqa: BLE001
        report["error"] = f"{type(e).__name__}: {e}"
    _write(out, "rogue.json", report)


if __name__ == "__main__":
    {"ddp": ddp, "fault": fault, "store": store, "init": init, "job": job, "rogue": rogue}[sys.argv[1]](sys.argv[2])
