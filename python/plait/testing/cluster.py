"""An emulated multi-host cluster on one Linux machine, built from network namespaces.

Each emulated host is a network namespace ``plait-<name>-h<i>`` with loopback and one interface ``eth0`` holding
the host's address ``<subnet>.<i+1>/24``. ``eth0`` is one end of a veth pair; the other end (``plv<name>-<i>``,
in the root namespace) is a port of the Linux bridge ``plbr<name>``, which also holds ``<subnet>.254``
(:attr:`Cluster.bridge_addr`) so that processes in the root namespace can reach every host. Processes run "on"
host ``i`` through ``ip netns exec plait-<name>-h<i> ...``: they share the machine's file system, PIDs and
hostname, but see only that host's network. Traffic between two hosts goes host -> veth -> bridge -> veth -> host,
i.e. through real kernel TCP/IP, so anything that works here talks TCP the way it would across machines.

Server hosts. ``Cluster(hosts, rate, servers=k)`` (CLI ``up --servers k``) adds k more hosts, built exactly like the
others (own namespace, address, shaped veth), for summation servers (``plait-server``): host indices ``hosts`` ..
``hosts+k-1`` (namespace ``plait-<name>-h<i>``, address ``<subnet>.<i+1>``). ``.hosts`` stays the number of worker
hosts, ``.servers`` is k and ``.nodes`` the total; every per-host method (ns(), veth(), addr(), popen(), run(),
pids(), kill_host(), measure_bandwidth()) takes any host index, and ``server_host(j)`` = hosts + j,
``server_ns(j)``, ``server_veth(j)``, ``server_addr(j)`` address server host j. torchrun() runs its agents on the
worker hosts only (unless ``hosts=`` says otherwise).

Shaping. With a ``rate`` (tc syntax: ``"100mbit"``, ``"1gbit"``, ``"10gbit"``; ``None``/``"0"`` = unshaped) a
``tbf`` qdisc is the root qdisc on both ends of every veth: the namespace side shapes what the host sends (its
upload), the bridge side what it receives (its download); like a full-duplex NIC on a non-blocking switch.
:func:`tbf_params` picks the bucket: ``burst`` = max(rate/HZ, 128 KiB) (tbf cannot pass a packet bigger than the
bucket, the man page asks for at least rate/HZ, and with GSO a veth hands the qdisc packets of up to 64 KiB; 128 KiB
keeps two of them in flight); ``limit`` = burst + max(5 ms of rate, 256 KiB) of queue, enough for TCP to keep the
link busy without bufferbloat (HZ: CONFIG_HZ of the running kernel, 100 if unknown). Goodput of a long TCP stream
is ~96% of the rate, because tbf counts Ethernet/IP/TCP headers as a real link does; a transfer shorter than
``burst`` goes through at memory speed. Measured on a 2-core VM (HZ=250; one stream for 1 s, timed by the
receiver, :meth:`Cluster.measure_bandwidth`): 100mbit -> 97, 1gbit -> 960, 10gbit -> 9600 Mbit/s, unshaped ~30
Gbit/s; 10gbit needs a mostly idle machine (about 5 Gbit/s while other jobs used both cores).

Torchrun. :meth:`Cluster.torchrun` starts one ``torch.distributed.run`` per host, all joining one c10d rendezvous
hosted by the agent of the first host. Besides the usual ``--nnodes/--nproc-per-node/--rdzv-*`` flags it needs
(each checked with torch 2.13 and gloo, 2 hosts x 1 process, by leaving it out):

* ``--local-addr <addr(i)>``: the address a node advertises. The agent that becomes node rank 0 hosts the workers'
  TCPStore and publishes its address as ``MASTER_ADDR``; without the flag that is ``socket.getfqdn()``, i.e. the
  machine's hostname, which every namespace shares and which resolves (via /etc/hosts) to an address that is
  loopback or absent inside a namespace: the other hosts connect to themselves and the job hangs.
* ``--rdzv-conf is_host=1`` on the first host and ``is_host=0`` on the others: the c10d rendezvous backend guesses
  whether it should host the rendezvous store by comparing the endpoint with the addresses the *hostname* resolves
  to; inside a namespace that guess is "no" everywhere, nobody hosts the store and every agent hangs.
* env ``GLOO_SOCKET_IFNAME=eth0`` (also ``NCCL_SOCKET_IFNAME``, ``TP_SOCKET_IFNAME``; ``env`` can override them):
  gloo binds to the address the hostname resolves to, falls back to 127.0.0.1 and advertises that to its peers
  ("Gloo connectFullMesh failed ... remote=[127.0.0.1]"). ``PLAIT_*`` are not set: plait's own detection (its host
  identity includes the netns inode; it advertises the address that routes towards MASTER_ADDR) works in
  namespaces as on real hosts.
* ``--max-restarts 0``: a failure is reported, not retried (a later ``--max-restarts`` in ``argv`` wins).

The workers' rank order across hosts is whatever the rendezvous decides (not necessarily host order); MASTER_ADDR
is the address of the host whose agent got node rank 0.

The workers' store is not the rendezvous store. Checked with torch 2.13 (a worker walks
``dist.distributed_c10d._get_default_store()`` down ``.underlying_store``: PrefixStore, PrefixStore, TCPStore): its
TCPStore is at ``MASTER_ADDR:MASTER_PORT``, a store the agent that got node rank 0 creates at the end of the
rendezvous on a *free port* (torch shares it with the workers: ``TORCHELASTIC_USE_AGENT_STORE=True``), e.g.
``10.x.y.1:41481`` while the rendezvous endpoint is ``10.x.y.1:29400``. The agent publishes that address in the
rendezvous store as ``torch.rendezvous.<rdzv_id>.<round>/MASTER_ADDR`` and ``.../MASTER_PORT``.

Summation servers under torchrun. ``torchrun(..., servers=None|True|False|k)`` (CLI ``torchrun --servers k``, default
every server host) starts, before the agents, one launcher per server host that connects to the rendezvous store
(``addr(hosts[0]):port``; it waits for it to come up), waits for round 0 of the rendezvous to publish
MASTER_ADDR/MASTER_PORT, and then runs ``python -m plait.server MASTER_ADDR:MASTER_PORT [server_args]`` in the same
process (runpy; same PID, so ``last_servers.pids`` are the servers' PIDs). The workers get ``PLAIT_SERVERS=k``
(unless ``env`` sets PLAIT_SERVERS). A watcher thread sends every server SIGTERM once all agents have exited
(plait-server then prints its counters and exits 0); ``last_servers.wait()`` returns each server's exit status,
output and ``--stats`` counters (the CLI prefixes server output with ``[sJ]`` and fails if a server did). With
``--max-restarts`` > 0 a restarted job may get a new store in a later round: the servers keep serving round 0's.

Safety. Everything ``up()`` creates is recorded, as it is created, in a state file
``/run/plait-cluster/<name>.json`` (directory overridable by ``$PLAIT_CLUSTER_STATE_DIR``) together with the
interface index / namespace inode it got, and ``down()`` deletes only those recorded objects that still carry that
identity. ``up()`` refuses a name whose namespaces, interfaces or state file exist, and picks (or checks) a /24 that
overlaps no address, route, gateway or DNS server of the root namespace and no other cluster's. A failed ``up()``
rolls back what it made. A cluster is torn down by ``down()``, on leaving a ``with`` block (also on exceptions), on
SIGINT/SIGTERM (handlers installed while a cluster is up, if ``up()`` ran in the main thread and the signal is not
ignored; they tear down every cluster this process owns, restore the previous handlers and then run them, so
SIGINT still raises KeyboardInterrupt and SIGTERM still ends the process) and at interpreter exit. A signal that
arrives while ``up()``/``down()`` is mid-way is handled when it returns. A cluster made by the CLI ``up`` stays up
until ``down``; after a SIGKILL the state file remains and ``down --name N`` / ``down --all`` clean up.

TCP congestion control. A new namespace starts with the root namespace's ``net.ipv4.tcp_congestion_control``
(e.g. bbr on a VM that set it) and may switch only to one listed in ``tcp_allowed_congestion_control``;
``Cluster(..., tcp_cc="reno")`` (CLI ``up --tcp-cc reno``) sets it in every host. It matters with many flows into
one link (summation servers: n workers into each server's download): bench/servers.py measured 4 x 24 MiB
back-to-back all-reduces through 4 servers at 0.92x the ring with bbr and 1.17x with reno.

Firewall. With ``br_netfilter`` loaded (``net.bridge.bridge-nf-call-iptables=1``, e.g. after Docker started) frames
crossing a Linux bridge traverse the iptables FORWARD chain, whose policy Docker sets to DROP. If that sysctl is on
and ``iptables -S FORWARD`` shows anything but an empty ACCEPT chain, ``up()`` inserts ``-I FORWARD -i plbr<name>
-o plbr<name> -j ACCEPT`` (recorded; deleted by ``down()``). In any case ``up()`` checks that a TCP connection from
host 0 to the last host and one from the root namespace to host 0 work, and fails with an explanation if not.

CLI::

    python -m plait.testing.cluster up --hosts 4 --rate 1gbit [--servers K] [--name N] [--subnet 10.201.7.0/24]
    python -m plait.testing.cluster list | status [--name N]
    python -m plait.testing.cluster run [--name N] --host I | --server J -- cmd args...
    python -m plait.testing.cluster torchrun [--name N] --nproc-per-host R [--port P] [--servers K]
                                             [--server-arg=--threads=2 ...] -- script.py args...
    python -m plait.testing.cluster down [--name N] | down --all
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import gzip
import hashlib
import ipaddress
import json
import operator
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

__all__ = ["Cluster", "ClusterError", "ServerGroup", "ServerResult", "available", "list_clusters", "parse_rate", "tbf_params", "state_dir", "main"]

MAX_HOSTS = 253  # .1 .. .253; .254 is the bridge
_NAME_RE = re.compile(r"^[a-z0-9]{1,5}$")
_IFACE = "eth0"


class ClusterError(RuntimeError):
    """Raised for anything the harness could not do; the message names the failed command and its stderr."""


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def state_dir() -> str:
    return os.environ.get("PLAIT_CLUSTER_STATE_DIR") or "/run/plait-cluster"


def _state_path(name: str) -> str:
    return os.path.join(state_dir(), f"{name}.json")


def _sh(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a harness command (ip, tc, iptables) with captured output; ClusterError with its stderr on failure."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise ClusterError(f"`{' '.join(argv)}` failed: {argv[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"`{' '.join(argv)}` timed out after {timeout:.0f}s") from e
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout or "").strip()
        raise ClusterError(f"`{' '.join(argv)}` failed (exit {p.returncode}): {err or 'no output'}")
    return p


def _ifindex(dev: str) -> int | None:
    try:
        with open(f"/sys/class/net/{dev}/ifindex") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _netns_ident(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/run/netns/{ns}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in_netns(idents: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """PIDs whose network namespace is one of ``idents`` (what ``ip netns pids`` does, for several at once)."""
    want = {tuple(i): [] for i in idents}
    if not want:
        return want
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}/ns/net")
        except OSError:  # gone, zombie, or a kernel thread
            continue
        key = (st.st_dev, st.st_ino)
        if key in want and int(d) != me:
            want[key].append(int(d))
    return want


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pids: Iterable[int]) -> set[int]:
    kids = _children_map()
    out: set[int] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        for c in kids.get(p, ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _kernel_hz() -> int:
    """CONFIG_HZ of the running kernel (from /proc/config.gz or /boot/config-*), 100 when unknown (worst case)."""
    rel = os.uname().release
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{rel}", open)):
        try:
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except (OSError, ValueError):
            continue
    return 100


_RATE_UNITS = {
    "": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
    "kibps": 8 * 2**10, "mibps": 8 * 2**20, "gibps": 8 * 2**30, "tibps": 8 * 2**40,
}  # fmt: skip


def parse_rate(rate: Any) -> int:
    """Bits per second for a tc rate (``"1gbit"``, ``"100mbit"``, ``"125mbps"`` = bytes/s, a bare number = bit/s);
    0 for unshaped (``None``, ``0``, ``"0"``, ``""``, ``"none"``)."""
    if rate is None:
        return 0
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        if rate < 0:
            raise ClusterError(f"invalid rate {rate!r}")
        return int(rate)
    s = str(rate).strip().lower()
    if s in ("", "0", "none", "unshaped", "off"):
        return 0
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", s)
    if not m or m.group(2) not in _RATE_UNITS:
        raise ClusterError(f"invalid rate {rate!r}: use tc syntax such as 100mbit, 1gbit, 10gbit (or None/'0')")
    bps = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if bps < 8000 and bps != 0:
        raise ClusterError(f"rate {rate!r} is below 8kbit")
    return bps


def tbf_params(rate_bps: int, hz: int | None = None) -> tuple[int, int]:
    """(burst, limit) in bytes for a tbf at ``rate_bps``; see the module docstring."""
    byte_rate = rate_bps / 8
    hz = hz or _kernel_hz()
    burst = int(max(byte_rate / hz, min(128 * 1024, byte_rate), 3028))
    limit = burst + int(max(byte_rate * 0.005, 256 * 1024))
    return burst, limit


def _nameservers() -> list[str]:
    out = []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append(parts[1])
    except OSError:
        pass
    return out


def _used_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 network the root namespace knows about: addresses, routes (all tables), gateways, DNS servers."""
    used: list[tuple[ipaddress.IPv4Network, str]] = []

    def add(text: str | None, what: str) -> None:
        if not text or text == "default":
            return
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return
        if net.version == 4 and net.prefixlen > 0:
            used.append((net, what))

    p = _sh(["ip", "-j", "-4", "addr", "show"], check=False)
    try:
        for link in json.loads(p.stdout or "[]"):
            for a in link.get("addr_info", []):
                add(f"{a.get('local')}/{a.get('prefixlen', 32)}", f"address on {link.get('ifname')}")
    except ValueError:
        pass
    p = _sh(["ip", "-j", "-4", "route", "show", "table", "all"], check=False)
    try:
        for r in json.loads(p.stdout or "[]"):
            add(r.get("dst"), f"route via {r.get('dev')}")
            add(r.get("gateway"), "gateway")
    except ValueError:
        pass
    for ns in _nameservers():
        add(ns, "nameserver in /etc/resolv.conf")
    return used


