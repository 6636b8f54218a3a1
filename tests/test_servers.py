"""Summation servers (README "Summation servers"): plait-server processes beside fake hosts (PLAIT_HOST_ID per
rank, no root needed), the mixed partition's exact results, bitwise identity across workers, faults, the planner."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from _harness import free_port, run_world, shm_files

HERE = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def servers(port: int, k: int, tmp_path, env: dict | None = None, args: tuple = ()):
    """k plait-server processes against the store at 127.0.0.1:port; yields their Popen objects and log paths.
    Every one must exit 0 on SIGTERM at the end (unless already gone)."""
    procs, logs = [], []
    e = dict(os.environ)
    e.update(env or {})
    for i in range(k):
        log = tmp_path / f"server{i}.log"
        f = open(log, "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "plait.server", f"127.0.0.1:{port}", "--store-grace",
                                       "600", *args], stdout=f, stderr=subprocess.STDOUT, env=e,
                                      start_new_session=True))
        f.close()
        logs.append(log)
    try:
        yield procs, logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, log in zip(procs, logs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise AssertionError(f"plait-server did not stop on SIGTERM:\n{log.read_text()[-3000:]}")


def fake_hosts(world: int, per_host: int = 1) -> dict:
    return {r: {"PLAIT_HOST_ID": f"fakehost{r // per_host}"} for r in range(world)}


def w_exact(rank, world, sizes, dtypes):
    import torch
    import torch.distributed as dist

    import plait

    out = {}
    for name in dtypes:
        dt = getattr(torch, name)
        for n in sizes:
            x = ((torch.arange(n, dtype=torch.float64) * (rank + 1) + rank) % 61 - 30).to(dt)
            want = sum(((torch.arange(n, dtype=torch.float64) * (r + 1) + r) % 61 - 30) for r in range(world)).to(dt)
            dist.all_reduce(x)
            assert torch.equal(x, want), (name, n, (x - want).abs().max())
            out[(name, n)] = hashlib.sha256(x.numpy().tobytes() if name != "bfloat16"
                                            else x.view(torch.int16).numpy().tobytes()).hexdigest()
    # random float data: bitwise identical on every rank
    g = torch.Generator().manual_seed(1234 + rank)
    for name in dtypes:
        if name.startswith("int"):
            continue
        x = torch.randn(300_007, generator=g).to(getattr(torch, name))
        dist.all_reduce(x)
        raw = x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)
        out[("random", name)] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    topo = plait.topology()
    out["servers"] = topo["servers"]
    out["plan"] = plait.plan_allreduce(4 * 1_000_003)
    return out


@pytest.mark.parametrize("world,k,per_host", [(2, 1, 1), (3, 2, 1), (4, 4, 1), (5, 3, 1), (4, 2, 2)])
def test_exact_and_identical(tmp_path, world, k, per_host):
    port = free_port()
    env = {"PLAIT_SERVERS": str(k), "PLAIT_SERVER_SHARE": "0.6", "PLAIT_SERVER_SEGMENT_BYTES": "65536",
           "PLAIT_SERVER_GBPS": "10"}
    with servers(port, k, tmp_path):
        res = run_world(w_exact, world, [1, 7, 4099, 100_003], ["float32", "bfloat16", "float16", "int32"],
                        init="tcp", port=port, env=env, rank_env=fake_hosts(world, per_host), timeout_s=300)
    for key in res[0]:
        if key in ("servers", "plan"):
            continue
        assert all(r[key] == res[0][key] for r in res), key
    for r in res:
        assert r["servers"]["count"] == k
        assert r["servers"]["server_bytes"] > 0
        assert r["plan"].server_share == pytest.approx(0.6)
