"""Registration of the "plait" backend with torch.distributed (the Python side of the torch layer)."""

from __future__ import annotations

import datetime
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _C

_ALGOS = ("auto", "ring", "tree", "direct", "hier", "hier_ring", "hier_tree")
_TRANSPORTS = ("auto", "shm", "tcp")
_COMPRESSIONS = ("none", "auto", "int8", "int4", "fp8", "bf16")


@dataclass
class Options:
    """Per-group settings, passed as ``pg_options=`` to ``init_process_group`` / ``new_group``.

    Empty / zero fields fall back to the environment knobs (PLAIT_ALGO, PLAIT_TRANSPORT, PLAIT_CHUNK_BYTES,
    PLAIT_SHM_RING_BYTES, PLAIT_COMPRESSION, PLAIT_COMPRESSION_BLOCK).

    ``compression``: what ``dist.all_reduce`` on this group sends for float32 / bfloat16 / float16 SUM and AVG
    (``"none"``, ``"auto"``: the cost model decides per call, or a codec: ``"int8"``, ``"int4"``, ``"fp8"``,
    ``"bf16"``); other all-reduces of the group run in full precision. ``compression_block``: values per codec
    block (0: the codec's default: 256, 32 for int4).
    """

    algo: str = ""
    transport: str = ""
    chunk_bytes: int = 0
    shm_ring_bytes: int = 0
    compression: str = ""
    compression_block: int = 0
    # Summation servers the group waits for at creation and uses (None: PLAIT_SERVERS; README "Summation servers").
    servers: int | None = None
    # The group's timeout; None: the one passed to init_process_group / new_group (torch's default).
    timeout: datetime.timedelta | None = None

    @property
    def _timeout(self):
        # What torch reads from backend options (DeviceMesh's backend_override passes it on to new_group).
        return self.timeout

    @_timeout.setter
    def _timeout(self, value):
        self.timeout = value

    def __post_init__(self):
        if self.algo and self.algo not in _ALGOS:
            raise ValueError(f"plait.Options: algo must be one of {_ALGOS}, got {self.algo!r}")
        if self.transport and self.transport not in _TRANSPORTS:
            raise ValueError(f"plait.Options: transport must be one of {_TRANSPORTS}, got {self.transport!r}")
        if self.compression and self.compression not in _COMPRESSIONS:
            raise ValueError(f"plait.Options: compression must be one of {_COMPRESSIONS}, got {self.compression!r}")
        if self.compression_block and (self.compression_block % 8 or not 8 <= self.compression_block <= 65536):
            raise ValueError("plait.Options: compression_block must be 0 (the codec's default) or a multiple of 8 "
                             f"in [8, 65536], got {self.compression_block!r}")
        if self.servers is not None and (not isinstance(self.servers, int) or isinstance(self.servers, bool)
                                         or not 0 <= self.servers <= 1024):
            raise ValueError(f"plait.Options: servers must be None or a number from 0 to 1024, got {self.servers!r}")
        if self.chunk_bytes < 0 or self.shm_ring_bytes < 0:
            raise ValueError("plait.Options: chunk_bytes and shm_ring_bytes must be >= 0")
        if self.timeout is not None and not isinstance(self.timeout, datetime.timedelta):
            raise TypeError(f"plait.Options: timeout must be a datetime.timedelta, got {type(self.timeout).__name__}")


def _address_hint(store) -> str:
    """The rendezvous host, used to pick which local address to advertise for TCP connections."""
    s = store
    for _ in range(8):
        if isinstance(s, dist.TCPStore):
            return s.host
        inner = getattr(s, "underlying_store", None)
        if inner is None:
            break
        s = inner
    return os.environ.get("MASTER_ADDR", "")


def _root_store(store):
    """The rendezvous store under torch's prefixes (where summation servers register), and "host:port" for a
    TCPStore (what ``plait-server`` is given)."""
    s = store
    for _ in range(16):
        inner = getattr(s, "underlying_store", None)
        if inner is None:
            break
        s = inner
    desc = f"{s.host}:{s.port}" if isinstance(s, dist.TCPStore) else ""
    return s, desc


