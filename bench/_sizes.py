"""Helpers shared by the benchmark scripts: re-exported from plait.bench.sizes (one copy of the code)."""
from plait.bench.sizes import DEFAULT_SIZES, fmt_bw, human, parse_size  # noqa: F401
