"""Communication mappings for tensor and sequence parallelism.

Each mapping is an autograd function whose backward is the dual collective, so a model written with them gets
the right gradients without any hand-written communication:

==============================  ==============================  ==============================
mapping                         forward                         backward
==============================  ==============================  ==============================
``copy_to_region``              identity                        all-reduce (SUM)
``reduce_from_region``          all-reduce (SUM)                identity
``scatter_to_region``           keep this rank's last-dim chunk all-gather along the last dim
``gather_from_region``          all-gather along the last dim   keep this rank's chunk
``scatter_to_sequence_region``  keep this rank's first-dim chunk all-gather along the first dim
``gather_from_sequence_region`` all-gather along the first dim  reduce-scatter along the first dim
``reduce_scatter_to_sequence``  reduce-scatter, first dim       all-gather along the first dim
``all_to_all``                  all-to-all (scatter a dim,      the inverse all-to-all
                                gather another)
==============================  ==============================  ==============================

Uneven splits follow ``torch.chunk``: rank ``r`` of a group of ``p`` owns ``torch.chunk(range(n), p)[r]``. On plait
the collectives move exactly those sizes (no padding); other backends that require equal sizes (gloo's all-gather)
get a padded all-gather instead, with the same results. A size that ``torch.chunk`` cannot split into ``p``
non-empty chunks (``torch.chunk(range(5), 4)`` gives 3 chunks) raises ``ValueError`` naming the size and group.

``group`` is anything :func:`plait.parallel.resolve_group` accepts (``None`` = world, a process group, a 1-D device
mesh, or ``(mesh, "tp")``). With a group of one rank every mapping is the identity.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from ._groups import resolve_group

__all__ = [
    "chunk_sizes",
    "chunk_range",
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
    "scatter_to_sequence_region",
    "gather_from_sequence_region",
    "reduce_scatter_to_sequence",
    "all_to_all",
]


# Forward-collective replay, used by plait.parallel.recompute.checkpoint: while a checkpointed region runs for the
# first time, the result of every forward collective is recorded; when autograd recomputes the region in backward,
# the collectives return the recorded results instead of communicating again.
_REPLAY = threading.local()


def _forward_collective(name: str, fn, *args):
    cache = getattr(_REPLAY, "cache", None)
    if cache is None:
        return fn(*args)
    return cache.collective(name, fn, args)


def chunk_sizes(n: int, parts: int, what: str = "size") -> list[int]:
    """Sizes of ``torch.chunk(range(n), parts)``; raises when that gives fewer than ``parts`` non-empty chunks."""
    if parts < 1:
        raise ValueError(f"plait.parallel: cannot split {what} {n} over {parts} ranks")
    if n < parts:
        raise ValueError(f"plait.parallel: {what} {n} is smaller than the group size {parts}; every rank needs at "
                         f"least one element")
    c = -(-n // parts)
    sizes = []
    left = n
    while left > 0:
        sizes.append(min(c, left))
        left -= c
    if len(sizes) != parts:
        raise ValueError(
            f"plait.parallel: {what} {n} cannot be split over {parts} ranks the torch.chunk way (torch.chunk gives "
            f"{len(sizes)} chunks of {sizes}); use a size for which torch.chunk(range({n}), {parts}) has {parts} chunks")
    return sizes


def chunk_range(n: int, parts: int, index: int, what: str = "size") -> tuple[int, int]:
    """(start, length) of chunk ``index`` of ``torch.chunk(range(n), parts)``."""
    sizes = chunk_sizes(n, parts, what)
    return sum(sizes[:index]), sizes[index]


def _info(group):
    pg = resolve_group(group)
    return pg, dist.get_world_size(pg), dist.get_rank(pg)


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); older torch has only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _exact_sizes_ok(pg) -> bool:
    try:
        return dist.get_backend(pg) == "plait"
    except Exception:  # pragma: no cover - unusual group objects
        return False


def check_equal_extent(n: int, pg, size: int, rank: int, where: str, hint: str, device=None) -> None:
    """Without a full size, every rank must hold ``n`` positions. plait checks that by itself (every message carries
    its size: ranks that disagree all raise the collective-mismatch error); other backends (gloo pairs unequal
    all-gathers silently) get one tiny all-gather of the extents here."""
    if size == 1 or _exact_sizes_ok(pg):
        return
    t = torch.tensor([n], dtype=torch.int64, device=device)
    allw = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(allw, t, group=pg)
    got = [int(w.item()) for w in allw]
    if any(v != n for v in got):
        raise ValueError(f"{where} on rank {rank}: the ranks hold {got} positions; without {hint} every rank must "
                         f"hold the same number (pass {hint} for torch.chunk splits)")


def _all_gather_dim(x: torch.Tensor, pg, size: int, dim: int, sizes: list[int] | None = None,
                    async_op: bool = False):
    """All-gather ``x`` along ``dim``; ``sizes`` are every rank's extent on ``dim`` (None: all equal to ours)."""
    dim = dim % x.dim()
    if sizes is None:
        sizes = [x.shape[dim]] * size
    xm = x.movedim(dim, 0).contiguous()
    rest = xm.shape[1:]
    even = all(s == sizes[0] for s in sizes)
    if even or _exact_sizes_ok(pg):
        if even:
            out = torch.empty((sum(sizes),) + tuple(rest), dtype=x.dtype, device=x.device)
            work = _all_gather_single(out, xm, group=pg, async_op=async_op)

            def finish():
                return out.movedim(0, dim)
        else:
            outs = [torch.empty((s,) + tuple(rest), dtype=x.dtype, device=x.device) for s in sizes]
            work = dist.all_gather(outs, xm, group=pg, async_op=async_op)

            def finish():
                return torch.cat(outs, 0).movedim(0, dim)
    else:  # backends that need equal sizes: pad to the largest, gather, trim
        m = max(sizes)
        pad = torch.zeros((m,) + tuple(rest), dtype=x.dtype, device=x.device)
        pad[: xm.shape[0]] = xm
        out = torch.empty((m * size,) + tuple(rest), dtype=x.dtype, device=x.device)
        work = _all_gather_single(out, pad, group=pg, async_op=async_op)

        def finish():
            return torch.cat([out[i * m: i * m + s] for i, s in enumerate(sizes)], 0).movedim(0, dim)
    if async_op:
        return work, finish
    return finish()