def _create(dist_opts, pg_options):
    opts = pg_options if isinstance(pg_options, Options) else Options()
    if pg_options is not None and not isinstance(pg_options, Options):
        raise TypeError(f"plait: pg_options must be plait.Options, got {type(pg_options).__name__}")
    timeout = opts.timeout if opts.timeout is not None else dist_opts.timeout
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    servers = -1 if opts.servers is None else int(opts.servers)
    root, desc = _root_store(dist_opts.store) if (servers > 0 or (servers < 0 and _env_servers() > 0)) else (None, "")
    return _C.create_backend(
        dist_opts.store,
        dist_opts.group_rank,
        dist_opts.group_size,
        timeout,
        algo=opts.algo,
        transport=opts.transport,
        chunk_bytes=opts.chunk_bytes,
        shm_ring_bytes=opts.shm_ring_bytes,
        address_hint=_address_hint(dist_opts.store),
        group_name=str(dist_opts.group_id),
        compression=opts.compression,
        compression_block=int(opts.compression_block),
        servers=servers,
        root_store=root,
        store_desc=desc,
        # torch passes [] for the default group, whose ranks are the global ranks
        global_ranks=[int(r) for r in (getattr(dist_opts, "global_ranks_in_group", None) or
                                       range(dist_opts.group_size))],
    )


def _env_servers() -> int:
    try:
        return int(os.environ.get("PLAIT_SERVERS", "0") or 0)
    except ValueError:
        return 0  # the core raises with the knob's name


def _register():
    if "PLAIT" in dist.Backend._plugins:  # already registered (module reloaded)
        _name_in_ddp_logging_data()
        return
    dist.Backend.register_backend("plait", _create, extended_api=True, devices=["cpu", "cuda"])
    _name_in_ddp_logging_data()


def _name_in_ddp_logging_data():
    """DDP's logging data (``DistributedDataParallel._get_ddp_logging_data()``) names the backend from torch's own
    backend enum (C++ ``ProcessGroup::getBackendName``), which says ``"custom"`` for every plugin backend. Where the
    group's backend is plait, plait reports ``"plait"`` instead. Only that key of the returned dict changes; torch's
    own C++ usage log still says "custom" (only torch can change that). PLAIT_DDP_LOGGING_NAME=0 leaves DDP alone."""
    if os.environ.get("PLAIT_DDP_LOGGING_NAME", "1") == "0":
        return
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
    except ImportError:  # pragma: no cover (torch without DDP)
        return
    orig = getattr(DDP, "_get_ddp_logging_data", None)
    if orig is None or getattr(orig, "_plait", False):
        return

    @functools.wraps(orig)
    def _get_ddp_logging_data(self):
        data = orig(self)
        if data.get("backend_name") == "custom":
            try:
                # "plait", or a per-device string such as "cpu:gloo,cuda:plait"
                name = str(dist.get_backend(self.process_group))
                if name == "plait" or "plait" in {p.split(":")[-1] for p in name.split(",")}:
                    data["backend_name"] = "plait" if name == "plait" else name
            except Exception:  # noqa: BLE001 (a group torch cannot name: leave torch's answer)
                pass
        return data

    _get_ddp_logging_data._plait = True
    DDP._get_ddp_logging_data = _get_ddp_logging_data


def _backend_of(group):
    group = group if group is not None else dist.group.WORLD
    if group is None:
        raise RuntimeError("plait: no process group (call init_process_group first)")
    b = group._get_backend(torch.device("cpu"))
    # TORCH_DISTRIBUTED_DEBUG=DETAIL wraps every backend in torch's ProcessGroupWrapper: look inside.
    for _ in range(8):
        inner = getattr(b, "wrapped_pg", None)
        if inner is None or isinstance(b, _C.PlaitBackend):
            break
        b = inner
    if not isinstance(b, _C.PlaitBackend):
        raise RuntimeError(f"plait: the group's CPU backend is {type(b).__name__}, not plait")
    return b


def monitored_barrier(group=None, timeout: datetime.timedelta | None = None, wait_all_ranks: bool = False):
    """Like ``dist.monitored_barrier`` (which torch allows only for gloo): rank 0 waits up to ``timeout`` for
    every rank and raises naming the rank(s) that did not arrive. ``timeout`` defaults to the group's timeout."""
    b = _backend_of(group)
    b.monitored_barrier(timeout, wait_all_ranks)