def _pick_subnet(name: str, requested: str | None) -> ipaddress.IPv4Network:
    used = _used_networks()
    for st in list_clusters():
        if st.get("name") != name and st.get("subnet"):
            used.append((ipaddress.ip_network(st["subnet"]), f"cluster {st['name']}"))

    def clash(net: ipaddress.IPv4Network) -> str | None:
        for u, what in used:
            if net.overlaps(u):
                return f"{u} ({what})"
        return None

    if requested:
        text = str(requested).strip()
        if "/" not in text:
            text += "/24"
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError as e:
            raise ClusterError(f"invalid subnet {requested!r}: {e}") from e
        if net.version != 4 or net.prefixlen != 24:
            raise ClusterError(f"subnet {requested!r} must be an IPv4 /24")
        c = clash(net)
        if c:
            raise ClusterError(f"subnet {net} collides with {c}")
        return net
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    span = 55 * 256  # 10.200.0.0 - 10.254.255.0
    for k in range(span):
        idx = (h + k * 7919) % span
        net = ipaddress.ip_network(f"10.{200 + idx // 256}.{idx % 256}.0/24")
        if not clash(net):
            return net
    raise ClusterError("no free /24 in 10.200.0.0-10.254.255.255")


# ----------------------------------------------------------------------------------------------------------------
# availability


