"""Tests that need more memory than a default CI run should assume (opt-in: PLAIT_BIG_TESTS=1).

Item 3 of issue 10: device descriptors were 32-bit ({uint32 offset, uint32 bytes}) while the staging buffer grows
without a cap, so a send from a staging offset past 4 GiB pulled the wrong bytes. The scenario here is the emulated
device engine (PLAIT_DEVICE=emulate: the very same engine, descriptors and pull protocol as CUDA, with device memory
in host shared memory) running an uneven all-to-all whose staging buffer grows past 2^32: rank 0 keeps 4 GiB + 8 MiB
for itself and sends 1 MiB to rank 1, from offset 4 GiB + 8 MiB of its staging buffer (a 32-bit descriptor says
8 MiB). (Element-wise collectives never get there: they go through in slices of the staging buffer.)

Memory: about 12.5 GiB at peak on rank 0 (its input is a sparse private file mapping; the staging buffer holds input
and output; the output itself). Skipped unless PLAIT_BIG_TESTS=1 and at least 16 GiB are available.

    PLAIT_BIG_TESTS=1 .venv/bin/python -m pytest tests/test_big.py -v
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import _harness as H

GiB = 1 << 30
MiB = 1 << 20
A = 4 * GiB + 8 * MiB  # rank 0's block to itself
M = 1 * MiB  # every other block


def _mem_available() -> int:
    """MemAvailable, capped by this container's cgroup memory limit (where /proc/meminfo shows the host's)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path, used_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(path) as f:
                lim = f.read().strip()
            if lim == "max":
                continue
            with open(used_path) as f:
                used = int(f.read().strip())
            avail = min(avail, int(lim) - used)
        except (OSError, ValueError):
            continue
    return avail


pytestmark = [
    pytest.mark.skipif(not H.IS_PLAIT, reason="plait's engine"),
    pytest.mark.skipif(os.environ.get("PLAIT_BIG_TESTS") != "1", reason="opt-in: PLAIT_BIG_TESTS=1 (about 12.5 GiB)"),
    pytest.mark.skipif(_mem_available() < 16 * GiB, reason="needs 16 GiB of available memory"),
]


def worker_alltoall_past_4gib(rank, ws, path):
    in_splits = [A, M] if rank == 0 else [M, M]
    out_splits = [A, M] if rank == 0 else [M, M]
    if rank == 0:
        # A sparse private mapping: reading its holes costs no memory; only the pages written below are.
        t = torch.from_file(path, shared=False, size=A + M, dtype=torch.uint8)
        t[:M] = 1  # start of the block rank 0 keeps (what a 32-bit offset would point near)
        t[8 * MiB:9 * MiB] = 2  # where a truncated offset (A mod 2^32 = 8 MiB) points
        t[A - M:A] = 3  # end of the block rank 0 keeps
        t[A:] = 7  # the block for rank 1, from staging offset A > 2^32
    else:
        t = torch.cat([torch.full((M,), 5, dtype=torch.uint8), torch.full((M,), 6, dtype=torch.uint8)])
    out = torch.empty(sum(out_splits), dtype=torch.uint8)
    dist.all_to_all_single(out, t, out_splits, in_splits)
    if rank == 0:
        return dict(start=out[:M].unique().tolist(), mid=out[8 * MiB:9 * MiB].unique().tolist(),
                    end=out[A - M:A].unique().tolist(), peer=out[A:].unique().tolist(),
                    nonzero=int(out.count_nonzero()))
    return dict(from0=out[:M].unique().tolist(), self=out[M:].unique().tolist())


def test_device_alltoall_with_staging_past_4gib(tmp_path):
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(A + M)
    res = H.run_world(worker_alltoall_past_4gib, 2, str(path), pg_timeout_s=300, timeout_s=900,
                      env={"PLAIT_DEVICE": "emulate"})
    assert res[0] == dict(start=[1], mid=[2], end=[3], peer=[5], nonzero=4 * M)
    assert res[1] == dict(from0=[7], self=[6])