def topology(group=None) -> dict:
    """Where the group's ranks live, as the cost model sees it: {'nranks', 'nhosts', 'all_shm', ...}.

    'device_engine' says how device tensors run: 'cuda' / 'emulated' (device engine, one host, with the host path
    beside it unless PLAIT_HOST_PATH=off), 'cuda host path' / 'emulated host path' (one host, PLAIT_HOST_PATH=force),
    'cuda via host' / 'emulated via host' (staged through host memory, groups across hosts), '' before the first
    such call. 'host_path' holds the host path's measured rates ('measured' False until the first device all-reduce
    of 1 MiB or more in auto mode).
    """
    return _backend_of(group).topology


_NO_HOST = (0.0, 0.0, 0.0, 0.0, "not a device plan (device=False)")
_NO_SERVERS = (0.0, 0.0, 0.0, 0.0, 0.0, "no servers")


class AllreducePlan(tuple):
    """``(algo, one_shot, predicted_us, why)``, plus what the all-reduce sends on the wire: ``compression`` (codec
    name or ``"none"``), ``compression_block``, ``compression_hierarchical``, ``compression_why``; and, for device
    tensors (``device=True``), the host path's part: ``host_share`` (the share of the buffer summed through host
    memory by the CPU, beside the device engine), ``host_path_us`` (predicted time with that split),
    ``device_only_us``, ``host_only_us`` and ``host_path_why``. With summation servers (``Options.servers`` /
    PLAIT_SERVERS): ``server_share`` (the share of the buffer the servers sum; 0: the workers' own schedule),
    ``servers_us`` (predicted time with that share), ``servers_ring_us`` (the workers' ring alone),
    ``servers_worker_bytes`` / ``servers_server_bytes`` (bytes per direction through a worker host's / a server's
    link) and ``servers_why``."""

    def __new__(cls, plan, comp, host=_NO_HOST, servers=_NO_SERVERS):
        self = super().__new__(cls, plan)
        (self.server_share, self.servers_us, self.servers_ring_us, self.servers_worker_bytes,
         self.servers_server_bytes, self.servers_why) = servers
        (self.compression, self.compression_block, self.compression_hierarchical, self.uncompressed_us,
         self.compressed_us, self.compression_why) = comp
        self.host_share, self.host_path_us, self.device_only_us, self.host_only_us, self.host_path_why = host
        return self

    def __reduce__(self):  # picklable (a tuple subclass with its own __new__)
        return (AllreducePlan, (tuple(self), (self.compression, self.compression_block, self.compression_hierarchical,
                                              self.uncompressed_us, self.compressed_us, self.compression_why),
                                (self.host_share, self.host_path_us, self.device_only_us, self.host_only_us,
                                 self.host_path_why),
                                (self.server_share, self.servers_us, self.servers_ring_us, self.servers_worker_bytes,
                                 self.servers_server_bytes, self.servers_why)))

    algo = property(lambda self: self[0])
    one_shot = property(lambda self: self[1])
    predicted_us = property(lambda self: self[2])
    why = property(lambda self: self[3])


def plan_allreduce(nbytes: int, group=None, device: bool = False, dtype: torch.dtype = torch.float32,
                   compression: str | None = None):
    """The cost model's choice for an all-reduce of nbytes: (algo, one_shot, predicted_us, why), with the
    compression decision as attributes (``.compression``, ``.compression_why``, see AllreducePlan).

    device=True: for device (CUDA) tensors on a group whose ranks share one host (the device engine's model), with
    the host path's split as attributes (``.host_share``, ``.host_path_us``, ``.host_path_why``). The split uses the
    rates the group measured at its first device all-reduce of 1 MiB or more (``topology(group)["host_path"]``);
    before that, ``host_share`` is 0 and ``host_path_why`` says so. Every rank gets the same answer.
    compression: None for the group's setting, else "none", "auto" or a codec name.
    """
    b = _backend_of(group)
    plan = b.plan_allreduce(int(nbytes), bool(device))
    srv = tuple(b.plan_server_split(int(nbytes)))
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "other")
    count = int(nbytes) // max(1, torch.empty((), dtype=dtype).element_size())
    if device:
        comp = ("none", 0, False, 0.0, 0.0, "device tensors are not compressed yet")
        return AllreducePlan(plan, comp, tuple(b.plan_host_split(int(nbytes))), srv)
    comp = b.plan_compression(count, name, "" if compression is None else _check_compression(compression))
    return AllreducePlan(plan, comp, servers=srv)