_AVAIL: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") when clusters can be made here: root, ip and tc present, network namespaces creatable."""
    global _AVAIL
    if _AVAIL is not None:
        return _AVAIL
    if os.geteuid() != 0:
        return False, "needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found (install iproute2)"
    probe = f"plait-probe-{os.getpid()}-{secrets.token_hex(3)}"
    p = _sh(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        return False, f"cannot create network namespaces: {(p.stderr or '').strip() or 'exit %d' % p.returncode}"
    _sh(["ip", "netns", "del", probe], check=False)
    _AVAIL = (True, "")
    return _AVAIL


# ----------------------------------------------------------------------------------------------------------------
# teardown on signals / exit


_REG_LOCK = threading.RLock()
_LIVE: dict[int, "Cluster"] = {}
_PREV_HANDLERS: dict[int, Any] = {}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_busy = 0  # >0 while the main thread is inside up()/down(): a signal then is handled when it leaves
_pending: list[int] = []
_handling = False
_atexit_registered = False


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _register(c: "Cluster") -> None:
    global _atexit_registered
    with _REG_LOCK:
        _LIVE[id(c)] = c
        if not _atexit_registered:
            atexit.register(_down_all_owned, "interpreter exit")
            _atexit_registered = True
        if _is_main_thread() and not _PREV_HANDLERS:
            for s in _SIGNALS:
                prev = signal.getsignal(s)
                if prev == signal.SIG_IGN:  # e.g. SIGINT of a background job: it stays ignored
                    continue
                signal.signal(s, _on_signal)
                _PREV_HANDLERS[s] = prev


def _unregister(c: "Cluster") -> None:
    with _REG_LOCK:
        _LIVE.pop(id(c), None)
        if not _LIVE and _PREV_HANDLERS and _is_main_thread():
            for s, prev in _PREV_HANDLERS.items():
                if signal.getsignal(s) is _on_signal:  # leave a handler someone installed after us alone
                    signal.signal(s, prev if prev is not None else signal.SIG_DFL)
            _PREV_HANDLERS.clear()


def _down_all_owned(why: str) -> None:
    for c in list(_LIVE.values()):
        if c._owner_pid != os.getpid():  # a forked child does not own its parent's clusters
            continue
        try:
            c.down()
        except Exception as e:  # noqa: BLE001
            print(f"plait.testing.cluster: tearing down {c.name} at {why} failed: {e}", file=sys.stderr)


def _on_signal(sig: int, frame: Any) -> None:
    if _busy or _handling:
        _pending.append(sig)
        return
    _handle_signal(sig, frame)


def _handle_signal(sig: int, frame: Any) -> None:
    global _handling
    prev = _PREV_HANDLERS.get(sig, signal.SIG_DFL)
    _handling = True
    try:
        _down_all_owned(signal.Signals(sig).name)
    finally:
        _handling = False
        _pending.clear()
    if callable(prev) and prev is not _on_signal:
        prev(sig, frame)  # e.g. signal.default_int_handler raises KeyboardInterrupt
    elif prev == signal.SIG_IGN:
        return
    else:  # SIG_DFL: die of the signal, as the process would have without us
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)


@contextlib.contextmanager
def _critical():
    """Defer SIGINT/SIGTERM handling in the main thread until up()/down() has finished its bookkeeping."""
    global _busy
    main = _is_main_thread()
    if main:
        _busy += 1
    try:
        yield
    finally:
        if main:
            _busy -= 1
            if _busy == 0 and _pending and not _handling:
                sig = _pending[0]
                _pending.clear()
                _handle_signal(sig, None)


