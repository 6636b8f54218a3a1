"""plait's CUDA kernels against the device-to-device copy ceiling, measured in the same run on one GPU.

Measured at each size (the size of one buffer):

    d2d copy_          torch ``dst.copy_(src)`` (a cudaMemcpyAsync device-to-device inside torch)
    d2d cudaMemcpy     cudaMemcpyAsync(..., cudaMemcpyDeviceToDevice) called directly on torch's CUDA runtime
    plait copy         plait._C.cuda_copy
    plait sum f32      plait._C.cuda_reduce("sum", "float32"), in place (a += b: the ring step's shape)
    plait sum bf16     the same over bfloat16
    torch add f32/bf16 ``torch.add(a, b, out=a)``: torch's own element-wise kernel, for reference

Bandwidth counts the bytes each kernel moves through memory: a copy reads and writes every byte (2 x size), a
reduce reads two inputs and writes one output (3 x size). The ceiling is the faster of the two device-to-device
copies at that size, and every row reports its percentage of it. Times are CUDA events around each launch on the
current stream (a spin kernel ahead of each launch hides the host's launch overhead), median over the timed
iterations (at least 20) after warm-up. Before timing, every plait kernel's result is checked against torch at that
size.

    python bench/gpu_kernels.py                          # 1 MiB .. 1 GiB, powers of 4
    python bench/gpu_kernels.py --sizes 1M,16M,256M --iters 50 --json out.json
"""
import argparse
import ctypes
import json
import platform
import statistics
import sys

import torch

from _sizes import human, parse_size  # bench/_sizes.py

