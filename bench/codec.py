"""Single-thread throughput of plait's CPU codec kernels (csrc/plait/kernels/codec.h) beside a memcpy measured in the
same run.

For each codec (int8, int4, fp8, bf16, default blocks) and each size (the size of the float32 input):

    encode f32     plait._C.codec_encode of float32 values into a preallocated uint8 buffer (div = 1)
    encode f32 /3  the same with div = 3 (AVG's pre-division: one more IEEE division per value)
    encode bf16    encode of bfloat16 values (half the input bytes for the same number of values)
    decode-acc     plait._C.codec_decode_accumulate into a float32 accumulator (acc += decoded)
    memcpy         torch ``dst.copy_(src)`` of the float32 input, one thread

Throughput is GB/s of input values as the caller holds them: float32 / bfloat16 bytes for encode, the float32 bytes
of the accumulator for decode-acc; the percentage is against the memcpy of the same float32 size. Median of --repeats
timings; each timing runs the kernel enough times to take about 20 ms, and all rows of a size take turns within each
repeat (a busy machine slows them alike). torch runs single-threaded (torch.set_num_threads(1)); the codec kernels
are single-threaded anyway. Before timing, every encode is decoded and checked against its input (relative RMS
error within a loose per-codec limit) and decode-accumulate against decode.

    python bench/codec.py                      # 256 KiB (cache-resident) and 64 MiB
    python bench/codec.py --sizes 1M,16M --repeats 9
    PLAIT_KERNELS=scalar python bench/codec.py # the portable kernels
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sizes import human, parse_size  # noqa: E402  (bench/_sizes.py)

CODECS = ["int8", "int4", "fp8", "bf16"]
# Worst-case relative RMS error of decode(encode(x)) for standard normal x (loose: a broken kernel is far off).
MAX_REL_RMS = {"int8": 0.02, "int4": 0.3, "fp8": 0.05, "bf16": 0.005}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256K,64M", help="float32 input sizes in bytes (K/M/G suffixes), comma-separated")
    p.add_argument("--repeats", type=int, default=7, help="timings per row and size (the median is reported)")
    p.add_argument("--target-ms", type=float, default=20.0, help="approximate duration of one timing")
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    for s in args.sizes:
        if s % 4:
            p.error(f"size {s} is not a multiple of 4 bytes (float32 values)")
    return args


def calibrate(fn, target_s):
    """Calls of fn that take about target_s (at least one)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))


def measure(rows, target_s, repeats):
    """Median seconds per call of each row's fn. The rows take turns within every repeat (memcpy included), so a
    busy machine slows them alike and the percentages of memcpy stay meaningful."""
    inner = {name: calibrate(fn, target_s) for name, fn in rows.items()}
    samples = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            k = inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {name: statistics.median(v) for name, v in samples.items()}


def check(C, codec, x, enc, n):
    dec = C.codec_decode(codec, 0, enc, n, torch.float32)
    xf = x.float()
    rel = float(((dec - xf).double().pow(2).mean() / xf.double().pow(2).mean()).sqrt())
    if not rel <= MAX_REL_RMS[codec]:
        sys.exit(f"bench/codec.py: {codec} round trip of {n} values has relative RMS error {rel:.3g} "
                 f"(> {MAX_REL_RMS[codec]}): the kernel is broken, not timing it")
    acc = torch.zeros(n)
    C.codec_decode_accumulate(codec, 0, enc, acc)
    if not torch.equal(acc, dec + 0.0):
        sys.exit(f"bench/codec.py: {codec} decode-accumulate into zeros differs from decode")


def main(argv=None):
    args = parse_args(argv)
    import plait._C as C

    torch.set_num_threads(1)
    target = args.target_ms / 1000
    results = {}  # (row, codec) -> {size: GB/s}
    memcpy = {}
    for size in args.sizes:
        n = size // 4
        g = torch.Generator().manual_seed(1)
        x32 = torch.randn(n, generator=g)
        x16 = x32.to(torch.bfloat16)
        dst = torch.empty_like(x32)
        rows = {("memcpy", "-"): lambda: dst.copy_(x32)}
        in_bytes = {("memcpy", "-"): size}
        space = torch.empty(max(C.codec_encoded_bytes(c, 0, n) for c in CODECS), dtype=torch.uint8)
        acc = torch.zeros(n)  # shared by the decode-acc rows (sums of normal values stay finite)
        for codec in CODECS:
            out = space[:C.codec_encoded_bytes(codec, 0, n)]
            enc = C.codec_encode(codec, 0, x32)
            check(C, codec, x32, enc, n)
            check(C, codec, x16, C.codec_encode(codec, 0, x16), n)
            for row, nbytes, fn in (
                    ("encode f32", size, lambda c=codec, o=out: C.codec_encode(c, 0, x32, 1.0, out=o)),
                    ("encode f32 /3", size, lambda c=codec, o=out: C.codec_encode(c, 0, x32, 3.0, out=o)),
                    ("encode bf16", size // 2, lambda c=codec, o=out: C.codec_encode(c, 0, x16, 1.0, out=o)),
                    ("decode-acc", size, lambda c=codec, e=enc: C.codec_decode_accumulate(c, 0, e, acc))):
                rows[(row, codec)] = fn
                in_bytes[(row, codec)] = nbytes
        secs = measure(rows, target, args.repeats)
        memcpy[size] = size / secs[("memcpy", "-")] / 1e9
        for key, t in secs.items():
            results.setdefault(key, {})[size] = in_bytes[key] / t / 1e9

    cols = " | ".join(f"{human(s)} GB/s | % memcpy" for s in args.sizes)
    print(f"plait codec kernels: {C.codec_isa()}, one thread, torch {torch.__version__}, median of {args.repeats}")
    print()
    print(f"| op | codec | {cols} |")
    print("|" + " --- |" * (2 + 2 * len(args.sizes)))
    print("| memcpy (copy_) | - | " + " | ".join(f"{memcpy[s]:.1f} | 100%" for s in args.sizes) + " |")
    for row in ("encode f32", "encode f32 /3", "encode bf16", "decode-acc"):
        for codec in CODECS:
            r = results[(row, codec)]
            cells = " | ".join(f"{r[s]:.1f} | {100 * r[s] / memcpy[s]:.0f}%" for s in args.sizes)
            print(f"| {row} | {codec} | {cells} |")


if __name__ == "__main__":
    main()
