"""Deterministic inputs, references and checks for collective tests (runs inside the worker processes).

Every rank can regenerate every other rank's input from (seed, rank), so each rank computes the exact expected
result of a collective locally with torch, without any extra communication. Inputs are integer-valued and small
enough that SUM / PRODUCT / AVG / PREMUL_SUM are exact in every dtype (bf16 represents integers exactly only up
to 256, int8 up to 127):

  SUM, AVG, PREMUL_SUM: signed and float in [-8, 8), unsigned in [0, 16)  -> |sum| <= 64 at 8 ranks, x2 premul
  PRODUCT:              values in {1, 2, -1} (-1 only for signed / float), mostly 1; integer products that do
                        overflow wrap identically in any order (multiplication mod 2^k is associative)
  MIN, MAX:             signed/float in [-100, 100], unsigned in [0, 200], bool in {0, 1}

Failures are collected (not raised) so that one wrong result does not desynchronise the ranks; the worker
returns the list and the test fails with all of them.

Every check_* helper takes ``device`` (default "cpu"): the tensors passed to the collectives are created there
(e.g. "cuda" in tests/test_gpu.py), while inputs are generated and references computed on the CPU as always;
``Checker.equal`` copies a device result to the CPU before comparing it.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

import _harness as H

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + [torch.bool]

OP_NAMES = ["SUM", "AVG", "PRODUCT", "MIN", "MAX", "PREMUL_SUM"]
PREMUL_FACTOR = 2.0


def dt_name(dt) -> str:
    return str(dt).replace("torch.", "")


def ops_for(dtype, backend_is_plait: bool = H.IS_PLAIT) -> list[str]:
    """Reduction ops that are meaningful (and specified) for dtype."""
    if dtype == torch.bool:
        return ["MIN", "MAX"]
    ops = ["SUM", "PRODUCT", "MIN", "MAX"]
    if dtype.is_floating_point:
        ops.append("AVG")  # gloo supports AVG on floating types too
        if backend_is_plait:
            ops.append("PREMUL_SUM")
    elif backend_is_plait:
        ops.append("AVG")  # integer AVG truncates (plait only; gloo rejects it)
    return ops


def make_op(name: str):
    if name == "PREMUL_SUM":
        return dist._make_nccl_premul_sum(PREMUL_FACTOR)
    return getattr(dist.ReduceOp, name)


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def gen(kind: str, dtype, count: int, rank: int, salt=()) -> torch.Tensor:
    """Deterministic integer-valued input of `count` elements for `rank` (kind = op name or "data")."""
    g = torch.Generator().manual_seed(_seed(kind, dt_name(dtype), count, rank, salt))
    signed = dtype.is_floating_point or dtype.is_signed
    if dtype == torch.bool:
        v = torch.randint(0, 2, (count,), generator=g)
    elif kind == "PRODUCT":
        r = torch.randint(0, 10, (count,), generator=g)
        v = torch.ones(count, dtype=torch.int64)
        v[r == 0] = 2
        if signed:
            v[r == 1] = -1
    elif kind in ("MIN", "MAX", "data"):
        v = torch.randint(-100, 100, (count,), generator=g) if signed else torch.randint(0, 200, (count,), generator=g)
    else:  # SUM, AVG, PREMUL_SUM
        v = torch.randint(-8, 8, (count,), generator=g) if signed else torch.randint(0, 16, (count,), generator=g)
    return v.to(dtype)


def on(t: torch.Tensor, device) -> torch.Tensor:
    """`t` (a CPU tensor) as the tensor handed to a collective on `device`: itself on the CPU, a copy elsewhere."""
    return t if device == "cpu" else t.to(device)


def reference(op: str, inputs: list[torch.Tensor], dtype) -> torch.Tensor:
    """Exact reduction of `inputs` (all ranks' tensors, same shape) as `dtype`."""
    n = len(inputs)
    if dtype.is_floating_point:
        x = torch.stack([t.to(torch.float64) for t in inputs])
    else:
        x = torch.stack([t.to(torch.int64) for t in inputs])
    if op == "SUM":
        r = x.sum(0)
    elif op == "PRODUCT":
        r = x.prod(0)
    elif op == "MIN":
        r = x.min(0).values if x.numel() else x.sum(0)
    elif op == "MAX":
        r = x.max(0).values if x.numel() else x.sum(0)
    elif op == "AVG":
        s = x.sum(0)
        r = s / n if dtype.is_floating_point else torch.div(s, n, rounding_mode="trunc")
    elif op == "PREMUL_SUM":
        r = (x * PREMUL_FACTOR).sum(0)
    else:
        raise ValueError(op)
    if dtype == torch.bool:
        return r != 0
    return r.to(dtype)


class Checker:
    def __init__(self, label: str = ""):
        self.failures: list[str] = []
        self.checks = 0
        self.label = label

    def fail(self, msg: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(f"[rank {H.CTX.rank if H.CTX else '?'}] {self.label}{msg}")

    def equal(self, what: str, actual: torch.Tensor, expected: torch.Tensor, approx: bool = False) -> bool:
        self.checks += 1
        if actual.device != expected.device:
            actual = actual.to(expected.device)  # a device result vs the CPU reference (a stream-ordered copy)
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            self.fail(f"{what}: got dtype/shape {actual.dtype}/{tuple(actual.shape)}, "
                      f"expected {expected.dtype}/{tuple(expected.shape)}")
            return False
        if approx:
            try:
                torch.testing.assert_close(actual, expected)
                return True
            except AssertionError as e:
                self.fail(f"{what}: not close: {str(e)[:300]}")
                return False
        if torch.equal(actual, expected):
            return True
        a = actual.reshape(-1)
        e = expected.reshape(-1)
        bad = (a != e).nonzero().reshape(-1)
        i = int(bad[0])
        self.fail(
            f"{what}: {bad.numel()} of {a.numel()} elements differ; first at [{i}]: got {a[i].item()}, "
            f"expected {e[i].item()}; got[:8]={a[:8].tolist()} expected[:8]={e[:8].tolist()}"
        )
        return False


def approx_for(op: str, dtype) -> bool:
    # Float AVG: sum/n may be computed as sum*(1/n) or in a wider type: allow dtype-level rounding.
    return op == "AVG" and dtype.is_floating_point


def split_sizes(count: int, ws: int, src: int) -> list[int]:
    """Uneven all_to_all split sizes: how many elements rank `src` sends to each rank (zeros included)."""
    if count == 0:
        return [0] * ws
    return [((src + 1) * (j + 2) * 7 + count) % (count + 3) for j in range(ws)]


# ----------------------------------------------------------------------------------------------------------------
# collective checks. `g` spans all ranks of the world (group rank == global rank) unless noted.


def check_all_reduce(c: Checker, g, rank, ws, dtypes, counts, async_batch: bool = True, device="cpu"):
    for dt in dtypes:
        for op in ops_for(dt):
            pending = []
            for n in counts:
                t = on(gen(op, dt, n, rank), device)
                if async_batch:
                    w = dist.all_reduce(t, op=make_op(op), group=g, async_op=True)
                    pending.append((n, t, w))
                else:
                    dist.all_reduce(t, op=make_op(op), group=g)
                    pending.append((n, t, None))
            for n, t, w in pending:
                if w is not None:
                    w.wait()
                exp = reference(op, [gen(op, dt, n, r) for r in range(ws)], dt)
                c.equal(f"all_reduce {dt_name(dt)} n={n} op={op}", t, exp, approx_for(op, dt))


def check_all_reduce_coalesced(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    if not hasattr(dist, "all_reduce_coalesced"):
        c.fail(f"torch.distributed {torch.__version__} has no all_reduce_coalesced: nothing was checked")
        return
    for dt in dtypes:
        for op in ["SUM", "MAX"] if dt != torch.bool else ["MAX"]:
            ts = [on(gen(op, dt, n, rank, salt=("coal", i)), device) for i, n in enumerate(counts)]
            dist.all_reduce_coalesced(ts, op=make_op(op), group=g)
            for i, (n, t) in enumerate(zip(counts, ts)):
                exp = reference(op, [gen(op, dt, n, r, salt=("coal", i)) for r in range(ws)], dt)
                c.equal(f"all_reduce_coalesced {dt_name(dt)} counts={counts} [{i}] op={op}", t, exp)


def check_broadcast(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    i = 0
    for dt in dtypes:
        for n in counts:
            root = i % ws
            i += 1
            t = on(gen("data", dt, n, rank), device)
            dist.broadcast(t, src=root, group=g)
            c.equal(f"broadcast {dt_name(dt)} n={n} root={root}", t, gen("data", dt, n, root))


def check_reduce(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    i = 0
    for dt in dtypes:
        for op in ops_for(dt):
            for n in counts:
                dst = (i * 3 + 1) % ws
                i += 1
                t = on(gen(op, dt, n, rank, salt="reduce"), device)
                dist.reduce(t, dst=dst, op=make_op(op), group=g)
                if rank == dst:
                    exp = reference(op, [gen(op, dt, n, r, salt="reduce") for r in range(ws)], dt)
                    c.equal(f"reduce {dt_name(dt)} n={n} op={op} dst={dst}", t, exp, approx_for(op, dt))


def check_all_gather(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    for dt in dtypes:
        for n in counts:
            t = on(gen("data", dt, n, rank, salt="ag"), device)
            outs = [torch.full((n,), 7, dtype=dt, device=device) for _ in range(ws)]
            dist.all_gather(outs, t, group=g)
            for r in range(ws):
                c.equal(f"all_gather {dt_name(dt)} n={n} [from {r}]", outs[r], gen("data", dt, n, r, salt="ag"))
            out = torch.full((ws * n,), 7, dtype=dt, device=device)
            dist.all_gather_into_tensor(out, t, group=g)
            exp = torch.cat([gen("data", dt, n, r, salt="ag") for r in range(ws)])
            c.equal(f"all_gather_into_tensor {dt_name(dt)} n={n}", out, exp)


def check_reduce_scatter(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    for dt in dtypes:
        for op in ops_for(dt):
            for n in counts:
                full = [gen(op, dt, n * ws, r, salt="rs") for r in range(ws)]
                exp_full = reference(op, full, dt)
                exp = exp_full[rank * n:(rank + 1) * n]
                out = torch.full((n,), 3, dtype=dt, device=device)
                dist.reduce_scatter_tensor(out, on(full[rank].clone(), device), op=make_op(op), group=g)
                c.equal(f"reduce_scatter_tensor {dt_name(dt)} n={n} op={op}", out, exp, approx_for(op, dt))
                out2 = torch.full((n,), 3, dtype=dt, device=device)
                dist.reduce_scatter(out2, list(on(full[rank].clone(), device).split(n)) if n else
                                    [torch.empty(0, dtype=dt, device=device) for _ in range(ws)], op=make_op(op),
                                    group=g)
                c.equal(f"reduce_scatter(list) {dt_name(dt)} n={n} op={op}", out2, exp, approx_for(op, dt))


def check_all_to_all(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    for dt in dtypes:
        for n in counts:
            # all_to_all_single, uneven splits
            in_splits = split_sizes(n, ws, rank)
            out_splits = [split_sizes(n, ws, src)[rank] for src in range(ws)]
            inp = on(gen("data", dt, sum(in_splits), rank, salt=("a2a", n)), device)
            out = torch.full((sum(out_splits),), 5, dtype=dt, device=device)
            dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=g)
            exp_parts = []
            for src in range(ws):
                s = split_sizes(n, ws, src)
                src_in = gen("data", dt, sum(s), src, salt=("a2a", n))
                off = sum(s[:rank])
                exp_parts.append(src_in[off:off + s[rank]])
            c.equal(f"all_to_all_single(uneven) {dt_name(dt)} n={n} splits={in_splits}", out, torch.cat(exp_parts))
            # all_to_all_single, even
            inp = on(gen("data", dt, n * ws, rank, salt=("a2a_even",)), device)
            out = torch.full((n * ws,), 5, dtype=dt, device=device)
            dist.all_to_all_single(out, inp, group=g)
            exp = torch.cat([gen("data", dt, n * ws, src, salt=("a2a_even",))[rank * n:(rank + 1) * n]
                             for src in range(ws)])
            c.equal(f"all_to_all_single(even) {dt_name(dt)} n={n}", out, exp)
            # all_to_all with lists of (even) tensors; uneven lists are covered in test_api
            ins = list(on(gen("data", dt, n * ws, rank, salt=("a2a_even",)), device).split(n)) if n else \
                [torch.empty(0, dtype=dt, device=device) for _ in range(ws)]
            outs = [torch.full((n,), 5, dtype=dt, device=device) for _ in range(ws)]
            dist.all_to_all(outs, [t.clone() for t in ins], group=g)
            for src in range(ws):
                c.equal(f"all_to_all(list) {dt_name(dt)} n={n} [from {src}]", outs[src],
                        gen("data", dt, n * ws, src, salt=("a2a_even",))[rank * n:(rank + 1) * n])


def check_gather_scatter(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    i = 0
    for dt in dtypes:
        for n in counts:
            root = (i * 2 + ws - 1) % ws
            i += 1
            t = on(gen("data", dt, n, rank, salt="gather"), device)
            gl = [torch.full((n,), 9, dtype=dt, device=device) for _ in range(ws)] if rank == root else None
            dist.gather(t, gather_list=gl, dst=root, group=g)
            if rank == root:
                for r in range(ws):
                    c.equal(f"gather {dt_name(dt)} n={n} dst={root} [from {r}]", gl[r],
                            gen("data", dt, n, r, salt="gather"))
            out = torch.full((n,), 9, dtype=dt, device=device)
            sl = [on(gen("data", dt, n, r, salt=("scatter", root)), device) for r in range(ws)] \
                if rank == root else None
            dist.scatter(out, scatter_list=sl, src=root, group=g)
            c.equal(f"scatter {dt_name(dt)} n={n} src={root}", out, gen("data", dt, n, rank, salt=("scatter", root)))


def check_random_float_consistency(c: Checker, g, vgroup, rank, ws, counts, device="cpu"):
    """all_reduce of random (non-integer) data: every rank must hold bitwise the same result (compared on the CPU
    over `vgroup`, a gloo group)."""
    for dt in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
        for op in ["SUM", "AVG"] + (["PREMUL_SUM"] if H.IS_PLAIT else []):
            for n in counts:
                gen_ = torch.Generator().manual_seed(_seed("randn", dt_name(dt), n, rank, op))
                x = torch.randn(n, generator=gen_, dtype=torch.float32).to(dt)
                t = on(x.clone(), device)
                dist.all_reduce(t, op=make_op(op), group=g)
                if device != "cpu":
                    t = t.cpu()
                outs = [torch.empty_like(t) for _ in range(ws)]
                dist.all_gather(outs, t, group=vgroup)  # verification over gloo
                for r in range(1, ws):
                    c.checks += 1
                    if not torch.equal(outs[r].view(-1), outs[0].view(-1)) and not (
                        torch.equal(outs[r].isnan(), outs[0].isnan())
                        and torch.equal(outs[r][~outs[r].isnan()], outs[0][~outs[0].isnan()])
                    ):
                        diff = (outs[r] != outs[0]).nonzero().reshape(-1)
                        c.fail(f"random all_reduce {dt_name(dt)} n={n} op={op}: rank {r} result differs bitwise from "
                               f"rank 0 at {diff.numel()} elements (first [{int(diff[0])}])")
                        break
                # and close to the float64 reference
                xs = []
                for r in range(ws):
                    gr = torch.Generator().manual_seed(_seed("randn", dt_name(dt), n, r, op))
                    xs.append(torch.randn(n, generator=gr, dtype=torch.float32).to(dt).to(torch.float64))
                s = torch.stack(xs).sum(0)
                if op == "AVG":
                    s = s / ws
                elif op == "PREMUL_SUM":
                    s = s * PREMUL_FACTOR
                tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}[dt]
                c.checks += 1
                if n and not torch.allclose(t.to(torch.float64), s, rtol=tol, atol=tol * ws * 2):
                    err = (t.to(torch.float64) - s).abs().max().item()
                    c.fail(f"random all_reduce {dt_name(dt)} n={n} op={op}: max abs error {err} vs float64 reference")


def check_other_collectives(c: Checker, g, rank, ws, dtypes, counts, device="cpu"):
    """Every collective except all_reduce: broadcast, reduce, all_gather, reduce_scatter, all_to_all, gather/scatter."""
    check_broadcast(c, g, rank, ws, dtypes, counts, device=device)
    check_reduce(c, g, rank, ws, dtypes, counts, device=device)
    check_all_gather(c, g, rank, ws, dtypes, counts, device=device)
    check_reduce_scatter(c, g, rank, ws, dtypes, [0, 1, 7, 251], device=device)
    check_all_to_all(c, g, rank, ws, dtypes, counts, device=device)
    check_gather_scatter(c, g, rank, ws, dtypes, counts, device=device)
