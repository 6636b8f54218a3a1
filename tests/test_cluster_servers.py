"""Summation servers across emulated hosts (plait.testing.cluster, network namespaces; needs root and iproute2,
skipped otherwise): Cluster(..., servers=k) adds k server hosts, Cluster.torchrun starts plait-server on them
against the workers' store and sets PLAIT_SERVERS=k. Exact all_reduce results through the servers (4 hosts x 1 and
2 hosts x 2, hierarchical inside the host), bitwise identity across ranks, and DDP parity with gloo (float64, data
chosen so that every sum is exact in any order: the weights must be bit-for-bit those of the gloo run).

This file is also the rank program: torchrun runs ``python test_cluster_servers.py MODE OUTDIR`` (nothing runs at
import).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = [1, 7, 4099, 1_000_003]  # elements: below, at and far above a segment (PLAIT_SERVER_SEGMENT_BYTES)
DTYPES = ["float32", "bfloat16", "int32", "float64"]


def _write(out, name, obj):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(out, name))


def _pattern(n, rank):
    import torch

    return (torch.arange(n, dtype=torch.float64) * (rank + 1) + rank) % 61 - 30


# --------------------------------------------------------------------------------------------------------------------
# rank programs (run by torchrun on the emulated hosts)


def rank_exact(out):
    import datetime

    import torch
    import torch.distributed as dist

    import plait

    torch.set_num_threads(1)
    dist.init_process_group("plait", timeout=datetime.timedelta(seconds=120))
    rank, ws = dist.get_rank(), dist.get_world_size()
    errors, digests = [], {}
    for name in DTYPES:
        dt = getattr(torch, name)
        for n in SIZES:
            x = _pattern(n, rank).to(dt)
            want = sum(_pattern(n, r) for r in range(ws)).to(dt)
            dist.all_reduce(x)
            if not torch.equal(x, want):
                errors.append(f"{name} n={n}: max error {float((x.double() - want.double()).abs().max())}")
    # random floats: not exact, but every rank must hold the same bits
    g = torch.Generator().manual_seed(1234 + rank)
    for name in ("float32", "bfloat16"):
        x = torch.randn(300_007, generator=g).to(getattr(torch, name))
        dist.all_reduce(x)
        raw = x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)
        digests[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    topo = plait.topology()
    plan = plait.plan_allreduce(4 * 1_000_003)
    _write(out, f"rank{rank}.json", dict(
        rank=rank, ws=ws, errors=errors, digests=digests, servers=topo["servers"], nhosts=topo["nhosts"],
        max_local=topo["max_local"], server_share=plan.server_share,
        store=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", env_servers=os.environ.get("PLAIT_SERVERS")))
    dist.destroy_process_group()


def _ddp_model():
    import torch

    class Heads(torch.nn.Module):
        """Four linear heads on four slices of the input, summed: a linear model of 512 -> 256 in four parameters
        pairs (several DDP buckets at bucket_cap_mb=0.25)."""

        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList(torch.nn.Linear(128, 256) for _ in range(4))

        def forward(self, x):
            return sum(h(x[:, 128 * i:128 * (i + 1)]) for i, h in enumerate(self.heads))

    m = Heads().double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():  # multiples of 1/4 in [-1/2, 1/2]
            p.copy_(torch.randint(-2, 3, p.shape, generator=g, dtype=torch.int64).double() / 4)
    return m


def rank_ddp(out):
    # Exactness: weights start as multiples of 2^-2, inputs are integers in [-2, 2], targets integers, the loss is
    # a plain sum of squares / 2, SGD's lr is 2^-11 and DDP divides by the world size (4). Each step adds 13 bits
    # of denominator (2 + 11) and |grad| < 2^14, so after 3 steps every gradient, every cross-rank sum (in any
    # order) and every weight is exact in float64 (< 2^46): plait through the servers and gloo must agree bitwise.
    import copy
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import plait

    torch.set_num_threads(1)
    dist.init_process_group("plait", timeout=datetime.timedelta(seconds=120))
    rank, ws = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    model = _ddp_model()
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mp = DDP(copy.deepcopy(model), bucket_cap_mb=0.25)  # the default group: plait, with the servers
    mg = DDP(copy.deepcopy(model), process_group=gloo, bucket_cap_mb=0.25)
    opts = [torch.optim.SGD(m.parameters(), lr=2.0 ** -11) for m in (mp, mg)]
    gen = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for step in range(3):
        x = torch.randint(-2, 3, (16, 512), generator=gen, dtype=torch.int64).double()
        t = torch.randint(-3, 4, (16, 256), generator=gen, dtype=torch.int64).double()
        for k, (m, o) in enumerate(zip((mp, mg), opts)):
            o.zero_grad()
            loss = (m(x) - t).pow(2).sum() / 2
            loss.backward()
            o.step()
            if k == 0:
                losses.append(float(loss.detach()))
    pp = torch.cat([p.detach().reshape(-1) for p in mp.parameters()])
    pg = torch.cat([p.detach().reshape(-1) for p in mg.parameters()])
    everyone = [torch.empty_like(pp) for _ in range(ws)]
    dist.all_gather(everyone, pp, group=gloo)
    _write(out, f"rank{rank}.json", dict(
        rank=rank, ws=ws, equal=bool(torch.equal(pp, pg)), max_diff=float((pp - pg).abs().max()),
        moved=float((pp - w0).abs().max()), losses=losses,
        identical_across_ranks=all(torch.equal(e, pp) for e in everyone), servers=plait.topology()["servers"],
        store=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# tests

if __name__ != "__main__":
    import _harness as H

    pytestmark = [pytest.mark.cluster,
                  pytest.mark.skipif(not H.IS_PLAIT, reason="plait-only: summation servers")]


def _read(out, pattern):
    res = {}
    for p in sorted(glob.glob(os.path.join(out, pattern))):
        with open(p) as f:
            res[os.path.basename(p)] = json.load(f)
    return res


def _run(c, nproc, mode, out, env, timeout=300, **kw):
    """torchrun this file in MODE on every worker host of c (with the cluster's servers); agents' logs, servers."""
    procs = c.torchrun(nproc, [os.path.abspath(__file__), mode, out], env={"OMP_NUM_THREADS": "1", **env},
                       port=H.free_port(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0] or "")
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            if c.last_servers is not None:
                c.last_servers.stop()
            pytest.fail("a host's processes hung:\n" + "\n".join(q.communicate()[0][-3000:] for q in procs))
    servers = c.last_servers.wait(120) if c.last_servers is not None else []
    detail = "\n".join(l[-3000:] for l in logs) + "".join(f"\n--- server {r.host}:\n{r.output[-3000:]}" for r in servers)
    assert all(p.returncode == 0 for p in procs), detail
    return logs, servers, detail


def _check_servers(c, servers, k, ranks, detail):
    """Every server: exit 0, served exactly this job's store, got data, refused nobody, aborted nothing."""
    assert [r.host for r in servers] == [c.server_host(j) for j in range(k)], servers
    store = {r["store"] for r in ranks.values()}
    assert len(store) == 1, store
    for r in servers:
        assert r.returncode == 0, detail
        assert r.endpoint == next(iter(store)), (r.endpoint, store, detail)  # the workers' store, not the rdzv's
        st = r.stats
        assert st is not None, detail
        assert st["jobs_started"] == 1 and st["jobs_aborted"] == 0 and st["refused"] == 0, st
        assert st["bytes_in"] > 0 and st["bytes_out"] > 0 and st["segments"] > 0, st


def test_server_hosts_are_addressed_after_the_worker_hosts(cluster_factory):
    c = cluster_factory(2, servers=2, tcp_cc="reno")  # reno: always allowed in a namespace
    assert (c.hosts, c.servers, c.nodes) == (2, 2, 4)
    assert [c.server_host(j) for j in range(2)] == [2, 3]
    assert [c.server_addr(j) for j in range(2)] == [c.addr(2), c.addr(3)]
    assert c.server_ns(1) == c.ns(3) and c.server_veth(0) == c.veth(2)
    assert not c.is_server_host(1) and c.is_server_host(2)
    assert c.run(3, ["cat", "/sys/class/net/eth0/operstate"], check=True).stdout.strip() in ("up", "unknown")
    assert c.run(0, [sys.executable, "-S", "-c", f"import socket; socket.create_connection(('{c.server_addr(1)}', 9),"
                     " 2)"]).stderr.count("ConnectionRefusedError") == 1  # reachable (RST), not unroutable
    with pytest.raises(Exception, match="server index 2 out of range"):
        c.server_host(2)
    with pytest.raises(Exception, match="host index 4 out of range 0..3"):
        c.addr(4)
    with pytest.raises(Exception, match="has 2 server host"):
        c.torchrun(1, ["x.py"], servers=3)
    for i in range(4):
        assert c.run(i, ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"]).stdout.strip() == "reno"
    with open(c.state_file) as f:
        st = json.load(f)
    assert st["hosts"] == 2 and st["servers"] == 2 and st["addrs"] == [c.addr(i) for i in range(4)]
    assert st["tcp_cc"] == "reno"
    plain = cluster_factory(1)
    with pytest.raises(Exception, match="has no server hosts"):
        plain.torchrun(1, ["x.py"], servers=True)


@pytest.mark.parametrize("hosts,nproc", [(4, 1), (2, 2)], ids=["4hostsx1", "2hostsx2"])
def test_all_reduce_through_servers_is_exact_under_torchrun(cluster_factory, tmp_path, hosts, nproc):
    k = 2
    c = cluster_factory(hosts, servers=k)  # unshaped: quick
    env = {"PLAIT_SERVER_SHARE": "0.6", "PLAIT_SERVER_SEGMENT_BYTES": "65536"}
    logs, servers, detail = _run(c, nproc, "exact", str(tmp_path), env)
    ranks = _read(str(tmp_path), "rank*.json")
    ws = hosts * nproc
    assert len(ranks) == ws, (sorted(ranks), detail)
    for r in ranks.values():
        assert r["ws"] == ws and not r["errors"], (r["rank"], r["errors"])
        assert r["env_servers"] == str(k)
        assert r["nhosts"] == hosts and r["max_local"] == nproc
        assert r["servers"]["count"] == k
        assert sorted(a.split(":")[0] for a in r["servers"]["addresses"]) == [c.server_addr(j) for j in range(k)]
        assert r["servers"]["server_bytes"] > 0 and r["servers"]["worker_bytes"] > 0, r["servers"]
        assert r["server_share"] == pytest.approx(0.6)
    assert len({json.dumps(r["digests"], sort_keys=True) for r in ranks.values()}) == 1, "ranks disagree bitwise"
    _check_servers(c, servers, k, ranks, detail)


def test_ddp_through_servers_matches_gloo_bitwise(cluster_factory, tmp_path):
    hosts, k = 4, 2
    c = cluster_factory(hosts, servers=k)
    env = {"PLAIT_SERVER_SHARE": "0.5", "PLAIT_SERVER_SEGMENT_BYTES": "32768"}
    logs, servers, detail = _run(c, 1, "ddp", str(tmp_path), env)
    ranks = _read(str(tmp_path), "rank*.json")
    assert len(ranks) == hosts, (sorted(ranks), detail)
    for r in ranks.values():
        assert r["identical_across_ranks"], f"rank {r['rank']}: plait DDP replicas diverged"
        assert r["moved"] > 0.01, r  # the weights did train
        assert r["equal"], f"rank {r['rank']}: plait (servers) vs gloo differ by {r['max_diff']}"
        assert r["servers"]["count"] == k and r["servers"]["server_bytes"] > 0, r["servers"]
    _check_servers(c, servers, k, ranks, detail)


if __name__ == "__main__":
    {"exact": rank_exact, "ddp": rank_ddp}[sys.argv[1]](sys.argv[2])