def _reduce_scatter_dim0(x: torch.Tensor, pg, size: int, rank: int, sizes: list[int], async_op: bool = False):
    """Reduce-scatter ``x`` (first dim split as ``sizes``) with SUM; returns this rank's chunk."""
    x = x.contiguous()
    out = torch.empty((sizes[rank],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if all(s == sizes[0] for s in sizes):
        work = _reduce_scatter_single(out, x, group=pg, async_op=async_op)
    else:
        work = dist.reduce_scatter(out, list(torch.split(x, sizes, 0)), group=pg, async_op=async_op)
    if async_op:
        return work, (lambda: out)
    return out


def _local_chunk(x: torch.Tensor, size: int, rank: int, dim: int, what: str) -> torch.Tensor:
    start, n = chunk_range(x.shape[dim], size, rank, what)
    return x.narrow(dim, start, n).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        ctx.pg = pg
        return x.clone()  # not a view, so the caller may modify the result in place

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.pg)
        return g, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg):
        def run(x):
            y = x.contiguous().clone()
            dist.all_reduce(y, group=pg)
            return y
        return _forward_collective("all_reduce", run, x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, size, rank, sizes=None):
        ctx.pg, ctx.size = pg, size
        ctx.sizes = sizes if sizes is not None else chunk_sizes(x.shape[-1], size, "last dimension")
        if sum(ctx.sizes) != x.shape[-1]:
            raise ValueError(f"plait.parallel: rank {rank}: the last dimension is {x.shape[-1]}, the split "
                             f"{ctx.sizes} covers {sum(ctx.sizes)}")
        return x.narrow(-1, sum(ctx.sizes[:rank]), ctx.sizes[rank]).contiguous()

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.pg, ctx.size, -1, ctx.sizes), None, None, None, None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, size, rank, sizes):
        ctx.size, ctx.rank, ctx.sizes = size, rank, sizes
        return _forward_collective("all_gather(last dim)", lambda t: _all_gather_dim(t, pg, size, -1, sizes), x)

    @staticmethod
    def backward(ctx, g):
        start = sum(ctx.sizes[: ctx.rank])
        return g.narrow(-1, start, ctx.sizes[ctx.rank]).contiguous(), None, None, None, None


