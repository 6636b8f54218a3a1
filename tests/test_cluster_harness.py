"""Tests of the emulated multi-host cluster harness (plait.testing.cluster). Need root and iproute2; skipped
otherwise. Every test cleans up what it makes (clusters through cluster_factory or `with`, foreign namespaces it
adds itself)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import _cluster_module

cl = _cluster_module()
Cluster, ClusterError = cl.Cluster, cl.ClusterError

pytestmark = [pytest.mark.timeout(120)]

CLUSTER_PY = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "python", "plait", "testing", "cluster.py"))
PY = sys.executable


@pytest.fixture(autouse=True)
def _needs_cluster(request):
    if request.node.get_closest_marker("cluster") is None:
        return
    ok, reason = cl.available()
    if not ok:
        pytest.skip(f"emulated cluster needs root and iproute2: {reason}")


def _name() -> str:
    return "t" + secrets.token_hex(2)  # 5 chars [a-z0-9]


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _leftovers(name: str) -> list[str]:
    left = [n for n in _netns_names() if n.startswith(f"plait-{name}-")]
    left += [n for n in _links() if n in (f"plbr{name}",) or n.startswith(f"plv{name}-")]
    if os.path.exists(os.path.join(cl.state_dir(), f"{name}.json")):
        left.append("state file")
    return left


def _cli(*args, module=False, timeout=60, **kw) -> subprocess.CompletedProcess:
    """The CLI; by file path (no torch import: fast) unless module=True (`python -m plait.testing.cluster`)."""
    cmd = [PY, "-m", "plait.testing.cluster"] if module else [PY, CLUSTER_PY]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, **kw)


ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(4)
    print(s.getsockname()[1], flush=True)
    for _ in range(int(sys.argv[2])):
        c, peer = s.accept()
        data = c.recv(100)
        c.sendall(data + b" from " + peer[0].encode()); c.close()
    """
)

