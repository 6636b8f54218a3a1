"""Peak RSS added by one large all-reduce, uncompressed beside compressed (plait.all_reduce(compression=...)).

Per compression setting, a fresh pair of processes (``--nproc`` ranks on this host, plait's default transport: shared
memory) is spawned, so ru_maxrss (a high-water mark) starts clean for each. Every rank: init the plait group, one
small all-reduce with the same compression (connections and lazily created state, excluded from the delta), then
allocate the SIZE tensor and fill it (its pages touched), read ru_maxrss (``base``), run one all-reduce of it, read
ru_maxrss again (``after``); reported per rank: after - base, i.e. the peak memory the call itself added (plait's
staging buffers, shared-memory segments mapped and touched, codec buffers). A second call is timed the same way to
show that nothing grows per call.

    python bench/compression_memory.py                          # 256 MiB float32, 2 ranks, none and int8
    python bench/compression_memory.py --size 256M --compression none,int8,int4 --json out.json
    python bench/compression_memory.py --transport tcp --no-warmup
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from plait.bench.sizes import human, parse_size  # noqa: E402


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(rank, world, port, nbytes, dtype_name, codec, outdir, transport, warmup):
    import datetime

    import torch
    import torch.distributed as dist

    import plait

    torch.set_num_threads(1)
    dist.init_process_group("plait", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300), pg_options=plait.Options(transport=transport))
    comp = None if codec == "none" else codec
    dtype = getattr(torch, dtype_name)
    if warmup:
        small = torch.randn(1 << 16).to(dtype)
        plait.all_reduce(small, compression=comp)
        del small
    start = maxrss_mib()
    x = torch.empty(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
    x.normal_()
    base = maxrss_mib()
    plait.all_reduce(x, compression=comp)
    after1 = maxrss_mib()
    x.normal_()
    plait.all_reduce(x, compression=comp)
    after2 = maxrss_mib()
    dist.barrier()
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump({"rank": rank, "start_mib": start, "base_mib": base, "after1_mib": after1, "after2_mib": after2},
                  f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("-d", "--dtype", default="float32")
    ap.add_argument("--compression", default="none,int8")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--transport", default="auto", choices=("auto", "shm", "tcp"))
    ap.add_argument("--no-warmup", action="store_true", help="no small all-reduce first: the delta then includes "
                                                               "state created on the first call")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch.multiprocessing as mp

    nbytes = parse_size(a.size)
    rows = []
    print(f"# one {human(nbytes)} {a.dtype} all-reduce, {a.nproc} ranks on one host, transport {a.transport}, "
          f"{'no warm-up' if a.no_warmup else 'after a 256 KiB warm-up call'}; ru_maxrss deltas in MiB")
    print("| compression | rank | tensor (MiB) | 1st call adds (MiB) | 2nd call adds (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for codec in [c.strip() for c in a.compression.split(",") if c.strip()]:
        with tempfile.TemporaryDirectory(prefix="plait_cmem_") as tmp:
            mp.start_processes(worker, args=(a.nproc, free_port(), nbytes, a.dtype, codec, tmp, a.transport,
                                                not a.no_warmup), nprocs=a.nproc,
                               join=True, start_method="spawn")
            for r in range(a.nproc):
                with open(os.path.join(tmp, f"{r}.json")) as f:
                    d = json.load(f)
                d.update(compression=codec, transport=a.transport, warmup=not a.no_warmup, bytes=nbytes, dtype=a.dtype,
                         tensor_mib=d["base_mib"] - d["start_mib"],
                         call1_mib=d["after1_mib"] - d["base_mib"], call2_mib=d["after2_mib"] - d["after1_mib"])
                rows.append(d)
                print(f"| {codec} | {r} | {d['tensor_mib']:.1f} | {d['call1_mib']:.1f} | {d['call2_mib']:.1f} |",
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