class _ScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, size, rank):
        ctx.pg, ctx.size = pg, size
        ctx.sizes = chunk_sizes(x.shape[0], size, "first (sequence) dimension")
        return _local_chunk(x, size, rank, 0, "first (sequence) dimension")

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.pg, ctx.size, 0, ctx.sizes), None, None, None


class _GatherFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, size, rank, sizes, grad_reduce):
        ctx.pg, ctx.size, ctx.rank, ctx.sizes, ctx.grad_reduce = pg, size, rank, sizes, grad_reduce
        return _forward_collective("all_gather(first dim)", lambda t: _all_gather_dim(t, pg, size, 0, sizes), x)

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_reduce:
            return _reduce_scatter_dim0(g, ctx.pg, ctx.size, ctx.rank, ctx.sizes), None, None, None, None, None
        start = sum(ctx.sizes[: ctx.rank])
        return g.narrow(0, start, ctx.sizes[ctx.rank]).contiguous(), None, None, None, None, None


class _ReduceScatterFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, size, rank):
        sizes = chunk_sizes(x.shape[0], size, "first (sequence) dimension")
        ctx.pg, ctx.size, ctx.sizes = pg, size, sizes
        return _forward_collective("reduce_scatter(first dim)",
                                   lambda t: _reduce_scatter_dim0(t, pg, size, rank, sizes), x)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.pg, ctx.size, 0, ctx.sizes), None, None, None


def _all_to_all_impl(x, pg, size, rank, scatter_dim, gather_dim, recv_g):
    """Split ``x`` along ``scatter_dim`` (torch.chunk sizes, the same extent on every rank), send chunk j to rank j,
    concatenate what arrives along ``gather_dim``; ``recv_g[j]`` is rank j's extent on ``gather_dim``."""
    nd = x.dim()
    sd, gd = scatter_dim % nd, gather_dim % nd
    send = chunk_sizes(x.shape[sd], size, f"all_to_all scatter dimension {sd} of size")
    if x.shape[gd] != recv_g[rank]:
        raise ValueError(f"plait.parallel.all_to_all: rank {rank} holds {x.shape[gd]} of gather dimension {gd}, "
                         f"expected {recv_g[rank]} (gather sizes {recv_g})")
    xs = x.movedim(sd, 0).contiguous()  # each peer's piece is one contiguous slab
    inner = list(xs.shape[1:])
    gpos = gd - 1 if gd > sd else gd  # the gather dim's index within inner
    row = 1
    for i, s in enumerate(inner):
        if i != gpos:
            row *= s
    in_split = [send[j] * row * x.shape[gd] for j in range(size)]
    out_split = [send[rank] * row * recv_g[j] for j in range(size)]
    out = torch.empty(sum(out_split), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, xs.reshape(-1), out_split, in_split, group=pg)
    pieces, off = [], 0
    for j in range(size):
        shp = [send[rank]] + inner
        shp[1 + gpos] = recv_g[j]
        pieces.append(out[off: off + out_split[j]].view(shp))
        off += out_split[j]
    return torch.cat(pieces, 1 + gpos).movedim(0, sd), send


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, size, rank, scatter_dim, gather_dim, recv_g):
        y, send = _forward_collective(
            "all_to_all", lambda t: _all_to_all_impl(t, pg, size, rank, scatter_dim, gather_dim, recv_g), x)
        ctx.pg, ctx.size, ctx.rank, ctx.sd, ctx.gd, ctx.send = pg, size, rank, scatter_dim, gather_dim, send
        return y

    @staticmethod
    def backward(ctx, g):
        # The inverse: scatter along the old gather dim (its torch.chunk sizes are the ranks' original extents),
        # gather along the old scatter dim (rank j sends back what it received from us: extent send[j]).
        gx, _ = _all_to_all_impl(g, ctx.pg, ctx.size, ctx.rank, ctx.gd, ctx.sd, ctx.send)
        return gx, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public functions


def copy_to_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient in backward (enter a tensor-parallel region)."""
    pg, size, _ = _info(group)
    return x if size == 1 else _CopyToRegion.apply(x, pg)


def reduce_from_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce (SUM) forward; identity backward (leave a tensor-parallel region, e.g. after a row-parallel GEMM)."""
    pg, size, _ = _info(group)
    return x if size == 1 else _ReduceFromRegion.apply(x, pg)