ECHO_CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.sendall(b"hello"); print(c.recv(100).decode())
    """
)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_up_down_leaves_nothing():
    name = _name()
    c = Cluster(hosts=3, rate="1gbit", name=name)
    c.up()
    try:
        assert c.is_up and c.name == name and c.hosts == 3 and c.rate == "1gbit"
        assert {c.ns(i) for i in range(3)} <= _netns_names()
        assert {f"plbr{name}", *(c.veth(i) for i in range(3))} <= _links()
        assert os.path.exists(c.state_file)
        assert len({c.addr(i) for i in range(3)} | {c.bridge_addr}) == 4
        assert c.cmd(1, ["true"]) == ["ip", "netns", "exec", c.ns(1), "true"]
        # shaped on both ends of every veth
        for i in range(3):
            root_side = subprocess.run(["tc", "qdisc", "show", "dev", c.veth(i)], capture_output=True, text=True)
            ns_side = c.run(i, ["tc", "qdisc", "show", "dev", "eth0"])
            assert "tbf" in root_side.stdout and "rate 1Gbit" in root_side.stdout, root_side.stdout
            assert "tbf" in ns_side.stdout and "rate 1Gbit" in ns_side.stdout, ns_side.stdout
            addrs = c.run(i, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f"{c.addr(i)}/24" in addrs
            assert "UP" in c.run(i, ["ip", "-o", "link", "show", "dev", "lo"]).stdout
    finally:
        c.down()
    assert not c.is_up
    assert _leftovers(name) == []
    c.down()  # idempotent


@pytest.mark.cluster
def test_unshaped_has_no_qdisc(cluster_factory):
    c = cluster_factory(2, rate=None)
    assert c.rate == "0"
    out = subprocess.run(["tc", "qdisc", "show", "dev", c.veth(0)], capture_output=True, text=True).stdout
    assert "tbf" not in out


@pytest.mark.cluster
def test_tcp_between_hosts_and_from_root(cluster_factory):
    c = cluster_factory(2)
    srv = c.popen(1, [PY, "-S", "-c", ECHO_SERVER, c.addr(1), "2"], stdout=subprocess.PIPE, text=True)
    port = srv.stdout.readline().strip()
    assert port.isdigit()
    # host 0 -> host 1, through the bridge
    r = c.run(0, [PY, "-S", "-c", ECHO_CLIENT, c.addr(1), port], timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"hello from {c.addr(0)}"
    # root namespace -> host 1 via the bridge address
    with socket.create_connection((c.addr(1), int(port)), timeout=10) as s:
        s.sendall(b"root")
        assert s.recv(100).decode() == f"root from {c.bridge_addr}"
    assert srv.wait(timeout=10) == 0
    # a host does not see the root namespace's interfaces
    assert "plbr" not in c.run(0, ["ip", "-o", "link"]).stdout


@pytest.mark.cluster
def test_up_refuses_taken_names(cluster_factory):
    c = cluster_factory(2)
    with pytest.raises(ClusterError, match="taken"):
        Cluster(hosts=2, name=c.name).up()
    assert c.run(0, ["true"]).returncode == 0  # the first one is untouched

    name = _name()
    foreign = f"plait-{name}-h1"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        with pytest.raises(ClusterError, match=f"namespace {foreign}"):
            Cluster(hosts=2, name=name).up()
        assert foreign in _netns_names()
        assert f"plait-{name}-h0" not in _netns_names()
        assert not os.path.exists(os.path.join(cl.state_dir(), f"{name}.json"))
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)


@pytest.mark.cluster
def test_cli_down_refuses_unknown_name_and_spares_foreign_namespace():
    name = _name()
    foreign = f"plait-{name}-h0"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        r = _cli("down", "--name", name)
        assert r.returncode != 0
        assert "no state file" in r.stderr and "refusing" in r.stderr, r.stderr
        assert foreign in _netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)


@pytest.mark.cluster
def test_teardown_after_exception_in_with():
    name = _name()
    with pytest.raises(ZeroDivisionError):
        with Cluster(hosts=2, rate="100mbit", name=name) as c:
            c.popen(0, ["sleep", "60"])
            assert _leftovers(name)
            1 / 0
    assert _leftovers(name) == []
    assert not c.is_up


@pytest.mark.cluster
def test_up_rolls_back_on_failure(monkeypatch):
    name = _name()
    c = Cluster(hosts=3, rate="1gbit", name=name)
    real = cl._sh

    def failing(argv, *a, **kw):  # fail while adding the qdisc of host 2: most objects exist by then
        if argv[:3] == ["tc", "qdisc", "add"] and argv[4] == c.veth(2):
            raise ClusterError("injected failure")
        return real(argv, *a, **kw)

    monkeypatch.setattr(cl, "_sh", failing)
    with pytest.raises(ClusterError, match="injected"):
        c.up()
    assert _leftovers(name) == []
    assert not c.is_up


@pytest.mark.cluster
def test_cli_up_run_down_roundtrip():
    name = _name()
    r = _cli("up", "--hosts", "2", "--rate", "100mbit", "--name", name, module=True)
    try:
        assert r.returncode == 0, r.stderr
        assert name in r.stdout and f"plait-{name}-h1" in r.stdout
        st = Cluster.attach(name)
        assert st.hosts == 2 and st.addr(1) in r.stdout
        assert {f"plait-{name}-h0", f"plait-{name}-h1"} <= _netns_names()  # left up after the CLI exited
        lst = _cli("list")
        assert lst.returncode == 0 and name in lst.stdout
        rr = _cli("run", "--name", name, "--host", "1", "--", "sh", "-c", "ip -4 -o addr show dev eth0; exit 7")
        assert rr.returncode == 7 and st.addr(1) in rr.stdout, (rr.stdout, rr.stderr)
    finally:
        d = _cli("down", "--name", name)
    assert d.returncode == 0, d.stderr
    assert _leftovers(name) == []


@pytest.mark.cluster
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_tears_down_with_block(sig):
    name = _name()
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("cluster", {CLUSTER_PY!r})
        cl = importlib.util.module_from_spec(spec); sys.modules["cluster"] = cl; spec.loader.exec_module(cl)
        with cl.Cluster(hosts=2, rate="100mbit", name={name!r}) as c:
            c.popen(1, ["sleep", "60"])
            print("up", flush=True)
            time.sleep(60)
        """
    )
    p = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "up", (line, p.stderr.read() if p.poll() is not None else "")
        assert _leftovers(name)
        p.send_signal(sig)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGINT:  # KeyboardInterrupt from the previous (default) handler, after the teardown
        assert rc in (1, -signal.SIGINT) and "KeyboardInterrupt" in p.stderr.read()
    else:
        assert rc == -signal.SIGTERM
    assert _leftovers(name) == []