class HostPathPlan(tuple):
    """``(share, predicted_us, device_only_us, host_only_us, why)``: see ``plan_host_path``."""

    share = property(lambda self: self[0])
    predicted_us = property(lambda self: self[1])
    device_only_us = property(lambda self: self[2])
    host_only_us = property(lambda self: self[3])
    why = property(lambda self: self[4])


def plan_host_path(nbytes: int, pcie_gbps: float, sum_gbps: float, device_gbps: float, host_call_us: float = 0.0,
                   device_call_us: float = 0.0, path_gbps: float = 0.0) -> HostPathPlan:
    """The host path planner on given figures (GB/s of the buffer, i.e. algorithm bandwidth; fixed costs in us):
    what share of an all-reduce of ``nbytes`` to send through host memory beside the device path, and the predicted
    times. ``pcie_gbps``: each GPU's link to the host per direction with downloads and uploads at once;
    ``sum_gbps``: the CPU's all-reduce of the local ranks' host buffers; ``device_gbps``: the device path's
    all-reduce; ``path_gbps`` (optional): the host path end to end. The formulas are in the README ("Host path").
    No process group is needed: this is how to ask what a host you do not have would do."""
    for name, v in (("pcie_gbps", pcie_gbps), ("sum_gbps", sum_gbps), ("device_gbps", device_gbps)):
        if not v > 0:
            raise ValueError(f"plait.plan_host_path: {name} must be > 0, got {v!r}")
    for name, v in (("host_call_us", host_call_us), ("device_call_us", device_call_us), ("path_gbps", path_gbps)):
        if not v >= 0:
            raise ValueError(f"plait.plan_host_path: {name} must be >= 0, got {v!r}")
    if int(nbytes) < 0:
        raise ValueError(f"plait.plan_host_path: nbytes must be >= 0, got {nbytes!r}")
    return HostPathPlan(_C._plan_host_split(int(nbytes), float(pcie_gbps), float(sum_gbps), float(device_gbps),
                                            float(host_call_us), float(device_call_us), float(path_gbps)))


class ServerCount(tuple):
    """One row of ``plan_servers``: ``(k, share, predicted_us, speedup, worker_bytes, server_bytes)``."""

    k = property(lambda self: self[0])
    share = property(lambda self: self[1])
    predicted_us = property(lambda self: self[2])
    speedup = property(lambda self: self[3])
    worker_bytes = property(lambda self: self[4])
    server_bytes = property(lambda self: self[5])


@dataclass(frozen=True)
class ServersPlan:
    """What ``plan_servers`` answers. ``rows[k]`` is the plan with k servers (k = 0: the ring alone);
    ``ring_us`` the ring's time; ``k_saturate`` = n·B_w/B_s, the number of servers from which more add nothing
    (the workers' own links are then the bottleneck); ``k_useful`` the smallest k that reaches the best time;
    ``best`` the fastest row."""

    n_workers: int
    worker_gbps: float
    server_gbps: float
    nbytes: int
    ring_us: float
    k_saturate: float
    k_useful: int
    rows: tuple

    @property
    def best(self) -> ServerCount:
        return min(self.rows, key=lambda r: (round(r.predicted_us, 6), r.k))