def scatter_to_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Keep this rank's ``torch.chunk`` of the last dimension; backward all-gathers the gradient."""
    pg, size, rank = _info(group)
    return x if size == 1 else _ScatterLast.apply(x, pg, size, rank)


def gather_from_region(x: torch.Tensor, group=None, full_size: int | None = None) -> torch.Tensor:
    """All-gather along the last dimension (the local chunks are ``torch.chunk`` pieces of ``full_size``; default:
    every rank holds as many as this one). Backward keeps this rank's chunk of the gradient."""
    pg, size, rank = _info(group)
    if size == 1:
        return x
    if full_size is None:
        check_equal_extent(x.shape[-1], pg, size, rank, "plait.parallel.gather_from_region", "full_size", x.device)
    sizes = chunk_sizes(full_size, size, "last dimension") if full_size is not None else [x.shape[-1]] * size
    if x.shape[-1] != sizes[rank]:
        raise ValueError(f"plait.parallel.gather_from_region: rank {rank} holds {x.shape[-1]} of the last "
                         f"dimension, but the torch.chunk split of {full_size} over {size} gives it {sizes[rank]}")
    return _GatherLast.apply(x, pg, size, rank, sizes)


def scatter_to_sequence_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Keep this rank's ``torch.chunk`` of the first (sequence) dimension; backward all-gathers along it."""
    pg, size, rank = _info(group)
    return x if size == 1 else _ScatterFirst.apply(x, pg, size, rank)


def gather_from_sequence_region(x: torch.Tensor, group=None, full_size: int | None = None,
                                grad_reduce: bool = True) -> torch.Tensor:
    """All-gather along the first (sequence) dimension. Backward reduce-scatters the gradient (``grad_reduce``,
    the sequence-parallel case: every rank's tensor-parallel branch contributed a partial gradient) or just keeps
    this rank's chunk."""
    pg, size, rank = _info(group)
    if size == 1:
        return x
    if full_size is None:
        check_equal_extent(x.shape[0], pg, size, rank, "plait.parallel.gather_from_sequence_region", "full_size",
                           x.device)
    sizes = chunk_sizes(full_size, size, "first (sequence) dimension") if full_size is not None else [x.shape[0]] * size
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"plait.parallel.gather_from_sequence_region: rank {rank} holds {x.shape[0]} of the first "
                         f"dimension, but the torch.chunk split of {full_size} over {size} gives it {sizes[rank]}")
    return _GatherFirst.apply(x, pg, size, rank, sizes, grad_reduce)


def reduce_scatter_to_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """Reduce-scatter (SUM) along the first dimension (``torch.chunk`` sizes); backward all-gathers."""
    pg, size, rank = _info(group)
    return x if size == 1 else _ReduceScatterFirst.apply(x, pg, size, rank)


def all_to_all(x: torch.Tensor, group=None, scatter_dim: int = -1, gather_dim: int = 0,
               gather_full_size: int | None = None) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` into ``torch.chunk`` pieces, send piece ``j`` to rank ``j``, and
    concatenate the pieces received along ``gather_dim`` in rank order. Every rank must hold the same extent on
    ``scatter_dim``; on ``gather_dim`` every rank holds the same extent, or, with ``gather_full_size``, its
    ``torch.chunk`` share of that size (uneven sequence shards). Backward is the inverse all-to-all. Used, e.g.,
    to switch attention between sequence-sharded and head-sharded layouts (Ulysses style)."""
    pg, size, rank = _info(group)
    if size == 1:
        return x
    if scatter_dim % x.dim() == gather_dim % x.dim():
        raise ValueError("plait.parallel.all_to_all: scatter_dim and gather_dim must differ")
    if gather_full_size is None:
        check_equal_extent(x.shape[gather_dim], pg, size, rank, "plait.parallel.all_to_all", "gather_full_size",
                           x.device)
        recv_g = [x.shape[gather_dim]] * size
    else:
        recv_g = chunk_sizes(gather_full_size, size, f"all_to_all gather dimension {gather_dim % x.dim()} of size")
    return _AllToAll.apply(x, pg, size, rank, scatter_dim, gather_dim, recv_g)
