#!/usr/bin/env python
"""Soak test: many random collectives on plait, every result checked, resources sampled for leaks.

    .venv/bin/python scripts/soak.py                          # 100,000 collectives, 4 ranks
    .venv/bin/python scripts/soak.py --collectives 4000 --sample-every 200 --group-every 100 --json out.json

The script starts ``--world`` rank processes (fresh interpreters running this file with ``--_worker``) that join one
plait group over a TCP store on 127.0.0.1. Every rank draws the same schedule from ``--seed``: which collective, on
which group, with which dtype, size, reduction, root, split sizes, async or not. Ranks outside the chosen group skip
that step. Each rank can recompute every other rank's input (integer-valued formulas of (rank, index, salt), small
enough that SUM / PRODUCT / AVG are exact in every dtype, bf16 and int8 included), so every result is compared exactly
against a reference computed locally; the compressed all-reduce (plait.all_reduce(..., compression=codec)) is
compared bit for bit against a replay of plait's direct compressed schedule with plait's own codec kernels (README,
"Compressed all-reduce": every element is quantized at most twice, results are bitwise identical on every rank), and
against the exact sum within the codec's error bound. Float AVG over a group whose size is not a power of two is
compared within one unit of rounding of the dtype.

Groups: the world (group options from the environment), persistent groups with different ``plait.Options`` (algo
ring / tree / direct, transport shm / tcp, small pipelining chunks, small shared-memory rings) and subgroups, plus
one ephemeral group (random members and options) destroyed and re-created every ``--group-every`` collectives.

Resources: every ``--sample-every`` collectives (a multiple of ``--group-every``: samples are taken after a world
barrier, with no ephemeral group alive, after ``gc.collect()`` and ``malloc_trim(0)``), and at the end, each rank
records RSS (/proc/self/statm) split into private memory (RssAnon) and shared-memory pages (RssShmem: the rings of the
live groups, which fill in as traffic wraps around them), open file descriptors (/proc/self/fd), threads
(/proc/self/task), this process's mappings of /dev/shm (/proc/self/maps) and the number of ``/dev/shm/plait-*`` names
(system-wide; names present before the run are not counted). After the warm-up (the first ``--warmup`` fraction of
the collectives) a least-squares slope per 10,000 collectives is fitted per rank and metric.

Exit status 1 when any result is wrong, any rank fails, or a resource grows:
  * private RSS: slope above ``--rss-slope-mib`` MiB per 10k collectives (default 1);
  * fds, threads, shm maps, shm names: slope > 0 and the final value above the maximum seen during the warm-up.

Two plait issues the soak found are fixed (tests/test_soak.py holds each): a rank that finished a reduce early and
destroyed the group made the root fail with "peer rank N (same host) died" (ephemeral groups are destroyed without a
barrier first, which exercises it; ``--barrier-before-destroy`` adds one), and plait.all_reduce's lookup cache kept a
destroyed group's sockets and shared memory until its next miss (``stale_cache`` counts destroyed groups still
cached at a sample, which are then dropped; ``--no-prune-cache`` leaves them).

Output: a table per metric and rank, and with ``--json FILE`` the same figures (collectives, wall time,
collectives/s, per rank and metric: start / end / max / warm-up max / slope) plus per-op counts and failures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

METRICS = ("rss_mib", "anon_mib", "shmem_mib", "fds", "threads", "shm_maps", "shm_names", "stale_cache")
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")
DTYPE_WEIGHTS = (30, 8, 8, 8, 6, 6, 10, 10, 4)
CODECS = ("int8", "int4", "fp8", "bf16")
CODEC_BLOCK = {"int8": 256, "int4": 32, "fp8": 256, "bf16": 256}
CODEC_BOUND = {"int8": 1e-2, "int4": 0.3, "fp8": 2e-2, "bf16": 1e-4}  # relative squared error (tests)
# (name, weight)
OPS = (
    ("all_reduce", 24), ("plait_all_reduce", 5), ("plait_all_reduce_compressed", 6), ("broadcast", 8),
    ("reduce", 6), ("all_gather", 4), ("all_gather_into_tensor", 5), ("reduce_scatter", 4),
    ("reduce_scatter_tensor", 4), ("all_to_all", 4), ("all_to_all_single", 4), ("gather", 4), ("scatter", 4),
    ("barrier", 3), ("send_recv", 5), ("batch_isend_irecv", 3), ("all_reduce_coalesced", 2),
)
# Persistent groups: (label, members (None: all), plait.Options kwargs). The world is "world".
PERSISTENT = (
    ("ring", None, dict(algo="ring")),
    ("tree_tcp", None, dict(algo="tree", transport="tcp")),
    ("direct", None, dict(algo="direct")),
    ("ring_tcp_chunk4k", None, dict(algo="ring", transport="tcp", chunk_bytes=4096)),
    ("ring_shm64k", None, dict(algo="ring", transport="shm", shm_ring_bytes=65536, chunk_bytes=16384)),
    ("sub012", [0, 1, 2], dict()),
    ("sub13_tcp", [1, 3], dict(transport="tcp")),
    ("sub23_tree", [2, 3], dict(algo="tree")),
)


# ------------------------------------------------------------------------------------------------------------------
# resource sampling

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stale_fast_cache(prune: bool) -> int:
    """Groups torch has destroyed that plait.all_reduce's lookup cache (plait._backend._FAST) still holds, with their
    backend's sockets and shared memory: the cache drops them only at its next miss. Pruned when ``prune``."""
    try:
        import torch.distributed as dist
        from plait import _backend
    except ImportError:
        return 0
    pgs = dist.distributed_c10d._world.pg_map
    stale = [k for k, (grp, _) in list(_backend._FAST.items()) if grp not in pgs]
    if prune:
        for k in stale:
            _backend._FAST.pop(k, None)
    return len(stale)