def plan_servers(n_workers: int, worker_gbps: float, server_gbps: float, nbytes: int, max_servers: int | None = None,
                 alpha_us: float = 0.0, segment_bytes: int = 0) -> ServersPlan:
    """The summation servers' planner (BytePS's mixed partition; formulas in the README, "Summation servers"):
    for ``n_workers`` worker hosts with links of ``worker_gbps`` and servers with links of ``server_gbps`` (Gbit/s,
    each direction), an all-reduce of ``nbytes``: for each number of servers k from 0 to ``max_servers`` (default:
    one past the saturation point, at most 1024), the share the servers sum, the predicted time, the speed-up over the ring and
    the bytes through each worker's and each server's link. ``alpha_us`` (link latency) and ``segment_bytes`` (the
    pipeline's segment) add the fixed costs; at 0 the answer is the bandwidth formulas alone (1 + k(n-2)/n^2 at
    equal rates). No process group is needed."""
    n = int(n_workers)
    if n < 1:
        raise ValueError(f"plait.plan_servers: n_workers must be >= 1, got {n_workers!r}")
    for name, v in (("worker_gbps", worker_gbps), ("server_gbps", server_gbps)):
        if not v > 0:
            raise ValueError(f"plait.plan_servers: {name} must be > 0, got {v!r}")
    if int(nbytes) <= 0:
        raise ValueError(f"plait.plan_servers: nbytes must be > 0, got {nbytes!r}")
    if alpha_us < 0 or segment_bytes < 0:
        raise ValueError("plait.plan_servers: alpha_us and segment_bytes must be >= 0")
    ksat = _C._servers_saturate(n, float(worker_gbps), float(server_gbps))
    if max_servers is None:
        max_servers = min(1024, max(1, math.ceil(ksat - 1e-9) + 1))
    if not 0 <= int(max_servers) <= 1024:
        raise ValueError(f"plait.plan_servers: max_servers must be from 0 to 1024, got {max_servers!r}")
    rows = []
    ring_us = None
    for k in range(int(max_servers) + 1):
        share, us, ring, wb, sb, _why = _C._server_time(n, k, float(worker_gbps), float(server_gbps),
                                                        float(alpha_us), float(nbytes), float(segment_bytes))
        ring_us = ring
        rows.append(ServerCount((k, share, us, ring / us if us > 0 else 1.0, wb, sb)))
    best = min(r.predicted_us for r in rows)
    useful = min(r.k for r in rows if r.predicted_us <= best * (1 + 1e-9))
    return ServersPlan(n, float(worker_gbps), float(server_gbps), int(nbytes), ring_us, ksat, useful, tuple(rows))


def _check_compression(c):
    if c not in _COMPRESSIONS:
        raise ValueError(f"plait: compression must be None or one of {_COMPRESSIONS}, got {c!r}")
    return c


_FAST = {}  # id(group) -> (group, backend): plait.all_reduce's lookup, kept out of the per-call path
_OPS = {}  # ReduceOp.RedOpType -> ReduceOp (torch converts on every call otherwise)


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None, compression: str | None = None,
               async_op: bool = False):
    """``dist.all_reduce`` on a plait group, called on the backend directly (no torch Python wrapper: plait's fast
    path for small messages), with an optional per-call ``compression`` (None: the group's setting; "none", "auto",
    "int8", "int4", "fp8", "bf16" override it for this call). A codec with an op other than SUM / AVG, or a dtype
    other than float32 / bfloat16 / float16, raises before anything is sent. Returns a Work when async_op."""
    g = group if group is not None else dist.group.WORLD
    hit = _FAST.get(id(g))
    pgs = dist.distributed_c10d._world.pg_map
    if hit is None or hit[0] is not g or g not in pgs or len(_FAST) > 1:
        # Forget groups torch no longer knows (destroyed): the cache must not keep them, or their backends (sockets,
        # shared memory), alive, even while only other groups are called (a few dict lookups per call).
        for k, (grp, _) in list(_FAST.items()):  # a copy: another thread may prune or insert meanwhile
            if grp not in pgs:
                _FAST.pop(k, None)
        if hit is None or hit[0] is not g or g not in pgs:
            hit = (g, _backend_of(group))
            _FAST[id(g)] = hit
    c = "" if compression is None else _check_compression(compression)
    if not isinstance(op, dist.ReduceOp):
        o = _OPS.get(op)
        if o is None:
            o = _OPS[op] = dist.ReduceOp(op)
        op = o
    return hit[1].all_reduce(tensor, op, c, async_op)


_register()