@contextlib.contextmanager
def _state_lock():
    """Serialize up() across processes (name claim, subnet choice) with an flock on <state dir>/.lock."""
    import fcntl

    d = state_dir()
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def list_clusters() -> list[dict]:
    """The state of every cluster that has a state file (as dicts, sorted by name)."""
    d = state_dir()
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for fn in names:
        if not fn.endswith(".json") or fn.startswith("."):
            continue
        try:
            with open(os.path.join(d, fn)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(st, dict) and st.get("name") == fn[:-5]:
            out.append(st)
    return out


# ----------------------------------------------------------------------------------------------------------------
# connectivity probe: sockets are bound to the namespace of the thread that creates them, so one short-lived
# thread can setns() into host B, listen, setns() into host A and connect -- no processes to start.

_CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({path}): {os.strerror(e)}")
    finally:
        os.close(fd)


def _probe(pairs: list[tuple[str | None, str | None, str]], timeout: float = 5.0) -> str | None:
    """For each (from_ns, to_ns, to_addr) (None = root namespace) check that a TCP connection works.

    Returns None, or a description of the first failure."""
    result: dict[str, str] = {}
    here = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net"  # the namespace up() runs in

    def body() -> None:
        socks: list[socket.socket] = []
        try:
            for src, dst, addr in pairs:
                what = f"{src or 'root namespace'} -> {addr} ({dst or 'root namespace'})"
                _setns(f"/run/netns/{dst}" if dst else here)
                srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(srv)
                srv.bind((addr, 0))
                srv.listen(1)
                srv.settimeout(timeout)
                _setns(f"/run/netns/{src}" if src else here)
                cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(cli)
                cli.settimeout(timeout)
                try:
                    cli.connect((addr, srv.getsockname()[1]))
                    conn, _ = srv.accept()
                    socks.append(conn)
                    cli.sendall(b"plait")
                    conn.settimeout(timeout)
                    if conn.recv(5) != b"plait":
                        raise OSError("data did not arrive")
                except OSError as e:
                    result["err"] = f"TCP {what} failed: {e}"
                    return
        except OSError as e:
            result["err"] = f"connectivity probe could not run: {e}"
        finally:
            for s in socks:
                s.close()

    t = threading.Thread(target=body, name="plait-cluster-probe", daemon=True)
    t.start()
    t.join(timeout * len(pairs) + 5)
    if t.is_alive():
        return "connectivity probe hung"
    return result.get("err")


# ----------------------------------------------------------------------------------------------------------------
# firewall (br_netfilter / Docker)


def bridge_netfilter_status() -> dict:
    """What decides whether bridged frames are filtered: the br_netfilter sysctl and the iptables FORWARD chain."""
    info: dict[str, Any] = {"bridge_nf_call_iptables": None, "iptables": shutil.which("iptables"), "forward": None}
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as f:
            info["bridge_nf_call_iptables"] = f.read().strip() == "1"
    except OSError:
        info["bridge_nf_call_iptables"] = False  # br_netfilter not loaded: bridged frames skip iptables
    if info["iptables"]:
        p = _sh(["iptables", "-w", "-S", "FORWARD"], check=False)
        info["forward"] = p.stdout.strip().splitlines() if p.returncode == 0 else None
    return info


# ----------------------------------------------------------------------------------------------------------------
# bandwidth measurement (run with `python -S -c`, so no site-packages / torch import)

_BW_RECV = r"""
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0; t0 = None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    if t0 is None:
        t0 = time.perf_counter()
    n += k
print(n, time.perf_counter() - t0 if t0 else 0.0, flush=True)
"""

_BW_SEND = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
chunk = b"\0" * (1 << 20); mode, amount = sys.argv[3], float(sys.argv[4])
if mode == "bytes":
    left = int(amount)
    while left > 0:
        s.sendall(chunk[: min(left, len(chunk))]); left -= min(left, len(chunk))
else:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < amount:
        s.sendall(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
"""


# ----------------------------------------------------------------------------------------------------------------
# summation servers (plait-server) beside a torchrun job

# Runs on a server host: waits until the job's c10d rendezvous (round 0) has published the address of the workers'
# TCPStore (MASTER_ADDR / MASTER_PORT under the rendezvous' key prefix in the rendezvous store), then runs
# ``python -m plait.server <that address> <args>`` in this same process (runpy: same PID, torch imported once).
# argv: rdzv_host rdzv_port rdzv_id timeout_s server_args...
_SERVER_LAUNCH = r"""
import datetime, os, runpy, signal, socket, sys, time
def _stopped(sig, frame):
    print("plait.testing.cluster: server stopped (signal %d) before the workers' store was known" % sig, flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, _stopped)
signal.signal(signal.SIGINT, _stopped)
host, port, rid, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + timeout
while True:
    try:
        socket.create_connection((host, port), timeout=2.0).close()
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit("plait.testing.cluster: the rendezvous store at %s:%d did not come up within %.0f s: %s"
                     % (host, port, timeout, e))
        time.sleep(0.1)
import torch.distributed as dist
left = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=left)
prefix = "torch.rendezvous.%s.0/" % rid
keys = [prefix + "MASTER_ADDR", prefix + "MASTER_PORT"]
try:
    store.wait(keys, datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
except Exception as e:
    sys.exit("plait.testing.cluster: rendezvous %s at %s:%d published no workers' store within %.0f s: %s"
             % (rid, host, port, timeout, e))
endpoint = "%s:%s" % tuple(store.get(k).decode() for k in keys)
del store
print("plait.testing.cluster: the workers' store is at %s (rendezvous %s at %s:%d); starting plait-server"
      % (endpoint, rid, host, port), flush=True)
sys.argv = ["plait.server", endpoint] + sys.argv[5:]
runpy.run_module("plait.server", run_name="__main__", alter_sys=True)
"""


class ServerResult:
    """One plait-server of a torchrun job, once stopped: its host, exit status, output and counters."""

    def __init__(self, host: int, addr: str, pid: int, returncode: int | None, output: str, stats: dict | None):
        self.host = host  # host index (a server host: >= Cluster.hosts)
        self.addr = addr  # the host's address
        self.pid = pid
        self.returncode = returncode
        self.output = output  # stdout and stderr, interleaved
        self.stats = stats  # plait-server --stats (None if it never served, e.g. stopped before the job's store)

    @property
    def endpoint(self) -> str | None:
        """The workers' store the server was given (from its output), None if it never got that far."""
        m = re.search(r"plait-server: serving the job at (\S+) on", self.output)
        return m.group(1) if m else None

    def __repr__(self) -> str:
        return f"ServerResult(host={self.host}, addr={self.addr!r}, pid={self.pid}, returncode={self.returncode})"


class ServerGroup:
    """The plait-server processes Cluster.torchrun() started for one job (one per server host used).

    Started before the torchrun agents; stopped (SIGTERM, then SIGKILL after ``stop_timeout``) by a watcher thread
    once every agent has exited, or by stop(). wait() blocks until they are stopped and returns one ServerResult
    each. Output is read by a thread per server (``on_line(j, line)`` is called for each line if given)."""

    def __init__(self, cluster: "Cluster", hosts: list[int], endpoint: str, rdzv_id: str, env: dict,
                 server_args: Sequence[str], connect_timeout: float, on_line: Any = None,
                 stop_timeout: float = 30.0, **popen_kw: Any):
        import tempfile

        self.cluster = cluster
        self.hosts = list(hosts)
        self.rdzv_endpoint = endpoint
        self.rdzv_id = rdzv_id
        self.stop_timeout = stop_timeout
        self._tmp = tempfile.mkdtemp(prefix="plait_cluster_servers_")
        self._lines: list[list[str]] = [[] for _ in self.hosts]
        self._readers: list[threading.Thread] = []
        self._done = threading.Event()
        self._stop_lock = threading.Lock()
        self._results: list[ServerResult] | None = None
        self.procs: list[subprocess.Popen] = []
        rhost, rport = endpoint.rsplit(":", 1)
        kw = dict(popen_kw)
        kw.setdefault("start_new_session", True)  # a Ctrl-C reaches the caller, which stops us after the agents
        try:
            for j, h in enumerate(self.hosts):
                argv = [sys.executable, "-c", _SERVER_LAUNCH, rhost, rport, rdzv_id, str(connect_timeout),
                        *server_args, "--stats", self._stats_path(j)]
                p = cluster.popen(h, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, **kw)
                self.procs.append(p)
                t = threading.Thread(target=self._read, args=(j, p, on_line), daemon=True,
                                     name=f"plait-cluster-server{j}")
                t.start()
                self._readers.append(t)
        except BaseException:
            self.stop()
            raise

    def _stats_path(self, j: int) -> str:
        return os.path.join(self._tmp, f"server{j}.json")

    def _read(self, j: int, p: subprocess.Popen, on_line: Any) -> None:
        assert p.stdout is not None
        for raw in iter(p.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self._lines[j].append(line)
            if on_line is not None:
                with contextlib.suppress(Exception):
                    on_line(j, line)

    @property
    def pids(self) -> list[int]:
        """The plait-server PIDs (ip netns exec and the launcher exec/run in place: the Popen PIDs)."""
        return [p.pid for p in self.procs]

    def output(self, j: int) -> str:
        """Server j's output so far."""
        return "\n".join(self._lines[j])

    def watch(self, agents: Sequence[subprocess.Popen], poll_s: float = 0.1) -> None:
        """Stop the servers (in a daemon thread) once every one of ``agents`` has exited."""

        def body() -> None:
            while any(a.poll() is None for a in agents):
                time.sleep(poll_s)
            self.stop()

        threading.Thread(target=body, daemon=True, name="plait-cluster-server-watch").start()

    def stop(self) -> list[ServerResult]:
        """SIGTERM every server still running, wait (SIGKILL after stop_timeout), collect. Idempotent."""
        with self._stop_lock:
            if self._results is not None:
                return self._results
            for p in self.procs:
                if p.poll() is None:
                    _kill(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill(p.pid, signal.SIGKILL)
                    p.wait()
            for t in self._readers:
                t.join(5)
            res = []
            for j, (h, p) in enumerate(zip(self.hosts, self.procs)):
                stats = None
                with contextlib.suppress(OSError, ValueError):
                    with open(self._stats_path(j)) as f:
                        stats = json.load(f)
                res.append(ServerResult(h, self.cluster.addr(h), p.pid, p.returncode, self.output(j), stats))
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._results = res
            self._done.set()
            return res

    def wait(self, timeout: float | None = None) -> list[ServerResult]:
        """Wait until the servers have been stopped (after the agents exited, or by stop()); their results."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the summation servers were not stopped within {timeout} s (agents still running?)")
        assert self._results is not None
        return self._results

    @property
    def results(self) -> list[ServerResult] | None:
        return self._results


class Cluster:
    """N emulated hosts (network namespaces) on one bridge, with tbf-shaped links. See the module docstring."""

    def __init__(self, hosts: int = 4, rate: Any = "1gbit", name: str | None = None, subnet: str | None = None,
                 servers: int = 0, tcp_cc: str | None = None):
        if not isinstance(hosts, int) or isinstance(hosts, bool) or not 1 <= hosts <= MAX_HOSTS:
            raise ClusterError(f"hosts must be an int in 1..{MAX_HOSTS}, got {hosts!r}")
        if not isinstance(servers, int) or isinstance(servers, bool) or not 0 <= servers <= MAX_HOSTS - hosts:
            raise ClusterError(f"servers must be an int in 0..{MAX_HOSTS - hosts} (at most {MAX_HOSTS} hosts in "
                               f"all), got {servers!r}")
        if name is not None and not _NAME_RE.match(str(name)):
            raise ClusterError(f"invalid cluster name {name!r}: 1-5 characters [a-z0-9]")
        self._hosts = hosts
        self._servers = servers
        if tcp_cc is not None and not re.fullmatch(r"[a-z0-9_]{1,16}", str(tcp_cc)):
            raise ClusterError(f"invalid TCP congestion control name {tcp_cc!r}")
        self._tcp_cc = tcp_cc
        self._rate_bps = parse_rate(rate)
        self._rate = "0" if self._rate_bps == 0 else str(rate).strip()
        self._name_given = name is not None
        self._name = name if name is not None else self._random_name()
        self._subnet_req = subnet
        self._subnet: ipaddress.IPv4Network | None = None
        self._state: dict | None = None
        self._lock = threading.RLock()
        self._procs: list[tuple[int, subprocess.Popen]] = []
        self._owner_pid: int | None = None
        self._state_file: str | None = None  # fixed once the name is claimed
        self.last_servers: ServerGroup | None = None  # the summation servers of the latest torchrun(), if any

    # -- identity ------------------------------------------------------------------------------------------------
    @staticmethod
    def _random_name() -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        return secrets.choice("abcdefghijklmnopqrstuvwxyz") + "".join(secrets.choice(alphabet) for _ in range(4))

    @property
    def hosts(self) -> int:
        """The number of worker hosts (indices 0..hosts-1); server hosts come after them."""
        return self._hosts

    @property
    def servers(self) -> int:
        """The number of server hosts (indices hosts..hosts+servers-1; see server_host())."""
        return self._servers

    @property
    def nodes(self) -> int:
        """Every emulated host: worker hosts, then server hosts."""
        return self._hosts + self._servers

    def is_server_host(self, i: int) -> bool:
        return self._check_host(i) >= self._hosts

    def server_host(self, j: int) -> int:
        """The host index of server host j (0..servers-1): hosts + j; usable with ns(), veth(), addr(), popen()..."""
        try:
            j = operator.index(j)
        except TypeError:
            raise ClusterError(f"server index must be an int, got {j!r}") from None
        if not 0 <= j < self._servers:
            raise ClusterError(f"server index {j!r} out of range: cluster {self._name} has {self._servers} server "
                               f"host(s)")
        return self._hosts + j

    def server_ns(self, j: int) -> str:
        return self.ns(self.server_host(j))

    def server_veth(self, j: int) -> str:
        return self.veth(self.server_host(j))

    def server_addr(self, j: int) -> str:
        return self.addr(self.server_host(j))

    @property
    def name(self) -> str:
        return self._name

    @property
    def rate(self) -> str:
        """The rate as given (tc syntax), "0" when unshaped."""
        return self._rate

    @property
    def rate_bps(self) -> int:
        return self._rate_bps

    @property
    def is_up(self) -> bool:
        return self._state is not None and bool(self._state.get("complete"))

    @property
    def subnet(self) -> str:
        return str(self._need_subnet())

    @property
    def bridge(self) -> str:
        return f"plbr{self._name}"

    @property
    def bridge_addr(self) -> str:
        return str(self._need_subnet().network_address + 254)

    @property
    def state_file(self) -> str:
        return self._state_file or _state_path(self._name)

    def _check_host(self, i: int) -> int:
        try:
            i = operator.index(i)
        except TypeError:
            raise ClusterError(f"host index must be an int, got {i!r}") from None
        if not 0 <= i < self._hosts + self._servers:
            what = f" ({self._hosts} worker + {self._servers} server hosts)" if self._servers else ""
            raise ClusterError(f"host index {i!r} out of range 0..{self._hosts + self._servers - 1}{what}")
        return i

    def _need_subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise ClusterError(f"cluster {self._name} is not up (no subnet chosen yet)")
        return self._subnet

    def ns(self, i: int) -> str:
        return f"plait-{self._name}-h{self._check_host(i)}"

    def veth(self, i: int) -> str:
        """The bridge-side end of host i's veth pair (in the root namespace); the other end is eth0 in ns(i)."""
        return f"plv{self._name}-{self._check_host(i)}"

    def addr(self, i: int) -> str:
        return str(self._need_subnet().network_address + 1 + self._check_host(i))

    # -- running things ------------------------------------------------------------------------------------------
    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not a string")
        return ["ip", "netns", "exec", self.ns(i), *[a if isinstance(a, (str, bytes)) else os.fspath(a)
                                                    if isinstance(a, os.PathLike) else str(a) for a in argv]]

    def popen(self, i: int, argv: Sequence[str], env: dict | None = None, **kw: Any) -> subprocess.Popen:
        """Start argv on host i; ``env`` (a dict) is merged over os.environ."""
        if not self.is_up:
            raise ClusterError(f"cluster {self._name} is not up")
        cmd = self.cmd(i, argv)
        if env is not None:
            env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        p = subprocess.Popen(cmd, env=env, **kw)
        with self._lock:
            self._procs = [(h, q) for h, q in self._procs if q.returncode is None]
            self._procs.append((i, p))
        return p

    def run(self, i: int, argv: Sequence[str], env: dict | None = None, timeout: float | None = None,
            check: bool = False, **kw: Any) -> subprocess.CompletedProcess:
        """Like subprocess.run on host i; captures output as text unless stdout/stderr/text/... are given.

        On timeout the process is killed and subprocess.TimeoutExpired raised; ``check=True`` raises
        subprocess.CalledProcessError on a nonzero exit."""
        inp = kw.pop("input", None)
        capture = kw.pop("capture_output", True)
        if capture and "stdout" not in kw and "stderr" not in kw:
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        if "text" not in kw and "universal_newlines" not in kw and "encoding" not in kw and "errors" not in kw:
            kw["text"] = True
        if inp is not None:
            kw["stdin"] = subprocess.PIPE
        elif "stdin" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        with self.popen(i, argv, env=env, **kw) as p:
            try:
                out, err = p.communicate(inp, timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                raise subprocess.TimeoutExpired(p.args, timeout, output=out, stderr=err) from None
            except BaseException:
                p.kill()
                raise
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check:
            cp.check_returncode()
        return cp

    def pids(self, i: int) -> list[int]:
        """PIDs of the processes inside host i's namespace (as ``ip netns pids``)."""
        ident = _netns_ident(self.ns(i))
        if ident is None:
            return []
        return sorted(_pids_in_netns([ident])[ident])

    def kill_host(self, i: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` to every process of host i (also ones popen() started that have not entered it yet).

        With SIGKILL, waits until the namespace is empty (what a crashed machine looks like to the others)."""
        self._check_host(i)
        with self._lock:
            mine = [p for h, p in self._procs if h == i and p.returncode is None]
        for p in mine:
            if p.poll() is None:
                _kill(p.pid, sig)
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids(i)
            for pid in pids:
                _kill(pid, sig)
            if sig != signal.SIGKILL or not pids:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"processes {pids} of host {i} ({self.ns(i)}) survived SIGKILL for {timeout}s")
            time.sleep(0.01)
        for p in mine:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=0.5 if sig == signal.SIGKILL else 0)

    def _server_count(self, servers: Any) -> int:
        if servers is None:
            return self._servers
        if servers is True:
            if not self._servers:
                raise ClusterError(f"torchrun(servers=True): cluster {self._name} has no server hosts "
                                   f"(Cluster(..., servers=k) / up --servers k)")
            return self._servers
        if servers is False:
            return 0
        try:
            k = operator.index(servers)
        except TypeError:
            raise ClusterError(f"servers must be None, a bool or an int, got {servers!r}") from None
        if not 0 <= k <= self._servers:
            raise ClusterError(f"torchrun(servers={k}): cluster {self._name} has {self._servers} server host(s)")
        return k

    def torchrun(self, nproc_per_host: int, argv: Sequence[str], env: dict | None = None, port: int = 29400,
                 hosts: Sequence[int] | None = None, rdzv_id: str | None = None, servers: Any = None,
                 server_args: Sequence[str] = (), server_env: dict | None = None, server_on_line: Any = None,
                 server_connect_timeout: float = 600.0, **popen_kw: Any) -> list[subprocess.Popen]:
        """One ``torch.distributed.run`` agent per host (``hosts``: indices, default every worker host), one Popen
        each.

        The c10d rendezvous store is hosted by the agent of ``hosts[0]`` at ``addr(hosts[0]):port``; see the module
        docstring for the flags (``--local-addr``, ``--rdzv-conf is_host=``) and env (``GLOO_SOCKET_IFNAME=eth0``)
        that cross-namespace runs need. ``env`` is merged over os.environ and those defaults. ``argv`` is what
        follows the torchrun options (script and its arguments); put extra torchrun options before the script.

        Summation servers: ``servers`` None (default) = every server host of the cluster (none if it has none),
        True = the same but an error if it has none, False/0 = none, k = the first k server hosts. Before the agents,
        one plait-server is started on each (``server_args`` appended to its command line; ``server_env`` merged
        over os.environ and ``env``); it waits for the rendezvous to publish the workers' store and serves that
        store (see the module docstring). The workers get ``PLAIT_SERVERS=k`` unless ``env`` sets PLAIT_SERVERS.
        The servers are stopped (SIGTERM) once every agent has exited; ``self.last_servers`` (a ServerGroup) has
        their PIDs, and ``self.last_servers.wait()`` returns their exit status, output and --stats counters."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not a string")
        hs = list(range(self._hosts)) if hosts is None else [self._check_host(h) for h in hosts]
        if not hs:
            raise ClusterError("torchrun: no hosts")
        nsrv = self._server_count(servers)
        rid = rdzv_id or f"plait-{self._name}-{uuid.uuid4().hex[:8]}"
        endpoint = f"{self.addr(hs[0])}:{int(port)}"
        user_env = {k: str(v) for k, v in (env or {}).items()}
        group = None
        self.last_servers = None
        if nsrv:
            if not self.is_up:
                raise ClusterError(f"cluster {self._name} is not up")
            senv = {**user_env, **{k: str(v) for k, v in (server_env or {}).items()}}
            skw = {k: v for k, v in popen_kw.items() if k in ("preexec_fn", "start_new_session", "cwd")}
            group = ServerGroup(self, [self.server_host(j) for j in range(nsrv)], endpoint, rid, senv,
                                list(server_args), server_connect_timeout, on_line=server_on_line, **skw)
            self.last_servers = group
            user_env.setdefault("PLAIT_SERVERS", str(nsrv))
        procs = []
        try:
            for k, h in enumerate(hs):
                e = {"GLOO_SOCKET_IFNAME": _IFACE, "NCCL_SOCKET_IFNAME": _IFACE, "TP_SOCKET_IFNAME": _IFACE}
                e.update(user_env)
                args = [sys.executable, "-m", "torch.distributed.run",
                        "--nnodes", str(len(hs)), "--nproc-per-node", str(nproc_per_host),
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rid,
                        "--rdzv-conf", f"is_host={1 if k == 0 else 0}",
                        "--local-addr", self.addr(h)]  # fmt: skip
                args += ["--max-restarts", "0"]  # a later --max-restarts in argv wins (argparse: last one counts)
                procs.append(self.popen(h, args + list(argv), env=e, **popen_kw))
        except BaseException:
            for p in procs:
                p.kill()
            if group is not None:
                group.stop()
            raise
        if group is not None:
            group.watch(procs)
        return procs

    def measure_bandwidth(self, src: int, dst: int, seconds: float = 1.0, nbytes: int | None = None,
                          timeout: float = 60.0) -> dict:
        """One TCP stream from host ``src`` to host ``dst`` (a tiny iperf): for ``seconds``, or ``nbytes`` if given.

        Returns {"bytes", "seconds", "mbit_s"}, timed by the receiver from its first byte to the sender's close (so
        the first bucket's worth of data arrives "for free" and a sender-side queue drains before the clock
        stops)."""
        self._check_host(src)
        self._check_host(dst)
        recv = subprocess.Popen(self.cmd(dst, [sys.executable, "-S", "-c", _BW_RECV, self.addr(dst)]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        with self._lock:
            self._procs.append((dst, recv))
        try:
            assert recv.stdout is not None
            port = recv.stdout.readline().strip()
            if not port.isdigit():
                raise ClusterError(f"bandwidth receiver failed: {port} {recv.stderr.read() if recv.stderr else ''}")
            limit = ["bytes", str(nbytes)] if nbytes is not None else ["seconds", str(seconds)]
            snd = self.run(src, [sys.executable, "-S", "-c", _BW_SEND, self.addr(dst), port, *limit], timeout=timeout)
            if snd.returncode != 0:
                raise ClusterError(f"bandwidth sender failed: {snd.stderr.strip()}")
            out, err = recv.communicate(timeout=timeout)
            if recv.returncode != 0:
                raise ClusterError(f"bandwidth receiver failed: {err.strip()}")
            n, dt = out.split()
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        n, dt = int(n), float(dt)
        return {"bytes": n, "seconds": dt, "mbit_s": n * 8 / dt / 1e6 if dt > 0 else float("inf")}

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        self.up()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        srv = f", servers={self._servers}" if self._servers else ""
        return f"Cluster(name={self._name!r}, hosts={self._hosts}{srv}, rate={self._rate!r}, {state})"

    def _save(self) -> None:
        assert self._state is not None
        path = self.state_file
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self._state, f, indent=1)
        os.replace(tmp, path)

    def _names_in_use(self) -> list[str]:
        taken = []
        if os.path.exists(self.state_file):
            taken.append(f"state file {self.state_file}")
        if _ifindex(self.bridge) is not None:
            taken.append(f"interface {self.bridge}")
        for i in range(self.nodes):
            if os.path.exists(f"/run/netns/{self.ns(i)}"):
                taken.append(f"namespace {self.ns(i)}")
            if _ifindex(self.veth(i)) is not None:
                taken.append(f"interface {self.veth(i)}")
        return taken

    def up(self) -> "Cluster":
        """Create the namespaces, bridge, veths and qdiscs; on failure roll back what was made and raise."""
        with self._lock:
            if self._state is not None:
                raise ClusterError(f"cluster {self._name} is already up")
            ok, why = available()
            if not ok:
                raise ClusterError(f"cannot make an emulated cluster: {why}")
            self._owner_pid = os.getpid()
            _register(self)
            try:
                with _critical():
                    try:
                        with _state_lock():
                            self._claim()
                            self._build()
                    except BaseException as e:
                        self._rollback(e)
                        if isinstance(e, ClusterError) or not isinstance(e, Exception):
                            raise
                        raise ClusterError(f"cluster {self._name}: up failed: {type(e).__name__}: {e}") from e
            except BaseException:
                if self._state is None:
                    _unregister(self)
                raise
        return self

    def _claim(self) -> None:
        for _ in range(20):
            taken = self._names_in_use()
            if not taken:
                break
            if self._name_given:
                raise ClusterError(f"cluster name {self._name!r} is taken: {', '.join(taken)} already exist(s); "
                                   f"pick another name (or `down --name {self._name}` if it is a cluster of ours)")
            self._name = self._random_name()
        else:
            raise ClusterError("could not find a free cluster name")
        self._subnet = _pick_subnet(self._name, self._subnet_req)
        rate_bps = self._rate_bps
        burst, limit = tbf_params(rate_bps) if rate_bps else (None, None)
        state = {
            "version": 1,
            "name": self._name,
            "hosts": self._hosts,
            "servers": self._servers,
            "tcp_cc": self._tcp_cc,
            "rate": self._rate,
            "rate_bps": rate_bps,
            "tbf": {"burst": burst, "limit": limit} if rate_bps else None,
            "subnet": str(self._subnet),
            "bridge": self.bridge,
            "bridge_addr": self.bridge_addr,
            "namespaces": [self.ns(i) for i in range(self.nodes)],
            "addrs": [self.addr(i) for i in range(self.nodes)],
            "owner_pid": os.getpid(),
            "owner_cmd": " ".join(sys.argv)[:200],
            "created_at": time.time(),
            "complete": False,
            "made": {"netns": [], "links": [], "qdiscs": [], "fw": []},
        }
        # Claim the name: O_EXCL, so two processes can never both own it (and only then is the state ours).
        try:
            fd = os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise ClusterError(f"cluster name {self._name!r} is taken: {self.state_file} exists") from None
        os.close(fd)
        self._state_file = _state_path(self._name)
        self._state = state
        self._save()

    def _made(self, kind: str, item: dict) -> None:
        assert self._state is not None
        self._state["made"][kind].append(item)
        self._save()

    def _build(self) -> None:
        st = self._state
        assert st is not None
        br = self.bridge
        prefix = self._need_subnet().prefixlen
        _sh(["ip", "link", "add", br, "type", "bridge"])
        self._made("links", {"name": br, "kind": "bridge", "ifindex": _ifindex(br)})
        _sh(["ip", "addr", "add", f"{self.bridge_addr}/{prefix}", "dev", br])
        _sh(["ip", "link", "set", br, "up"])
        tbf = None
        if self._rate_bps:
            burst, limit = st["tbf"]["burst"], st["tbf"]["limit"]
            tbf = ["root", "tbf", "rate", f"{self._rate_bps}bit", "burst", str(burst), "limit", str(limit)]
        for i in range(self.nodes):
            ns, veth = self.ns(i), self.veth(i)
            _sh(["ip", "netns", "add", ns])
            ident = _netns_ident(ns)
            self._made("netns", {"name": ns, "dev": ident[0] if ident else None, "ino": ident[1] if ident else None})
            _sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", _IFACE, "netns", ns])
            self._made("links", {"name": veth, "kind": "veth", "ifindex": _ifindex(veth)})
            _sh(["ip", "link", "set", veth, "master", br, "up"])
            _sh(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/{prefix}", "dev", _IFACE])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", ns, "link", "set", _IFACE, "up"])
            if self._tcp_cc:
                p = _sh(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                         f"net.ipv4.tcp_congestion_control={self._tcp_cc}"], check=False)
                if p.returncode != 0:
                    try:
                        with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control") as f:
                            allowed = f.read().strip()
                    except OSError:
                        allowed = "?"
                    raise ClusterError(f"cannot set TCP congestion control {self._tcp_cc!r} in {ns}: "
                                       f"{(p.stderr or '').strip()} (a namespace may use only "
                                       f"net.ipv4.tcp_allowed_congestion_control: {allowed})")
            if tbf:
                _sh(["tc", "qdisc", "add", "dev", veth, *tbf])
                self._made("qdiscs", {"ns": None, "dev": veth})
                _sh(["tc", "-n", ns, "qdisc", "add", "dev", _IFACE, *tbf])
                self._made("qdiscs", {"ns": ns, "dev": _IFACE})
        self._open_firewall()
        pairs: list[tuple[str | None, str | None, str]] = [(None, self.ns(0), self.addr(0))]
        if self.nodes > 1:
            last = self.nodes - 1
            pairs.insert(0, (self.ns(0), self.ns(last), self.addr(last)))
        err = _probe(pairs)
        if err:
            fw = bridge_netfilter_status()
            hint = ""
            if fw["bridge_nf_call_iptables"]:
                hint = (" Bridged traffic goes through netfilter (net.bridge.bridge-nf-call-iptables=1)"
                        + (", and there is no iptables tool to add an ACCEPT rule with; check your nftables rules"
                           if not fw["iptables"] else f"; iptables FORWARD: {fw['forward']}"))
            raise ClusterError(f"cluster {self._name}: hosts cannot reach each other: {err}.{hint}")
        st["complete"] = True
        self._save()

    def _open_firewall(self) -> None:
        fw = bridge_netfilter_status()
        if not fw["bridge_nf_call_iptables"] or not fw["iptables"]:
            return
        if fw["forward"] == ["-P FORWARD ACCEPT"]:
            return  # nothing filters
        rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        _sh(["iptables", "-w", "-I", *rule[:1], "1", *rule[1:]])
        self._made("fw", {"tool": "iptables", "rule": rule})

    def _rollback(self, exc: BaseException) -> None:
        if self._state is None:
            return
        try:
            self._teardown()
        except Exception as e:  # noqa: BLE001
            print(f"plait.testing.cluster: rollback of {self._name} after {type(exc).__name__} left things behind: "
                  f"{e}", file=sys.stderr)

    def down(self) -> None:
        """Kill the hosts' processes and delete what up() made (as recorded in the state file). Idempotent."""
        with self._lock:
            if self._state is None:
                _unregister(self)
                return
            with _critical():
                self._teardown()
                _unregister(self)

    def _teardown(self) -> None:
        st = self._state
        assert st is not None
        made = st["made"]
        errors: list[str] = []
        # 1. processes: every process in one of our namespaces, and our own children (which may not be in yet)
        idents = {(n["dev"], n["ino"]): n["name"] for n in made["netns"]
                  if n.get("ino") is not None and _netns_ident(n["name"]) == (n["dev"], n["ino"])}  # fmt: skip
        with self._lock:
            mine = [p for _, p in self._procs]
        for p in mine:
            if p.poll() is None:
                _kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while idents:
            alive = {k: v for k, v in _pids_in_netns(idents).items() if v}
            if not alive:
                break
            for pids in alive.values():
                for pid in pids:
                    _kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                errors.append(f"processes {sorted(sum(alive.values(), []))} survived SIGKILL")
                break
            time.sleep(0.01)
        for p in mine:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)
        with self._lock:
            self._procs = [(h, q) for h, q in self._procs if q.returncode is None]
        # 2. firewall rules
        for r in list(made["fw"]):
            p = _sh([r["tool"], "-w", "-D", *r["rule"]], check=False)
            if p.returncode == 0 or "does a matching rule exist" in (p.stderr or "") or "Bad rule" in (p.stderr or ""):
                made["fw"].remove(r)
            else:
                errors.append(f"`{r['tool']} -D {' '.join(r['rule'])}`: {(p.stderr or '').strip()}")
        # 3. links (deleting one end of a veth deletes the pair and the qdiscs of both ends)
        for link in reversed(list(made["links"])):
            idx = _ifindex(link["name"])
            if idx is not None and idx == link.get("ifindex"):
                p = _sh(["ip", "link", "del", link["name"]], check=False)
                if p.returncode != 0 and _ifindex(link["name"]) == link.get("ifindex"):
                    errors.append(f"`ip link del {link['name']}`: {(p.stderr or '').strip()}")
                    continue
            made["links"].remove(link)
        # qdiscs lived on the veth ends: gone with them (the namespace ends go when the peer or namespace goes)
        made["qdiscs"] = [q for q in made["qdiscs"]
                          if q["ns"] is None and any(lk["name"] == q["dev"] for lk in made["links"])]  # fmt: skip
        # 4. namespaces
        for n in list(made["netns"]):
            if _netns_ident(n["name"]) == (n.get("dev"), n.get("ino")) and n.get("ino") is not None:
                p = _sh(["ip", "netns", "del", n["name"]], check=False)
                if p.returncode != 0 and _netns_ident(n["name"]) is not None:
                    errors.append(f"`ip netns del {n['name']}`: {(p.stderr or '').strip()}")
                    continue
            made["netns"].remove(n)
        if errors:
            st["complete"] = False
            with contextlib.suppress(OSError):
                self._save()
            raise ClusterError(f"cluster {self._name}: teardown incomplete (state kept in {self.state_file}): "
                               + "; ".join(errors))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_file)
        self._state = None
        self._state_file = None

    # -- state files / CLI support -------------------------------------------------------------------------------
    @classmethod
    def attach(cls, name: str) -> "Cluster":
        """A Cluster object for an existing cluster from its state file (e.g. one made by the CLI ``up``).

        It is not torn down automatically; call down() to delete it."""
        if not _NAME_RE.match(str(name)):
            raise ClusterError(f"invalid cluster name {name!r}")
        path = _state_path(name)
        try:
            with open(path) as f:
                st = json.load(f)
        except FileNotFoundError:
            raise ClusterError(f"no cluster named {name!r}: no state file {path}") from None
        except (OSError, ValueError) as e:
            raise ClusterError(f"cannot read state file {path}: {e}") from e
        c = cls(hosts=int(st["hosts"]), rate=st.get("rate_bps") or None, name=name, subnet=st.get("subnet"),
                servers=int(st.get("servers") or 0), tcp_cc=st.get("tcp_cc"))
        c._rate = st.get("rate", c._rate)
        c._subnet = ipaddress.ip_network(st["subnet"]) if st.get("subnet") else None
        c._state = st
        c._state_file = path
        return c

    def detach(self) -> None:
        """Leave the cluster up beyond this process: no teardown at exit/signals (the CLI ``up`` does this)."""
        with self._lock:
            if self._state is not None:
                self._state["owner_pid"] = None
                self._save()
            self._owner_pid = None
            _unregister(self)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resolve_name(name: str | None) -> str:
    if name:
        return name
    names = [st["name"] for st in list_clusters()]
    if len(names) == 1:
        return names[0]
    if not names:
        raise ClusterError(f"no clusters (no state files in {state_dir()})")
    raise ClusterError(f"several clusters are up ({', '.join(names)}): pass --name")


def _print_table(c: Cluster) -> None:
    st = c._state or {}
    print(f"name    {c.name}")
    print(f"rate    {c.rate if c.rate_bps else 'unshaped'}" + (f"  (tbf burst {st['tbf']['burst']} B, limit "
                                                              f"{st['tbf']['limit']} B)" if st.get("tbf") else ""))
    print(f"subnet  {c.subnet}  (bridge {c.bridge} {c.bridge_addr})")
    print(f"state   {c.state_file}")
    print()
    rows = [("host", "namespace", "address", "role")] + [
        (str(i), c.ns(i), c.addr(i), "worker" if i < c.hosts else f"server {i - c.hosts}") for i in range(c.nodes)]
    w = [max(len(r[k]) for r in rows) for k in range(4)]
    for r in rows:
        print("  ".join(x.ljust(w[k]) for k, x in enumerate(r)).rstrip())


def _cmd_up(a: argparse.Namespace) -> int:
    c = Cluster(hosts=a.hosts, rate=a.rate, name=a.name, subnet=a.subnet, servers=a.servers, tcp_cc=a.tcp_cc)
    c.up()
    c.detach()
    if a.json:
        print(json.dumps(c._state, indent=1))
    else:
        _print_table(c)
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    sts = list_clusters()
    if not sts:
        print(f"no clusters (state dir {state_dir()})")
        return 0
    print(f"{'name':6} {'hosts':>5} {'servers':>7} {'rate':>8} {'subnet':18} {'state':10} owner")
    for st in sts:
        ok = st.get("complete") and all(os.path.exists(f"/run/netns/{n}") for n in st.get("namespaces", []))
        owner = st.get("owner_pid")
        own = "(persistent)" if owner is None else f"pid {owner}" + ("" if _pid_alive(owner) else " (dead)")
        rate = st.get("rate") if st.get("rate_bps") else "unshaped"
        print(f"{st['name']:6} {st['hosts']:>5} {st.get('servers') or 0:>7} {rate:>8} {st.get('subnet', '?'):18} "
              f"{'up' if ok else 'incomplete':10} {own}")
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    if not a.name and len(list_clusters()) != 1:
        return _cmd_list(a)
    c = Cluster.attach(_resolve_name(a.name))
    _print_table(c)
    missing = [n for n in c._state["namespaces"] if not os.path.exists(f"/run/netns/{n}")]
    if missing or not c._state.get("complete"):
        print(f"\nINCOMPLETE: missing namespaces {missing}; `down --name {c.name}` cleans up what was recorded")
        return 1
    return 0


def _cmd_down(a: argparse.Namespace) -> int:
    if a.all:
        names = [st["name"] for st in list_clusters()]
        if not names:
            print(f"no clusters (no state files in {state_dir()})")
    else:
        if a.name and not os.path.exists(_state_path(a.name)):
            print(f"refusing: no state file {_state_path(a.name)} for cluster {a.name!r}; this tool only deletes "
                  f"what it recorded creating (namespaces plait-{a.name}-h* are left alone)", file=sys.stderr)
            return 2
        names = [_resolve_name(a.name)]
    rc = 0
    for n in names:
        try:
            Cluster.attach(n).down()
            print(f"cluster {n} down")
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
    return rc


def _strip_dashdash(cmd: list[str]) -> list[str]:
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def _cmd_run(a: argparse.Namespace) -> int:
    c = Cluster.attach(_resolve_name(a.name))
    argv = _strip_dashdash(a.cmd)
    if not argv:
        raise ClusterError("run: no command given (use: run --host I -- cmd args...)")
    host = c.server_host(a.server) if a.server is not None else a.host
    p = c.popen(host, argv)
    while True:
        try:
            rc = p.wait()
            break
        except KeyboardInterrupt:  # the child got the SIGINT from the terminal too; wait for it
            continue
    return rc if rc >= 0 else 128 - rc


def _cmd_torchrun(a: argparse.Namespace) -> int:
    c = Cluster.attach(_resolve_name(a.name))
    argv = _strip_dashdash(a.cmd)
    if not argv:
        raise ClusterError("torchrun: no script given (use: torchrun --nproc-per-host R -- script.py args...)")
    hosts = [int(x) for x in a.hosts.split(",")] if a.hosts else None
    got: list[int] = []

    def interrupt(sig: int, frame: Any) -> None:  # SIGTERM/SIGHUP: clean up as for Ctrl-C
        got.append(sig)
        raise KeyboardInterrupt

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupt)
    libc = ctypes.CDLL(None, use_errno=True)

    def die_with_parent() -> None:  # the agents get SIGTERM if this process is killed outright
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    out_lock = threading.Lock()

    def server_line(j: int, line: str) -> None:
        with out_lock:
            sys.stdout.write(f"[s{j}] {line}\n")
            sys.stdout.flush()

    # Own sessions: a Ctrl-C reaches only this process, which then stops agents and workers in order (and then the
    # summation servers, if any).
    procs = c.torchrun(a.nproc_per_host, argv, port=a.port, hosts=hosts, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                       preexec_fn=die_with_parent, servers=a.servers,
                       server_args=a.server_arg or (), server_on_line=server_line)
    group = c.last_servers
    hs = hosts if hosts is not None else list(range(c.hosts))

    def pump(h: int, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for raw in iter(p.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with out_lock:
                sys.stdout.write(f"[h{h}] {line}\n")
                sys.stdout.flush()

    pumps = [threading.Thread(target=pump, args=(h, p), daemon=True) for h, p in zip(hs, procs)]
    for t in pumps:
        t.start()
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("plait.testing.cluster: interrupted; killing the torchrun agents and their workers", file=sys.stderr)
        agents = [p.pid for p in procs if p.poll() is None]
        tree = set(agents) | _descendants(agents)
        for pid in agents:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(0.1)
        tree |= _descendants(tree)
        for pid in tree:
            _kill(pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        if group is not None:
            group.stop()
        for t in pumps:
            t.join(2)
        return 128 + (got[0] if got else signal.SIGINT)
    for t in pumps:
        t.join(5)
    rcs = [p.returncode for p in procs]
    bad = [(f"h{h}", rc) for h, rc in zip(hs, rcs) if rc != 0]
    if group is not None:
        bad += [(f"s{j} (server, h{r.host})", r.returncode) for j, r in enumerate(group.wait(group.stop_timeout + 10))
                if r.returncode != 0]
    if bad:
        print("torchrun failed on " + ", ".join(f"{h} (exit {rc})" for h, rc in bad), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plait.testing.cluster",
                                 description="Emulated multi-host cluster from network namespaces (needs root).")
    sub = ap.add_subparsers(dest="cmd_name", required=True)
    p = sub.add_parser("up", help="create a cluster and leave it up")
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--rate", default="1gbit", help="tc rate per link direction (e.g. 100mbit, 10gbit; 0 = unshaped)")
    p.add_argument("--name", help="1-5 characters [a-z0-9] (default random)")
    p.add_argument("--subnet", help="IPv4 /24 to use (default: a free one in 10.200-254.x.0)")
    p.add_argument("--tcp-cc", default=None,
                   help="TCP congestion control in every host's namespace (default: inherited; a namespace may use "
                        "only what net.ipv4.tcp_allowed_congestion_control lists)")
    p.add_argument("--servers", type=int, default=0,
                   help="extra server hosts for plait-server (host indices after the worker hosts)")
    p.add_argument("--json", action="store_true", help="print the state as JSON instead of a table")
    p.set_defaults(fn=_cmd_up)
    p = sub.add_parser("list", help="list clusters that have state files")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("status", help="show one cluster (or list them)")
    p.add_argument("--name")
    p.set_defaults(fn=_cmd_status)
    p = sub.add_parser("run", help="run a command on one host; exits with its status")
    p.add_argument("--name")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--host", type=int, help="host index (server hosts come after the worker hosts)")
    g.add_argument("--server", type=int, help="server host index (0..servers-1)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("torchrun", help="start torchrun on every host, prefix output with [hI], wait")
    p.add_argument("--name")
    p.add_argument("--nproc-per-host", type=int, required=True)
    p.add_argument("--port", type=int, default=29400)
    p.add_argument("--hosts", help="comma-separated host indices (default all worker hosts)")
    p.add_argument("--servers", type=int, default=None,
                   help="plait-servers to start on the first K server hosts (default: every server host; 0: none); "
                        "the workers get PLAIT_SERVERS=K")
    p.add_argument("--server-arg", action="append", default=None,
                   help="an extra plait-server argument, repeatable (e.g. --server-arg=--threads=2)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_cmd_torchrun)
    p = sub.add_parser("down", help="delete a cluster (only what its state file records)")
    p.add_argument("--name")
    p.add_argument("--all", action="store_true", help="every cluster that has a state file")
    p.set_defaults(fn=_cmd_down)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