@pytest.mark.cluster
def test_kill_host(cluster_factory):
    c = cluster_factory(2)
    victim = c.popen(1, ["sh", "-c", "sleep 60 & sleep 60; wait"])
    bystander = c.popen(0, ["sleep", "60"])
    deadline = time.time() + 10
    while len(c.pids(1)) < 3 and time.time() < deadline:  # sh and both sleeps have entered the namespace
        time.sleep(0.02)
    assert len(c.pids(1)) >= 3
    c.kill_host(1)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert c.pids(1) == []
    assert bystander.poll() is None and c.pids(0) == [bystander.pid]
    # the host can be "rebooted": new processes run there again
    assert c.run(1, ["true"]).returncode == 0


@pytest.mark.cluster
def test_shaping_applies(cluster_factory):
    c = cluster_factory(2, rate="50mbit")
    r = c.measure_bandwidth(0, 1, nbytes=4_000_000)
    assert r["bytes"] == 4_000_000
    assert r["seconds"] >= 0.45, r  # 4 MB at 50 Mbit/s is ~0.64 s (lower bound only: no upper-bound timing)


def test_rate_parsing():
    assert cl.parse_rate("1gbit") == 10**9 and cl.parse_rate("100Mbit") == 10**8 and cl.parse_rate("10gbit") == 10**10
    assert cl.parse_rate(None) == cl.parse_rate("0") == cl.parse_rate(0) == 0
    assert cl.parse_rate("125mbps") == 10**9  # tc: bps = bytes per second
    with pytest.raises(ClusterError):
        cl.parse_rate("fast")
    burst, limit = cl.tbf_params(10**10, hz=1000)
    assert burst >= 10**10 / 8 / 1000 and burst >= 64 * 1024 and limit > burst


TORCH_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.ones(8)
    dist.all_reduce(t)
    assert world == int(os.environ["WORLD_SIZE"]) == int(sys.argv[2]), (world, os.environ["WORLD_SIZE"])
    assert torch.equal(t, torch.full((8,), float(world))), t
    dist.destroy_process_group()
    with open(os.path.join(sys.argv[1], f"rank{rank}"), "w") as f:
        f.write(f"OK {world} {os.environ['MASTER_ADDR']}")
    """
)


@pytest.mark.cluster
def test_torchrun_gloo_smoke(cluster_factory, tmp_path):
    c = cluster_factory(2, rate="1gbit")
    script = tmp_path / "ar.py"
    script.write_text(TORCH_SCRIPT)
    procs = c.torchrun(1, [str(script), str(tmp_path), "2"], env={"OMP_NUM_THREADS": "1"}, port=29511,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            c.kill_host(0)
            c.kill_host(1)
            pytest.fail("torchrun hung:\n" + "\n".join(o[-3000:] for o in outs))
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    results = sorted(f.read_text() for f in tmp_path.glob("rank*"))
    # MASTER_ADDR is the address of whichever host's agent got node rank 0, the same for every worker
    assert len(results) == 2 and results[0] == results[1], results
    assert results[0] in (f"OK 2 {c.addr(0)}", f"OK 2 {c.addr(1)}"), results
