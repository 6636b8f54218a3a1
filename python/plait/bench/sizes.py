"""Message sizes and number formatting, nccl-tests style. Pure Python: imports no torch."""

DEFAULT_SIZES = "4,1K,64K,1M,16M,64M,256M"

_MULT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(s):
    """'8' -> 8, '64K' -> 65536, '4M' / '4MiB' / '4MB' -> 4 MiB, '1G' -> 1 GiB (powers of two)."""
    s = str(s).strip().upper().removesuffix("B").removesuffix("I")
    if not s:
        raise ValueError("empty size")
    if s[-1] in _MULT:
        return int(float(s[:-1]) * _MULT[s[-1]])
    return int(s)


def size_range(minbytes, maxbytes, stepfactor=2, stepbytes=0):
    """The sizes nccl-tests sweeps: minbytes, then times stepfactor (or plus stepbytes), up to maxbytes.

    Both ends are inclusive when the steps land on maxbytes; a size never exceeds maxbytes.
    """
    lo, hi = parse_size(minbytes), parse_size(maxbytes)
    if lo <= 0 or hi < lo:
        raise ValueError(f"bad size range {minbytes}..{maxbytes}")
    if stepbytes <= 0 and stepfactor <= 1:
        raise ValueError("stepfactor must be > 1")
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n = n + stepbytes if stepbytes > 0 else n * stepfactor
    return out


def human(nbytes):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def fmt_bw(v):
    return f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"
