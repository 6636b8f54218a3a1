"""Helpers shared by the benchmark scripts: nccl-tests style sizes and number formatting."""

DEFAULT_SIZES = "4,1K,64K,1M,16M,64M,256M"


def parse_size(s):
    """'8' -> 8, '64K' -> 65536, '4M' / '4MiB' / '4MB' -> 4 MiB, '1G' -> 1 GiB (powers of two)."""
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def human(nbytes):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def fmt_bw(v):
    return f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"
