"""plait-bench (python -m plait.bench): size parsing, the table, JSON/CSV/PNG outputs, the exit status."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from plait.bench.sizes import human, parse_size, size_range

pytestmark = pytest.mark.timeout(120)

COLUMNS = ["bytes", "count", "type", "redop", "backend", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong", "ratio"]


def run_bench(*argv, env=None, timeout=100):
    e = dict(os.environ)
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "plait.bench", *argv], capture_output=True, text=True,
                          timeout=timeout, env=e)


def parse_tables(stdout):
    """{op: [row dict, ...]} from the stdout tables (header line '#  bytes count ...', rows of plain fields)."""
    tables, op, header = {}, None, None
    for line in stdout.splitlines():
        if line.startswith("# plait-bench "):
            op = line.split()[2].rstrip(":")
            tables[op] = []
        elif line.startswith("#") and "bytes" in line and "busbw" in line:
            header = line.lstrip("#").split()
        elif line.strip() and not line.startswith("#") and op is not None and header:
            cells = line.split()
            assert len(cells) == len(header), line
            tables[op].append(dict(zip(header, cells)))
    return tables


# -------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("text,want", [("8", 8), ("64K", 65536), ("4M", 4 << 20), ("1G", 1 << 30), ("4MB", 4 << 20),
                                       ("4MiB", 4 << 20), ("1k", 1024), (" 512 ", 512), ("0.5K", 512)])
def test_parse_size(text, want):
    assert parse_size(text) == want


def test_size_range_like_nccl_tests():
    assert size_range("8", "128", 2) == [8, 16, 32, 64, 128]
    assert size_range("8", "256M", 4)[:3] == [8, 32, 128]
    assert size_range("8", "256M", 4)[-1] == 128 << 20  # never above -e
    assert size_range("1K", "1K", 2) == [1024]
    assert size_range("64K", "4M", 4) == [64 << 10, 256 << 10, 1 << 20, 4 << 20]
    assert size_range("8", "32", 2, stepbytes=8) == [8, 16, 24, 32]
    with pytest.raises(ValueError):
        size_range("1M", "1K", 2)
    assert human(64 << 10) == "64 KiB" and human(12) == "12 B"


def test_bench_sizes_reexport():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    try:
        import _sizes
    finally:
        sys.path.pop(0)
    assert _sizes.parse_size is parse_size


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_tables_json_csv_plot(tmp_path):
    js, cs, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    ops = "all_reduce,all_gather,reduce_scatter,broadcast,reduce,all_to_all,sendrecv"
    r = run_bench("--op", ops, "-b", "8", "-e", "4K", "-f", "8", "-n", "3", "-w", "1", "--backend", "plait,gloo",
                  "--nproc", "2", "--json", str(js), "--csv", str(cs), "--plot", str(png))
    assert r.returncode == 0, r.stdout + r.stderr
    tables = parse_tables(r.stdout)
    assert list(tables) == ops.split(",")
    for op, rows in tables.items():
        assert rows, op
        assert set(COLUMNS) <= set(rows[0]), rows[0]
        assert {row["backend"] for row in rows} == {"plait", "gloo"}
        for row in rows:
            assert row["#wrong"] == "0", (op, row)
            assert float(row["time(us)"]) > 0
            assert row["type"] == "float32"
        assert sorted({int(row["bytes"]) for row in rows}) == [8, 64, 512, 4096]
        assert all(row["ratio"] == "1.00" for row in rows if row["backend"] == "plait")

    doc = json.loads(js.read_text())
    for key in ("host", "torch_version", "plait_version", "world_size", "date", "dtype", "redop", "device", "argv"):
        assert key in doc["meta"], key
    assert doc["meta"]["world_size"] == 2 and doc["meta"]["dtype"] == "float32"
    res = doc["results"]
    assert len(res) == 7 * 4 * 2
    for row in res:
        for key in ("op", "backend", "algo", "bytes", "count", "dtype", "time_us", "algbw", "busbw", "wrong"):
            assert key in row, key
        assert row["wrong"] == 0
        if row["op"] == "all_reduce":
            assert row["busbw"] == pytest.approx(row["algbw"] * 2 * (2 - 1) / 2)
        if row["op"] in ("broadcast", "reduce", "sendrecv"):
            assert row["busbw"] == pytest.approx(row["algbw"])

    with open(cs, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res)
    assert {"op", "backend", "bytes", "time_us", "busbw", "wrong"} <= set(rows[0])

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_algos_dtype_redop():
    r = run_bench("--op", "all_reduce", "--op", "reduce_scatter", "-b", "1K", "-e", "1K", "-n", "2", "-w", "0",
                  "-c", "2", "-d", "bfloat16", "-o", "max", "--backend", "plait", "--algo", "ring,tree,direct")
    assert r.returncode == 0, r.stdout + r.stderr
    tables = parse_tables(r.stdout)
    for op in ("all_reduce", "reduce_scatter"):
        rows = tables[op]
        assert [row["backend"] for row in rows] == ["plait[ring]", "plait[tree]", "plait[direct]"]
        assert all(row["type"] == "bfloat16" and row["redop"] == "max" and row["#wrong"] == "0" for row in rows)


@pytest.mark.parametrize("how", ["env", "flag"])
def test_cli_corruption_fails(how):
    argv = ["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "--backend", "plait,gloo"]
    env = None
    if how == "env":
        env = {"PLAIT_BENCH_CORRUPT": "1"}
    else:
        argv.append("--_corrupt")
    r = run_bench(*argv, env=env)
    assert r.returncode != 0, r.stdout + r.stderr
    rows = parse_tables(r.stdout)["all_reduce"]
    assert sum(int(row["#wrong"]) for row in rows) > 0


def test_cli_bad_arguments():
    r = run_bench("--op", "all_shuffle")
    assert r.returncode == 2 and "all_shuffle" in r.stderr
    r = run_bench("-b", "1M", "-e", "1K")
    assert r.returncode == 2