DEFAULT_SIZES = "1M,4M,16M,64M,256M,1G"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated buffer sizes in bytes (K/M/G suffixes)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per size and kernel (0 = by size, >= 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations before timing")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    for s in args.sizes:
        if s % 16:
            p.error(f"size {s} is not a multiple of 16 bytes (the benchmark views buffers as float32 / bfloat16)")
    if args.iters and args.iters < 20:
        p.error("--iters must be at least 20 (the median needs them)")
    return args


def iters_for(nbytes, requested):
    if requested:
        return requested
    return max(20, min(200, int(4e9 // nbytes)))  # about 4 GB of traffic per kernel and size, 20..200 iterations


def torch_cudart():
    """The CUDA runtime library torch loaded (ctypes), for a direct cudaMemcpyAsync; None if not found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.cudaMemcpyAsync
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn
    return None


SPIN_CYCLES = 100_000  # about 50 us of GPU clock: longer than the host needs to enqueue one timed launch


def median_ms(fn, iters, warmup):
    """Median over `iters` launches of fn, each timed on its own with CUDA events on the current stream.

    A short spin kernel ahead of each start event keeps the GPU busy while the host enqueues the event and the launch,
    so the time between the events is the kernel's alone, not the Python and launch overhead (which would dominate at
    1 MiB)."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def check(C, nbytes, x, y, z, stream):
    """plait's results at this size against torch (integer-valued data: exact)."""
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        a, b, ref = x.view(dtype), y.view(dtype), z.view(dtype)
        n = a.numel()
        a.copy_(torch.arange(n, device="cuda") % 61)
        b.copy_(torch.arange(n, device="cuda") % 67)
        torch.add(a, b, out=ref)
        C.cuda_reduce("sum", name, a.data_ptr(), a.data_ptr(), b.data_ptr(), n, stream)
        if not torch.equal(a, ref):
            raise SystemExit(f"gpu_kernels: plait reduce sum {name} is WRONG at {human(nbytes)}; not timing it")
    y.copy_(torch.arange(nbytes, device="cuda", dtype=torch.int32).to(torch.uint8))
    C.cuda_copy(x.data_ptr(), y.data_ptr(), nbytes, stream)
    if not torch.equal(x, y):
        raise SystemExit(f"gpu_kernels: plait copy is WRONG at {human(nbytes)}; not timing it")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 0
    import plait._C as C

    if not (hasattr(C, "cuda_reduce") and C.cuda_compiled()):
        print("gpu_kernels: plait was built without its CUDA kernels (nvcc not found at build time); rebuild with "
              "the CUDA toolkit on PATH.", file=sys.stderr)
        return 1
    if C.cuda_device_count() == 0:
        print("gpu_kernels: plait's CUDA runtime sees no device although torch does (driver older than the toolkit "
              "plait was built with?).", file=sys.stderr)
        return 1

    torch.cuda.init()
    memcpy = torch_cudart()
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    print(f"# {props.name}, {props.multi_processor_count} SMs (plait sees {C.cuda_sm_count()}), torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}); bandwidth = bytes moved / median time; "
          f"% = of the faster D2D copy")
    if memcpy is None:
        print("# (torch's libcudart not found in this process: the direct cudaMemcpyAsync row is left out)")

    results = []
    header = f"{'size':>10} {'kernel':<16} {'moved':>10} {'median us':>10} {'GB/s':>9} {'% of D2D':>9}"
    print(header)
    for nbytes in args.sizes:
        iters = iters_for(nbytes, args.iters)
        x = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        y = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        z = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        check(C, nbytes, x, y, z, stream)
        del z
        x.zero_()
        y.zero_()  # zeros: repeated in-place sums stay zero (no overflow, no subnormals)
        xf, yf = x.view(torch.float32), y.view(torch.float32)
        xb, yb = x.view(torch.bfloat16), y.view(torch.bfloat16)

        def plait_sum(a, b, name):
            return lambda: C.cuda_reduce("sum", name, a.data_ptr(), a.data_ptr(), b.data_ptr(), a.numel(), stream)

        kernels = [("d2d copy_", 2, lambda: x.copy_(y), True)]
        if memcpy is not None:
            def d2d_memcpy():
                rc = memcpy(x.data_ptr(), y.data_ptr(), nbytes, 3, stream)  # 3: cudaMemcpyDeviceToDevice
                if rc:
                    raise RuntimeError(f"cudaMemcpyAsync failed: {rc}")
            kernels.append(("d2d cudaMemcpy", 2, d2d_memcpy, True))
        kernels += [
            ("plait copy", 2, lambda: C.cuda_copy(x.data_ptr(), y.data_ptr(), nbytes, stream), False),
            ("plait sum f32", 3, plait_sum(xf, yf, "float32"), False),
            ("plait sum bf16", 3, plait_sum(xb, yb, "bfloat16"), False),
            ("torch add f32", 3, lambda: torch.add(xf, yf, out=xf), False),
            ("torch add bf16", 3, lambda: torch.add(xb, yb, out=xb), False),
        ]
        rows = []
        for name, factor, fn, is_ceiling in kernels:
            ms = median_ms(fn, iters, args.warmup)
            rows.append({"bytes": nbytes, "kernel": name, "bytes_moved": factor * nbytes, "median_us": ms * 1e3,
                         "gbps": factor * nbytes / (ms * 1e-3) / 1e9, "iters": iters, "ceiling": is_ceiling})
        ceiling = max(r["gbps"] for r in rows if r["ceiling"])
        for r in rows:
            r["pct_of_d2d"] = 100.0 * r["gbps"] / ceiling
            print(f"{human(nbytes):>10} {r['kernel']:<16} {human(r['bytes_moved']):>10} {r['median_us']:>10.1f} "
                  f"{r['gbps']:>9.1f} {r['pct_of_d2d']:>8.1f}%")
        results += rows
        del x, y, xf, yf, xb, yb
        torch.cuda.empty_cache()

    if args.json:
        doc = {
            "bench": "gpu_kernels",
            "device": props.name,
            "sm_count": props.multi_processor_count,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "host": platform.node(),
            "method": "CUDA events per launch, median; GB/s = bytes moved (copy 2x, reduce 3x size) / time; "
                      "pct_of_d2d = of the faster device-to-device copy at the same size",
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
