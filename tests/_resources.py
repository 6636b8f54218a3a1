"""What a process holds, for leak checks: threads, file descriptors (sockets among them), listening TCP sockets,
plait shared-memory mappings, plait's /dev/shm entries, resident memory. Linux only (reads /proc)."""

from __future__ import annotations

import glob
import os
import threading


def _socket_inodes() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed between listdir and readlink
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _listening(inodes: set[str]) -> int:
    """This process's TCP sockets in LISTEN state (state 0A in /proc/net/tcp{,6}; matched by inode)."""
    n = 0
    for path in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                        n += 1
        except FileNotFoundError:
            pass
    return n


def _shm_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/plait" in line)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def snapshot() -> dict:
    """Counts of what this process holds now. ``threads``: OS threads (/proc/self/task); ``py_threads``: Python's;
    ``fds``: open descriptors; ``sockets``: descriptors that are sockets; ``listen``: TCP sockets listening;
    ``shm_maps``: mappings of plait shared-memory segments (deleted or not); ``rss_kib``: resident memory."""
    inodes = _socket_inodes()
    return {
        "threads": len(os.listdir("/proc/self/task")),
        "py_threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "sockets": len(inodes),
        "listen": _listening(inodes),
        "shm_maps": _shm_maps(),
        "rss_kib": _rss_kib(),
    }


COUNTS = ("threads", "py_threads", "fds", "sockets", "listen", "shm_maps")


def diff(before: dict, after: dict, keys=COUNTS) -> dict:
    """The counts that changed: {name: (before, after)}."""
    return {k: (before[k], after[k]) for k in keys if before[k] != after[k]}


def fd_targets() -> dict[int, str]:
    """{fd: what it refers to} (readlink of /proc/self/fd/N), to name what leaked."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def shm_entries(prefix: str = "plait") -> set[str]:
    return set(glob.glob(f"/dev/shm/{prefix}*"))