def sample(initial_shm: set, prune_cache: bool = True) -> dict:
    stale = stale_fast_cache(prune_cache)
    gc.collect()
    _malloc_trim()  # freed heap memory glibc keeps is not a leak: RSS counts what is live (and mapped)
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                k, v = line.split(":", 1)
                status[k] = int(v.split()[0]) / 1024.0  # kB -> MiB
    shm_maps = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/shm/" in line:
                shm_maps += 1
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith("plait") and n not in initial_shm]
    except OSError:
        names = []
    if os.environ.get("PLAIT_SOAK_DEBUG"):
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        print(f"[soak-debug] fds {sorted(fds)}", file=sys.stderr, flush=True)
    return {
        "rss_mib": rss / 2**20,
        # RSS = private memory (the heap: what a leak grows) + shared memory pages touched so far (the rings of the
        # live groups: they fill in as traffic wraps around each ring, then stay) + file pages
        "anon_mib": status.get("RssAnon", 0.0),
        "shmem_mib": status.get("RssShmem", 0.0),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "shm_maps": shm_maps,
        "shm_names": len(names),
        "stale_cache": stale,
    }


def slope_per_10k(xs, ys) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx * 10000.0


# ------------------------------------------------------------------------------------------------------------------
# worker side


class Soak:
    def __init__(self, rank, world, spec):
        import torch
        import torch.distributed as dist
        import plait

        self.torch, self.dist, self.plait = torch, dist, plait
        self.rank, self.world, self.spec = rank, world, spec
        self.rng = random.Random(spec["seed"])
        self.failures = []
        self.checks = 0
        self.op_counts = {}
        self.dtypes = {n: getattr(torch, n) for n in DTYPE_NAMES}
        self.groups = {}  # label -> (group or None when not a member, sorted global members)
        self.eph = None  # (label, group, members)
        self.eph_serial = 0
        self.groups_created = 0
        self.groups_destroyed = 0

    # --- data ------------------------------------------------------------------------------------------------
    def arange(self, n):
        return self.torch.arange(n, dtype=self.torch.int64)

    def gen(self, kind, dt, count, r, salt):
        """Integer-valued input of rank r (kind: "sum", "prod", "minmax", "data", "bits")."""
        torch = self.torch
        i = self.arange(count)
        s = (salt * 2654435761 + r * 40503) & 0x7FFFFFFF
        signed = dt.is_floating_point or dt.is_signed
        if dt == torch.bool:
            v = ((i * 7 + s) % 3) == 0
            return v
        if kind == "sum":
            v = (i * 7 + s) % 16
            v = v - 8 if signed else v
        elif kind == "prod":
            m = (i * 5 + s) % 10
            v = torch.ones(count, dtype=torch.int64)
            v[m == 0] = 2
            if signed:
                v[m == 1] = -1
        elif kind == "minmax":
            v = (i * 37 + s) % 200
            v = v - 100 if signed else v
        elif kind == "bits":
            v = (i * 37 + s) % 128 if dt == torch.int8 else (i * 37 + s) % 256
        else:  # data: distinct values per position within the dtype's exact integer range
            if dt in (torch.int8, torch.uint8, torch.bfloat16):
                m = 251
            elif dt == torch.float16:
                m = 2039
            else:
                m = 1000003
            v = (i * 13 + s) % m
            if signed:
                v = v - m // 2 if dt != torch.int8 else v - 125
        return v.to(dt)

    def reference(self, opname, inputs, dt):
        torch = self.torch
        n = len(inputs)
        if dt.is_floating_point:
            x = torch.stack([t.to(torch.float64) for t in inputs])
        else:
            x = torch.stack([t.to(torch.int64) for t in inputs])
        if opname == "SUM":
            r = x.sum(0)
        elif opname == "PRODUCT":
            r = x.prod(0)
        elif opname == "MIN":
            r = x.min(0).values if x.numel() else x.sum(0)
        elif opname == "MAX":
            r = x.max(0).values if x.numel() else x.sum(0)
        elif opname == "AVG":
            s = x.sum(0)
            r = s / n if dt.is_floating_point else torch.div(s, n, rounding_mode="trunc")
        elif opname == "PREMUL_SUM":
            r = (x * 2.0).sum(0)
        elif opname in ("BAND", "BOR", "BXOR"):
            r = x[0].clone()
            for k in range(1, n):
                r = r & x[k] if opname == "BAND" else (r | x[k] if opname == "BOR" else r ^ x[k])
        else:
            raise ValueError(opname)
        if dt == torch.bool:
            return r != 0
        return r.to(dt)

    def make_op(self, opname):
        if opname == "PREMUL_SUM":
            return self.dist._make_nccl_premul_sum(2.0)
        return getattr(self.dist.ReduceOp, opname)

    # --- checks ----------------------------------------------------------------------------------------------
    def fail(self, msg):
        msg = f"[rank {self.rank}] collective {self.step}: {msg}"
        print(f"[soak-wrong] {msg}", file=sys.stderr, flush=True)  # in the rank's log at once
        if len(self.failures) < 100:
            self.failures.append(msg)
        else:
            self.failures_dropped = getattr(self, "failures_dropped", 0) + 1

    def equal(self, what, actual, expected, approx=False):
        torch = self.torch
        self.checks += 1
        if self.corrupt_now and actual.numel():
            actual = actual.clone()
            actual.view(-1)[0] = expected.view(-1)[0] if actual.dtype == torch.bool else expected.view(-1)[0] + 1
            if actual.dtype == torch.bool:
                actual.view(-1)[0] = not bool(expected.view(-1)[0])
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            self.fail(f"{self.desc} {what}: got {actual.dtype}/{tuple(actual.shape)}, expected "
                      f"{expected.dtype}/{tuple(expected.shape)}")
            return
        if approx:
            a = actual.double()
            e = expected.double()
            eps = torch.finfo(expected.dtype).eps
            ok = ((a - e).abs() <= e.abs() * eps + 1e-30).all().item()
            if ok:
                return
        elif torch.equal(actual, expected):
            return
        a, e = actual.reshape(-1), expected.reshape(-1)
        bad = (a != e).nonzero().reshape(-1)
        i = int(bad[0]) if bad.numel() else 0
        self.fail(f"{self.desc} {what}: {bad.numel()} of {a.numel()} elements differ; first at [{i}]: got "
                  f"{a[i].item() if a.numel() else None}, expected {e[i].item() if e.numel() else None}")

    def approx_for(self, opname, dt, n):
        return opname == "AVG" and dt.is_floating_point and (n & (n - 1)) != 0

    # --- groups ----------------------------------------------------------------------------------------------
    def new_group(self, label, members, opts):
        dist, plait = self.dist, self.plait
        members = sorted(members) if members is not None else list(range(self.world))
        g = dist.new_group(members, backend="plait", pg_options=plait.Options(**opts))
        self.groups_created += 1
        return (g if self.rank in members else None), members

    def setup_groups(self):
        self.groups["world"] = (self.dist.group.WORLD, list(range(self.world)))
        for label, members, opts in PERSISTENT:
            if members is not None and max(members) >= self.world:
                members = [m for m in members if m < self.world] or [0]
            self.groups[label] = self.new_group(label, members, opts)

    def destroy_ephemeral(self):
        if self.eph is None:
            return
        label, g, members = self.eph
        if g is not None:
            if self.spec.get("barrier_before_destroy", False):
                # Without it, a rank that finished its part of the group's last collective early (a leaf of a
                # reduce) destroys the group while a peer may still wait on a receive that depends on a third
                # rank's data (once failed with "peer rank N (same host) died"; fixed in Comm::checkPeersAlive).
                self.dist.barrier(group=g)
            self.dist.destroy_process_group(g)
            self.groups_destroyed += 1
        self.eph = None

    def create_ephemeral(self):
        rng = self.rng
        size = rng.choice([1, 2, 2, 3, 3, 4, 4, 4]) if self.world >= 4 else rng.randint(1, self.world)
        size = min(size, self.world)
        members = sorted(rng.sample(range(self.world), size))
        opts = {}
        algo = rng.choice(["", "", "ring", "tree", "direct", "auto"])
        if algo:
            opts["algo"] = algo
        tr = rng.choice(["", "", "shm", "tcp"])
        if tr:
            opts["transport"] = tr
        if rng.random() < 0.3:
            opts["chunk_bytes"] = rng.choice([4096, 65536, 1 << 20])
        if rng.random() < 0.2:
            opts["shm_ring_bytes"] = rng.choice([65536, 262144])
        self.eph_serial += 1
        label = f"eph{self.eph_serial}:{'-'.join(map(str, members))}:{opts}"
        g, members = self.new_group(label, members, opts)
        self.eph = (label, g, members)

    def pick_group(self):
        labels = list(self.groups)
        if self.eph is not None:
            labels += ["eph", "eph"]
        lab = self.rng.choice(labels)
        if lab == "eph":
            return self.eph[0], self.eph[1], self.eph[2]
        g, members = self.groups[lab]
        return lab, g, members

    # --- schedule --------------------------------------------------------------------------------------------
    def draw_count(self, dt):
        rng = self.rng
        item = 1 if dt == self.torch.bool else self.torch.empty((), dtype=dt).element_size()
        u = rng.random()
        maxb = self.spec["max_bytes"]
        if u < 0.05:
            return 0
        if u < 0.10:
            return 1
        if u < 0.70:
            lo, hi = 1, min(4096, maxb)
        elif u < 0.95:
            lo, hi = min(4096, maxb), min(256 << 10, maxb)
        else:
            lo, hi = min(256 << 10, maxb), maxb
        nbytes = int(math.exp(rng.uniform(math.log(max(lo, 1)), math.log(max(hi, 1)))))
        return max(1, nbytes // item)

    def red_ops(self, dt, extra=True):
        torch = self.torch
        if dt == torch.bool:
            return ["SUM", "PRODUCT", "MIN", "MAX"]
        ops = ["SUM", "MAX", "MIN", "AVG", "PRODUCT"]
        if extra and dt.is_floating_point:
            ops.append("PREMUL_SUM")
        if extra and not dt.is_floating_point:
            ops += ["BAND", "BOR", "BXOR"]
        return ops

    @staticmethod
    def kind_of(opname):
        return {"PRODUCT": "prod", "MIN": "minmax", "MAX": "minmax", "BAND": "bits", "BOR": "bits",
                "BXOR": "bits"}.get(opname, "sum")

    def run(self, total, sample_every, group_every, initial_shm):
        dist = self.dist
        self.setup_groups()
        samples = []
        t0 = time.monotonic()
        samples.append({"at": 0, **sample(initial_shm, self.spec.get("prune_cache", True))})
        self.step = 0
        progress_every = max(1, total // 20)
        for step in range(total):
            self.step = step
            if step % group_every == 0:
                self.destroy_ephemeral()
                if step and step % sample_every == 0:
                    dist.barrier()  # every rank at the same point: no group is being created while one samples
                    samples.append({"at": step, **sample(initial_shm, self.spec.get("prune_cache", True))})
                    if self.spec.get("max_minutes"):
                        # rank 0's clock decides, for every rank (one extra all-reduce per sample, not counted)
                        late = time.monotonic() - t0 > 60 * self.spec["max_minutes"]
                        flag = self.torch.tensor([1 if (self.rank == 0 and late) else 0])
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        if flag.item():
                            total = step
                            break
                self.create_ephemeral()
            self.one()
            if self.rank == 0 and (step + 1) % progress_every == 0:
                el = time.monotonic() - t0
                print(f"[soak] {step + 1}/{total} collectives, {el:.0f} s, {(step + 1) / el:.0f}/s, "
                      f"failures so far (rank 0): {len(self.failures)}", file=sys.stderr, flush=True)
        self.step = total
        self.destroy_ephemeral()
        dist.barrier()
        if samples[-1]["at"] != total:
            samples.append({"at": total, **sample(initial_shm, self.spec.get("prune_cache", True))})
        wall = time.monotonic() - t0
        self.done = total
        return samples, wall

    def one(self):
        rng = self.rng
        torch, dist = self.torch, self.dist
        names = [o for o, _ in OPS]
        opname = rng.choices(names, weights=[w for _, w in OPS])[0]
        label, g, members = self.pick_group()
        n = len(members)
        me = members.index(self.rank) if self.rank in members else -1
        dtn = rng.choices(DTYPE_NAMES, weights=DTYPE_WEIGHTS)[0]
        if opname == "plait_all_reduce_compressed":
            dtn = rng.choice(["float32", "float32", "bfloat16", "float16"])
        dt = self.dtypes[dtn]
        count = self.draw_count(dt)
        asyn = rng.random() < 0.2
        salt = rng.getrandbits(30)
        # choices that every rank must draw, whether it takes part or not
        red = rng.choice(self.red_ops(dt))
        red_plain = rng.choice(self.red_ops(dt, extra=False))
        root = rng.choice(members)
        peer = rng.choice(members)
        codec = rng.choice(CODECS)
        avg = rng.random() < 0.5
        splits = [[rng.randint(0, max(0, count // max(1, n)) * 2) if rng.random() < 0.85 else 0 for _ in range(n)]
                  for _ in range(n)]
        tag = rng.randint(0, 7)
        ncoal = rng.randint(1, 4)
        self.corrupt_now = self.step == self.spec.get("corrupt", -1)
        if self.corrupt_now:  # PLAIT_SOAK_CORRUPT: this step is a world all-reduce whose result is altered locally
            opname, (label, g, members) = "all_reduce", ("world", *self.groups["world"])
            n, me, count = len(members), members.index(self.rank), max(count, 1)
        key = opname
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
        self.desc = (f"{opname} group={label} n={n} dtype={dtn} count={count} async={asyn} red={red} "
                     f"root={root} salt={salt}")
        if me < 0:
            return
        getattr(self, "op_" + opname)(g, members, n, me, dt, count, asyn, salt, red, red_plain, root, peer, codec,
                                      avg, splits, tag, ncoal)

    @staticmethod
    def _wait(w):
        if w is not None and hasattr(w, "wait"):  # dist.recv returns the sender's rank
            w.wait()

    # --- the collectives -------------------------------------------------------------------------------------
    def op_all_reduce(self, g, members, n, me, dt, count, asyn, salt, red, *rest):
        kind = self.kind_of(red)
        t = self.gen(kind, dt, count, self.rank, salt).clone()
        self._wait(self.dist.all_reduce(t, op=self.make_op(red), group=g, async_op=asyn))
        exp = self.reference(red, [self.gen(kind, dt, count, r, salt) for r in members], dt)
        self.equal("", t, exp, self.approx_for(red, dt, n))

    def op_plait_all_reduce(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, *rest):
        kind = self.kind_of(red_plain)
        t = self.gen(kind, dt, count, self.rank, salt).clone()
        self._wait(self.plait.all_reduce(t, op=self.make_op(red_plain), group=g, async_op=asyn))
        exp = self.reference(red_plain, [self.gen(kind, dt, count, r, salt) for r in members], dt)
        self.equal(f"op={red_plain}", t, exp, self.approx_for(red_plain, dt, n))

    def op_plait_all_reduce_compressed(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, peer,
                                       codec, avg, *rest):
        torch = self.torch
        count = min(count, (256 << 10) // dt.itemsize)
        op = self.dist.ReduceOp.AVG if avg else self.dist.ReduceOp.SUM
        t = self.gen("sum", dt, count, self.rank, salt).clone()
        self._wait(self.plait.all_reduce(t, op=op, group=g, compression=codec, async_op=asyn))
        inputs = [self.gen("sum", dt, count, r, salt) for r in members]
        if n == 1:
            ref = inputs[0]
        else:
            ref = self.compressed_reference(inputs, codec, CODEC_BLOCK[codec], dt, avg)
        iv = torch.int32 if dt == torch.float32 else torch.int16
        self.checks += 1
        if not torch.equal(t.view(iv), ref.view(iv)):
            bad = (t.view(iv) != ref.view(iv)).nonzero().reshape(-1)
            i = int(bad[0])
            self.fail(f"{self.desc} codec={codec} avg={avg}: not bitwise equal to the direct schedule's replay: "
                      f"{bad.numel()} of {count} differ; first at [{i}]: got {t[i].item()}, expected {ref[i].item()}")
        exact = sum(x.double() for x in inputs)
        scale = sum(x.double().abs() for x in inputs)  # quantization error scales with the inputs, not their sum
        if avg:
            exact, scale = exact / n, scale / n
        err = float((t.double() - exact).norm() ** 2 / max(float(scale.norm() ** 2), 1e-30))
        bound = CODEC_BOUND[codec] + (1e-4 if dt != torch.float32 else 0.0)
        if count and err >= bound:
            self.fail(f"{self.desc} codec={codec} avg={avg}: squared error relative to the inputs' magnitude "
                      f"{err:.3g} >= {bound}")

    def compressed_reference(self, inputs, codec, block, dt, average):
        """Replay of the direct compressed schedule (csrc/plait/algo/compressed.cc; tests/test_compression.py)."""
        torch = self.torch
        from plait import _C
        n = len(inputs)
        count = inputs[0].numel()
        div = float(n) if average else 1.0
        out = torch.empty(count, dtype=dt)
        blocks = (count + block - 1) // block
        base, extra = divmod(blocks, n)
        b = 0
        for j in range(n):
            nb = base + (1 if j < extra else 0)
            lo, hi = min(count, b * block), min(count, (b + nb) * block)
            b += nb
            if hi <= lo:
                continue
            acc = inputs[j][lo:hi].float()
            if div != 1.0:
                acc = acc / div
            for r in range(n):
                if r != j:
                    enc = _C.codec_encode(codec, block, inputs[r][lo:hi].contiguous(), div)
                    dec = torch.zeros(hi - lo, dtype=torch.float32)
                    _C.codec_decode_accumulate(codec, block, enc, dec)
                    acc = acc + dec
            enc = _C.codec_encode(codec, block, acc.contiguous(), 1.0)
            out[lo:hi] = _C.codec_decode(codec, block, enc, hi - lo, dt)
        return out

    def op_all_reduce_coalesced(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, peer, codec,
                                avg, splits, tag, ncoal):
        opn = "MAX" if dt == self.torch.bool else ("SUM" if red_plain in ("AVG", "SUM") else red_plain)
        kind = self.kind_of(opn)
        counts = [max(0, count >> k) for k in range(ncoal)]
        ts = [self.gen(kind, dt, c, self.rank, salt + k).clone() for k, c in enumerate(counts)]
        self._wait(self.dist.all_reduce_coalesced(ts, op=self.make_op(opn), group=g, async_op=asyn))
        for k, (c, t) in enumerate(zip(counts, ts)):
            exp = self.reference(opn, [self.gen(kind, dt, c, r, salt + k) for r in members], dt)
            self.equal(f"[{k}] op={opn}", t, exp)

    def op_broadcast(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, *rest):
        t = self.gen("data", dt, count, self.rank, salt).clone()
        if self.rank != root:
            t.zero_()
        self._wait(self.dist.broadcast(t, src=root, group=g, async_op=asyn))
        self.equal("", t, self.gen("data", dt, count, root, salt))

    def op_reduce(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, *rest):
        kind = self.kind_of(red_plain)
        t = self.gen(kind, dt, count, self.rank, salt).clone()
        self._wait(self.dist.reduce(t, dst=root, op=self.make_op(red_plain), group=g, async_op=asyn))
        if self.rank == root:
            exp = self.reference(red_plain, [self.gen(kind, dt, count, r, salt) for r in members], dt)
            self.equal(f"op={red_plain}", t, exp, self.approx_for(red_plain, dt, n))

    def _chunk(self, count, n):
        return count // n if count > 1 else count

    def op_all_gather(self, g, members, n, me, dt, count, asyn, salt, *rest):
        torch = self.torch
        c = self._chunk(count, n)
        t = self.gen("data", dt, c, self.rank, salt)
        outs = [torch.zeros(c, dtype=dt) for _ in range(n)]
        self._wait(self.dist.all_gather(outs, t, group=g, async_op=asyn))
        for k, r in enumerate(members):
            self.equal(f"[from {r}]", outs[k], self.gen("data", dt, c, r, salt))

    def op_all_gather_into_tensor(self, g, members, n, me, dt, count, asyn, salt, *rest):
        torch = self.torch
        c = self._chunk(count, n)
        t = self.gen("data", dt, c, self.rank, salt)
        out = torch.zeros(c * n, dtype=dt)
        self._wait(self.dist.all_gather_into_tensor(out, t, group=g, async_op=asyn))
        self.equal("", out, torch.cat([self.gen("data", dt, c, r, salt) for r in members]))

    def op_reduce_scatter(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, *rest):
        torch = self.torch
        c = self._chunk(count, n)
        kind = self.kind_of(red_plain)
        full = self.gen(kind, dt, c * n, self.rank, salt)
        out = torch.zeros(c, dtype=dt)
        self._wait(self.dist.reduce_scatter(out, [x.clone() for x in full.split(c)] if c else
                                            [torch.empty(0, dtype=dt) for _ in range(n)],
                                            op=self.make_op(red_plain), group=g, async_op=asyn))
        exp = self.reference(red_plain, [self.gen(kind, dt, c * n, r, salt) for r in members], dt)[me * c:(me + 1) * c]
        self.equal(f"op={red_plain}", out, exp, self.approx_for(red_plain, dt, n))

    def op_reduce_scatter_tensor(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, *rest):
        torch = self.torch
        c = self._chunk(count, n)
        kind = self.kind_of(red_plain)
        full = self.gen(kind, dt, c * n, self.rank, salt).clone()
        out = torch.zeros(c, dtype=dt)
        self._wait(self.dist.reduce_scatter_tensor(out, full, op=self.make_op(red_plain), group=g, async_op=asyn))
        exp = self.reference(red_plain, [self.gen(kind, dt, c * n, r, salt) for r in members], dt)[me * c:(me + 1) * c]
        self.equal(f"op={red_plain}", out, exp, self.approx_for(red_plain, dt, n))

    def op_all_to_all(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, peer, codec, avg,
                      splits, *rest):
        torch = self.torch
        # uneven lists: member i sends splits[i][j] elements to member j
        src_full = [self.gen("data", dt, sum(splits[i]), r, salt) for i, r in enumerate(members)]

        def piece(i, j):
            off = sum(splits[i][:j])
            return src_full[i][off:off + splits[i][j]]

        ins = [piece(me, j).clone() for j in range(n)]
        outs = [torch.zeros(splits[i][me], dtype=dt) for i in range(n)]
        self._wait(self.dist.all_to_all(outs, ins, group=g, async_op=asyn))
        for i in range(n):
            self.equal(f"[from {members[i]}] splits={splits}", outs[i], piece(i, me))

    def op_all_to_all_single(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, peer, codec, avg,
                             splits, *rest):
        torch = self.torch
        even = splits[0][0] % 3 == 0
        if even:
            c = self._chunk(count, n)
            inp = self.gen("data", dt, c * n, self.rank, salt).clone()
            out = torch.zeros(c * n, dtype=dt)
            self._wait(self.dist.all_to_all_single(out, inp, group=g, async_op=asyn))
            exp = torch.cat([self.gen("data", dt, c * n, r, salt)[me * c:(me + 1) * c] for r in members])
            self.equal("even", out, exp)
            return
        inp = self.gen("data", dt, sum(splits[me]), self.rank, salt).clone()
        out_splits = [splits[i][me] for i in range(n)]
        out = torch.zeros(sum(out_splits), dtype=dt)
        self._wait(self.dist.all_to_all_single(out, inp, output_split_sizes=out_splits,
                                               input_split_sizes=splits[me], group=g, async_op=asyn))
        parts = []
        for i, r in enumerate(members):
            off = sum(splits[i][:me])
            parts.append(self.gen("data", dt, sum(splits[i]), r, salt)[off:off + splits[i][me]])
        self.equal(f"uneven splits={splits}", out, torch.cat(parts))

    def op_gather(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, *rest):
        torch = self.torch
        c = self._chunk(count, n)
        t = self.gen("data", dt, c, self.rank, salt)
        gl = [torch.zeros(c, dtype=dt) for _ in range(n)] if self.rank == root else None
        self._wait(self.dist.gather(t, gather_list=gl, dst=root, group=g, async_op=asyn))
        if self.rank == root:
            for k, r in enumerate(members):
                self.equal(f"[from {r}]", gl[k], self.gen("data", dt, c, r, salt))

    def op_scatter(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, *rest):
        torch = self.torch
        c = self._chunk(count, n)
        sl = [self.gen("data", dt, c, r, salt).clone() for r in members] if self.rank == root else None
        out = torch.zeros(c, dtype=dt)
        self._wait(self.dist.scatter(out, scatter_list=sl, src=root, group=g, async_op=asyn))
        self.equal("", out, self.gen("data", dt, c, self.rank, salt))

    def op_barrier(self, g, members, n, me, dt, count, asyn, *rest):
        self.checks += 1
        self._wait(self.dist.barrier(group=g, async_op=asyn))

    def op_send_recv(self, g, members, n, me, dt, count, asyn, salt, red, red_plain, root, peer, codec, avg, splits,
                     tag, *rest):
        torch, dist = self.torch, self.dist
        if n == 1 or root == peer:
            self.op_barrier(g, members, n, me, dt, count, asyn)
            return
        src, dst = root, peer
        if self.rank == src:
            t = self.gen("data", dt, count, src, salt)
            self._wait(dist.isend(t, dst, group=g, tag=tag) if asyn else dist.send(t, dst, group=g, tag=tag))
        elif self.rank == dst:
            t = torch.zeros(count, dtype=dt)
            self._wait(dist.irecv(t, src, group=g, tag=tag) if asyn else dist.recv(t, src, group=g, tag=tag))
            self.equal(f"from {src} to {dst} tag={tag}", t, self.gen("data", dt, count, src, salt))

    def op_batch_isend_irecv(self, g, members, n, me, dt, count, asyn, salt, *rest):
        torch, dist = self.torch, self.dist
        if n == 1:
            self.op_barrier(g, members, n, me, dt, count, asyn)
            return
        nxt, prv = members[(me + 1) % n], members[(me - 1) % n]
        t = self.gen("data", dt, count, self.rank, salt)
        buf = torch.zeros(count, dtype=dt)
        ops = [dist.P2POp(dist.isend, t, nxt, group=g), dist.P2POp(dist.irecv, buf, prv, group=g)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        self.equal(f"from {prv}", buf, self.gen("data", dt, count, prv, salt))


def worker_main(rank, spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    world = spec["world"]
    out_path = os.path.join(spec["dir"], f"rank{rank}.json")
    result = {"rank": rank, "ok": False}
    try:
        import torch
        import torch.distributed as dist
        import plait  # noqa: F401

        torch.set_num_threads(1)
        dist.init_process_group("plait", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=spec["pg_timeout_s"]))
        s = Soak(rank, world, spec)
        try:
            samples, wall = s.run(spec["collectives"], spec["sample_every"], spec["group_every"],
                                  set(spec["initial_shm"]))
        except BaseException:
            result["error"] = f"collective {getattr(s, 'step', '?')} ({getattr(s, 'desc', '')}):\n" + \
                traceback.format_exc()
            raise
        finally:
            result["failures"] = s.failures
            result["failures_dropped"] = getattr(s, "failures_dropped", 0)
            result["checks"] = s.checks
            result["op_counts"] = s.op_counts
            result["groups_created"] = s.groups_created
            result["groups_destroyed"] = s.groups_destroyed
        result.update(ok=True, samples=samples, wall_s=wall, collectives=s.done)
        dist.destroy_process_group()
    except BaseException:
        result.setdefault("error", traceback.format_exc())
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result["ok"] else 3)


# ------------------------------------------------------------------------------------------------------------------
# parent side


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def analyse(results, total, warmup, rss_bound_mib):
    """Per rank and metric: start, end, max, warm-up max, slope per 10k after warm-up; and the violations."""
    table, violations = {}, []
    for res in results:
        r = res["rank"]
        samples = res.get("samples") or []
        if not samples:
            continue
        wcut = warmup * total
        table[r] = {}
        for m in METRICS:
            xs = [s["at"] for s in samples]
            ys = [s[m] for s in samples]
            wu = [y for x, y in zip(xs, ys) if x <= wcut] or ys[:1]
            post = [(x, y) for x, y in zip(xs, ys) if x >= wcut]
            sl = slope_per_10k([p[0] for p in post], [p[1] for p in post])
            row = {"start": ys[0], "end": ys[-1], "max": max(ys), "warmup_max": max(wu), "slope_per_10k": sl,
                   "samples_after_warmup": len(post)}
            table[r][m] = row
            if m in ("rss_mib", "shmem_mib"):
                pass  # reported; the bound applies to the private part (anon_mib), shared ring pages fill in
            elif m == "anon_mib":
                if sl > rss_bound_mib:
                    violations.append(f"rank {r}: private RSS (RssAnon) grows {sl:.3f} MiB per 10k collectives "
                                      f"after the warm-up (bound {rss_bound_mib}); start {ys[0]:.1f}, end "
                                      f"{ys[-1]:.1f} MiB")
            elif m == "stale_cache":
                pass  # reported, not judged (pruned at each sample unless --no-prune-cache)
            elif sl > 0 and ys[-1] > max(wu):
                violations.append(f"rank {r}: {m} grows: slope {sl:.3f} per 10k collectives, end {ys[-1]} > "
                                  f"warm-up max {max(wu)} (start {ys[0]})")
    return table, violations


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collectives", type=int, default=100_000)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="", help="write the figures as JSON to this file")
    ap.add_argument("--max-bytes", type=int, default=4 << 20, help="largest message per rank (bytes)")
    ap.add_argument("--group-every", type=int, default=250,
                    help="destroy and re-create the ephemeral group every this many collectives")
    ap.add_argument("--sample-every", type=int, default=1000,
                    help="resource sample period (rounded up to a multiple of --group-every)")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the run left out of the slopes")
    ap.add_argument("--rss-slope-mib", type=float, default=1.0,
                    help="bound on the private RSS (RssAnon), MiB per 10k collectives")
    ap.add_argument("--pg-timeout", type=float, default=120.0, help="group timeout (s)")
    ap.add_argument("--barrier-before-destroy", action="store_true",
                    help="a barrier on the ephemeral group before destroying it (default: destroy at once)")
    ap.add_argument("--no-prune-cache", action="store_true",
                    help="leave destroyed groups in plait.all_reduce's lookup cache at sample points (they hold their "
                         "sockets and shared memory until the cache's next miss; the stale_cache metric counts them)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop cleanly at the first sample point after this many minutes (0: run them all)")
    ap.add_argument("--timeout", type=float, default=0, help="wall-clock limit of the whole run (s; 0: none)")
    ap.add_argument("--_worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker is not None:
        worker_main(a._worker, a._spec)
        return 0
    if a.collectives < 1 or a.world < 1 or a.group_every < 1 or a.sample_every < 1 or a.max_bytes < 1:
        ap.error("--collectives, --world, --group-every, --sample-every and --max-bytes must be >= 1")
    sample_every = -(-a.sample_every // a.group_every) * a.group_every
    d = tempfile.mkdtemp(prefix="plait_soak_")
    try:
        initial_shm = sorted(n for n in os.listdir("/dev/shm") if n.startswith("plait"))
    except OSError:
        initial_shm = []
    spec = dict(world=a.world, seed=a.seed, collectives=a.collectives, max_bytes=a.max_bytes,
                group_every=a.group_every, sample_every=sample_every, pg_timeout_s=a.pg_timeout, port=free_port(),
                dir=d, initial_shm=initial_shm,
                barrier_before_destroy=a.barrier_before_destroy, prune_cache=not a.no_prune_cache,
                max_minutes=a.max_minutes,
                corrupt=int(os.environ.get("PLAIT_SOAK_CORRUPT", "-1")))
    spec_path = os.path.join(d, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    print(f"[soak] {a.collectives} collectives, world {a.world}, seed {a.seed}, max {a.max_bytes} bytes, ephemeral "
          f"group every {a.group_every}, samples every {sample_every}; logs in {d}", file=sys.stderr, flush=True)
    procs, logs = [], []
    t0 = time.monotonic()
    for r in range(a.world):
        log = open(os.path.join(d, f"rank{r}.log"), "wb")
        logs.append(log.name)
        # rank 0's progress lines go to our stderr too (tee'd below from its log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", str(r), "--_spec",
                                       spec_path], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
    deadline = t0 + a.timeout if a.timeout > 0 else None
    first_bad = None
    shown = 0
    killed = []
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            try:  # echo rank 0's progress
                with open(logs[0], "rb") as f:
                    f.seek(shown)
                    chunk = f.read()
                lines = chunk.decode("utf-8", "replace").splitlines(keepends=True)
                for ln in lines:
                    if ln.endswith("\n"):
                        shown += len(ln.encode())
                        if ln.startswith("[soak]"):
                            sys.stderr.write(ln)
            except OSError:
                pass
            now = time.monotonic()
            if first_bad is None and any(p.poll() not in (None, 0) for p in procs):
                first_bad = now
            grace_over = first_bad is not None and now - first_bad > a.pg_timeout + 30
            if (deadline and now > deadline) or grace_over:
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        try:
                            os.killpg(p.pid, signal.SIGUSR1)  # faulthandler stacks into the log
                        except ProcessLookupError:
                            pass
                time.sleep(1)
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        killed.append(r)
                        try:
                            os.killpg(p.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                break
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
    elapsed = time.monotonic() - t0
    results, errors = [], []
    for r in range(a.world):
        path = os.path.join(d, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
        else:
            res = {"rank": r, "ok": False, "error": f"no result (exit code {procs[r].returncode}"
                                                   f"{', killed by the soak script' if r in killed else ''})"}
        if not res.get("ok"):
            with open(logs[r], "rb") as f:
                tail = f.read()[-3000:].decode("utf-8", "replace")
            errors.append(f"rank {r}: {res.get('error', '')}\n--- log tail ---\n{tail}")
        results.append(res)
    failures = [x for res in results for x in res.get("failures", [])]
    dropped = sum(res.get("failures_dropped", 0) for res in results)
    ok_all = all(res.get("ok") for res in results)
    done = min(res.get("collectives", 0) for res in results) if ok_all else None
    table, violations = analyse(results, done or a.collectives, a.warmup, a.rss_slope_mib)
    wall = max((res.get("wall_s", 0) for res in results), default=0) or elapsed

    # report
    print(f"plait soak: {a.collectives} collectives scheduled, world {a.world}, seed {a.seed}, "
          f"max {a.max_bytes} bytes, ephemeral group every {a.group_every}")
    if ok_all:
        checks = sum(res.get("checks", 0) for res in results)
        created = results[0].get("groups_created", 0)
        print(f"ran {done} collectives in {wall:.1f} s ({done / wall:.1f} collectives/s); {checks} results checked "
              f"over all ranks; {created} groups created by rank 0 ({results[0].get('groups_destroyed', 0)} "
              f"destroyed)")
        counts = results[0].get("op_counts", {})
        print("ops drawn: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"{'metric':<10} {'rank':>4} {'start':>10} {'warmup max':>10} {'max':>10} {'end':>10} "
          f"{'slope/10k':>10}  (slope fitted after the first {a.warmup:.0%})")
    for m in METRICS:
        for r in sorted(table):
            row = table[r][m]
            fmt = (lambda v: f"{v:10.2f}") if m.endswith("_mib") else (lambda v: f"{v:10d}")
            print(f"{m:<10} {r:>4} {fmt(row['start'])} {fmt(row['warmup_max'])} {fmt(row['max'])} "
                  f"{fmt(row['end'])} {row['slope_per_10k']:10.3f}")
    for e in errors:
        print("ERROR " + e)
    for x in failures[:50]:
        print("WRONG RESULT " + x)
    if len(failures) > 50 or dropped:
        print(f"... {len(failures) - 50 + dropped} more wrong results")
    for v in violations:
        print("LEAK " + v)
    status = "PASS" if ok_all and not failures and not violations else "FAIL"
    print(f"soak: {status}")
    if a.json:
        out = dict(collectives=done if done is not None else 0, collectives_scheduled=a.collectives, world=a.world,
                   seed=a.seed, max_bytes=a.max_bytes, group_every=a.group_every, sample_every=sample_every,
                   warmup=a.warmup, rss_slope_bound_mib=a.rss_slope_mib, wall_s=wall,
                   collectives_per_s=(done / wall if done and wall else 0.0), status=status,
                   op_counts=results[0].get("op_counts", {}) if results else {},
                   checks=sum(res.get("checks", 0) for res in results),
                   groups_created=results[0].get("groups_created", 0) if results else 0,
                   metrics={str(r): table[r] for r in table},
                   samples={str(res["rank"]): res.get("samples", []) for res in results},
                   failures=failures, errors=errors, violations=violations)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if status == "PASS":
        import shutil
        shutil.rmtree(d, ignore_errors=True)
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
