"""Tensor-parallel layers (Megatron layouts, explicit groups, CPU and CUDA tensors).

Layouts (``p`` = group size, ``r`` = this rank's index in the group, chunks follow ``torch.chunk``):

- ``ColumnParallelLinear(in, out)``: holds rows ``torch.chunk(range(out), p)[r]`` of the full ``[out, in]`` weight and
  the matching bias entries. Input: the full input (replicated), or with ``sequence_parallel`` this rank's chunk of
  the first (sequence) dimension, which the layer all-gathers. Output: this rank's chunk of the last dimension, or
  the full output with ``gather_output``.
- ``RowParallelLinear(in, out)``: holds columns ``torch.chunk(range(in), p)[r]`` of the full weight and the full bias.
  Input: this rank's chunk of the last dimension (``input_is_parallel``), or the full input which it scatters. The
  partial products are all-reduced (or, with ``sequence_parallel``, reduce-scattered along the first dimension) and
  the bias is added once, after the reduction.
- ``VocabParallelEmbedding(num, dim)``: holds rows ``torch.chunk(range(num), p)[r]`` of the table; the looked-up
  vectors are all-reduced (each id is found on exactly one rank).
- ``vocab_parallel_cross_entropy(logits_shard, target)``: cross-entropy over logits sharded on the last dimension as a
  ``ColumnParallelLinear`` output (without ``gather_output``) leaves them; two all-reduces, no gathering.

``shard_unit`` (keyword only, default 1): shard in units of that many rows / columns (``torch.chunk`` over
``features // shard_unit`` units), e.g. whole attention heads.

Initialisation: the full weight is built exactly as the dense ``nn.Linear`` / ``nn.Embedding`` would build it (same
RNG draws) and then sliced, so a sharded layer created after ``torch.manual_seed(s)`` holds a slice of the dense layer
created after the same seed. ``from_dense(module, group)`` shards an existing module; ``to_dense()`` gathers the full
module back (on every rank of the group).

Overlap: in backward, the input gradient's all-reduce (column-parallel) or reduce-scatter (sequence parallel) is
started asynchronously and runs while the weight gradient is computed, on CPU and CUDA alike.

With ``sequence_parallel``, parameters that every rank of the group applies to its own sequence chunk (the row layer's
bias) get their gradient summed over the group in backward, so the group's copies stay identical without any extra
step by the caller.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ._groups import resolve_group
from . import mappings as M

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy"]


def _shard_sizes(features: int, size: int, unit: int, layer: str, what: str, rank: int) -> list[int]:
    if unit < 1 or features % unit:
        raise ValueError(f"{layer}: {what} {features} is not a multiple of shard_unit {unit} (rank {rank})")
    try:
        return [s * unit for s in M.chunk_sizes(features // unit, size, f"{what} // shard_unit" if unit > 1 else what)]
    except ValueError as e:
        raise ValueError(f"{layer} on rank {rank} of a group of {size}: {e}") from None


class _LinearFn(torch.autograd.Function):
    """y = x_total @ W.T (+ b) where x_total is x (mode "ar", "none") or the all-gather of x along dim 0 ("sp").

    Backward: grad_input = g @ W, then all-reduced ("ar") / reduce-scattered ("sp") / left alone ("none")
    asynchronously while grad_weight = g.T @ x_total is computed."""

    @staticmethod
    def forward(ctx, x, weight, bias, pg, mode, sizes, size, rank):
        if mode == "sp":
            x_total = M._forward_collective("all_gather(first dim)",
                                            lambda t: M._all_gather_dim(t, pg, size, 0, sizes), x)
        else:
            x_total = x
        # Sequence parallel: keep only the local chunk; backward gathers it again (overlapped with the input-gradient
        # GEMM) instead of keeping the gathered input alive between forward and backward.
        ctx.save_for_backward(x if mode == "sp" else x_total, weight)
        ctx.pg, ctx.mode, ctx.sizes, ctx.size, ctx.rank, ctx.has_bias = pg, mode, sizes, size, rank, bias is not None
        out = torch.matmul(x_total, weight.t())
        if bias is not None:
            out = out + bias
        return out

    @staticmethod
    def backward(ctx, g):
        x_saved, weight = ctx.saved_tensors
        g = g.contiguous()
        grad_input = work = finish = None
        gather = None
        if ctx.mode == "sp" and ctx.needs_input_grad[1]:
            gather = M._all_gather_dim(x_saved, ctx.pg, ctx.size, 0, ctx.sizes, async_op=True)
        if ctx.needs_input_grad[0]:
            grad_input = torch.matmul(g, weight)
            if ctx.mode == "ar":
                work = dist.all_reduce(grad_input, group=ctx.pg, async_op=True)
            elif ctx.mode == "sp":
                work, finish = M._reduce_scatter_dim0(grad_input, ctx.pg, ctx.size, ctx.rank, ctx.sizes, async_op=True)
        grad_w = grad_b = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            if gather is not None:
                gather[0].wait()
                x_total = gather[1]()
            else:
                x_total = x_saved
            grad_w = torch.matmul(g2.t(), x_total.reshape(-1, x_total.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        if work is not None:
            work.wait()
            if finish is not None:
                grad_input = finish()
        return grad_input, grad_w, grad_b, None, None, None, None, None


def _copy_param(p: torch.Tensor, pg, size: int) -> torch.Tensor:
    """A parameter applied by every rank to its own sequence chunk: sum its gradient over the group."""
    return p if size == 1 else M._CopyToRegion.apply(p, pg)


def _dense_linear(in_features, out_features, bias, dtype):
    # Built on the CPU with the current RNG exactly as nn.Linear builds it (same draws, same order).
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


class _TPBase(nn.Module):
    def _setup_group(self, group):
        self.group = group
        self._pg = resolve_group(group)
        self.tp_size = dist.get_world_size(self._pg)
        self.tp_rank = dist.get_rank(self._pg)

    @classmethod
    def _from_dense_linear(cls, module, group, mode_flag: bool, sequence_parallel: bool, shard_unit: int):
        """Shard ``module`` (an ``nn.Linear`` holding the same full weight on every rank of ``group``)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense: expected nn.Linear, got {type(module).__name__}")
        layer = cls(module.in_features, module.out_features, module.bias is not None, group, mode_flag,
                    sequence_parallel, shard_unit=shard_unit, device=module.weight.device,
                    dtype=module.weight.dtype, _init=False)
        layer._load_full(module)
        return layer


class ColumnParallelLinear(_TPBase):
    """Linear layer with the output features split over ``group`` (see the module docstring for the layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, gather_output: bool = False,
                 sequence_parallel: bool = False, *, shard_unit: int = 1, device=None, dtype=None, _init: bool = True):
        super().__init__()
        self._setup_group(group)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.shard_unit = gather_output, sequence_parallel, shard_unit
        self.sizes = _shard_sizes(out_features, self.tp_size, shard_unit, self._desc(), "out_features", self.tp_rank)
        self.start = sum(self.sizes[: self.tp_rank])
        self.out_local = self.sizes[self.tp_rank]
        dev = torch.device(device) if device is not None else None
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features, device=dev, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_local, device=dev, dtype=dtype)) if bias else None
        if _init:
            self._load_full(_dense_linear(in_features, out_features, bias, dtype))

    def _desc(self) -> str:
        return f"ColumnParallelLinear({self.in_features}, {self.out_features})"

    def _load_full(self, dense: nn.Linear):
        with torch.no_grad():
            self.weight.copy_(dense.weight[self.start: self.start + self.out_local])
            if self.bias is not None:
                self.bias.copy_(dense.bias[self.start: self.start + self.out_local])

    @classmethod
    def from_dense(cls, module: nn.Linear, group=None, gather_output: bool = False, sequence_parallel: bool = False,
                   *, shard_unit: int = 1) -> "ColumnParallelLinear":
        """Shard ``module`` (an ``nn.Linear`` holding the same full weight on every rank of ``group``)."""
        return cls._from_dense_linear(module, group, gather_output, sequence_parallel, shard_unit)

    def to_dense(self) -> nn.Linear:
        """The full ``nn.Linear`` (gathered on every rank of the group)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(M._all_gather_dim(self.weight.detach(), self._pg, self.tp_size, 0, self.sizes))
            if self.bias is not None:
                dense.bias.copy_(M._all_gather_dim(self.bias.detach(), self._pg, self.tp_size, 0, self.sizes))
        return dense

    def forward(self, x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """``x``: the full input ``[..., in_features]``; with ``sequence_parallel``, this rank's chunk of the first
        dimension (``seq_len``: the full first dimension when the chunks are uneven; default: equal chunks)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self._desc()} on rank {self.tp_rank} of a group of {self.tp_size}: input has "
                             f"{x.shape[-1]} features in its last dimension, expected {self.in_features} "
                             f"(input shape {tuple(x.shape)})")
        if self.tp_size == 1:
            out = F.linear(x, self.weight, self.bias)
        elif self.sequence_parallel:
            sizes = (M.chunk_sizes(seq_len, self.tp_size, "sequence length") if seq_len is not None
                     else [x.shape[0]] * self.tp_size)
            if x.shape[0] != sizes[self.tp_rank]:
                raise ValueError(f"{self._desc()} on rank {self.tp_rank}: sequence-parallel input holds {x.shape[0]} "
                                 f"positions, the torch.chunk split of {seq_len} over {self.tp_size} gives "
                                 f"{sizes[self.tp_rank]}")
            if seq_len is None:
                M.check_equal_extent(x.shape[0], self._pg, self.tp_size, self.tp_rank, self._desc(), "seq_len",
                                     x.device)
            try:
                out = _LinearFn.apply(x, self.weight, self.bias, self._pg, "sp", sizes, self.tp_size, self.tp_rank)
            except RuntimeError as e:
                if seq_len is not None:
                    raise
                msg = (f"{self._desc()} on rank {self.tp_rank} of a group of {self.tp_size}: the sequence-parallel "
                       f"all-gather failed; without seq_len every rank must hold the same number of positions (this "
                       f"rank: {x.shape[0]}): {e}")
                try:
                    err = type(e)(msg)
                except Exception:
                    err = RuntimeError(msg)
                raise err from e
        else:
            out = _LinearFn.apply(x, self.weight, self.bias, self._pg, "ar", None, self.tp_size, self.tp_rank)
        if self.gather_output and self.tp_size > 1:
            out = M._GatherLast.apply(out, self._pg, self.tp_size, self.tp_rank, self.sizes)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local {self.out_local}, rows "
                f"{self.start}:{self.start + self.out_local}), bias={self.bias is not None}, tp={self.tp_size}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TPBase):
    """Linear layer with the input features split over ``group`` (see the module docstring for the layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, *, shard_unit: int = 1,
                 device=None, dtype=None, _init: bool = True):
        super().__init__()
        self._setup_group(group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.shard_unit = input_is_parallel, sequence_parallel, shard_unit
        if sequence_parallel and not input_is_parallel:
            raise ValueError(f"{self._desc()}: sequence_parallel=True needs input_is_parallel=True")
        self.sizes = _shard_sizes(in_features, self.tp_size, shard_unit, self._desc(), "in_features", self.tp_rank)
        self.start = sum(self.sizes[: self.tp_rank])
        self.in_local = self.sizes[self.tp_rank]
        dev = torch.device(device) if device is not None else None
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, device=dev, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=dev, dtype=dtype)) if bias else None
        if self.bias is not None and sequence_parallel:
            # Marker only. Unlike Megatron's `sequence_parallel` attribute, nothing is left to do: the gradient is
            # already summed over the group in backward (an all-reduce of it by the caller would count it tp times).
            self.bias.tp_grad_summed = True
        if _init:
            self._load_full(_dense_linear(in_features, out_features, bias, dtype))

    def _desc(self) -> str:
        return f"RowParallelLinear({self.in_features}, {self.out_features})"

    def _load_full(self, dense: nn.Linear):
        with torch.no_grad():
            self.weight.copy_(dense.weight[:, self.start: self.start + self.in_local])
            if self.bias is not None:
                self.bias.copy_(dense.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear, group=None, input_is_parallel: bool = True,
                   sequence_parallel: bool = False, *, shard_unit: int = 1) -> "RowParallelLinear":
        """Shard ``module`` (an ``nn.Linear`` holding the same full weight on every rank of ``group``)."""
        return cls._from_dense_linear(module, group, input_is_parallel, sequence_parallel, shard_unit)

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(M._all_gather_dim(self.weight.detach(), self._pg, self.tp_size, 1, self.sizes))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def forward(self, x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """``x``: this rank's chunk of the last dimension (``input_is_parallel``) or the full input. With
        ``sequence_parallel`` the output is this rank's chunk of the first dimension (``seq_len``: the full first
        dimension, needed only to check uneven chunks)."""
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        if not self.input_is_parallel:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{self._desc()} on rank {self.tp_rank} of a group of {self.tp_size}: input has "
                                 f"{x.shape[-1]} features, expected {self.in_features} (input_is_parallel=False)")
            x = M._ScatterLast.apply(x, self._pg, self.tp_size, self.tp_rank, self.sizes)
        if x.shape[-1] != self.in_local:
            raise ValueError(f"{self._desc()} on rank {self.tp_rank} of a group of {self.tp_size}: parallel input has "
                             f"{x.shape[-1]} features in its last dimension, this rank's chunk of {self.in_features} "
                             f"is {self.in_local} (chunks {self.sizes}; input shape {tuple(x.shape)})")
        partial = _LinearFn.apply(x, self.weight, None, self._pg, "none", None, self.tp_size, self.tp_rank)
        if self.sequence_parallel:
            if seq_len is not None and partial.shape[0] != seq_len:
                raise ValueError(f"{self._desc()} on rank {self.tp_rank}: input covers {partial.shape[0]} positions, "
                                 f"seq_len says {seq_len}")
            out = M._ReduceScatterFirst.apply(partial, self._pg, self.tp_size, self.tp_rank)
            if self.bias is not None:
                out = out + _copy_param(self.bias, self._pg, self.tp_size)
        else:
            out = M._ReduceFromRegion.apply(partial, self._pg)
            if self.bias is not None:
                out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.in_local}, columns {self.start}:"
                f"{self.start + self.in_local}), out_features={self.out_features}, bias={self.bias is not None}, "
                f"tp={self.tp_size}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TPBase):
    """Embedding with the vocabulary (rows) split over ``group``; the output is the full ``embedding_dim`` vector,
    replicated on every rank of the group."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, *, device=None, dtype=None,
                 _init: bool = True):
        super().__init__()
        self._setup_group(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sizes = _shard_sizes(num_embeddings, self.tp_size, 1, self._desc(), "num_embeddings", self.tp_rank)
        self.start = sum(self.sizes[: self.tp_rank])
        self.num_local = self.sizes[self.tp_rank]
        dev = torch.device(device) if device is not None else None
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim, device=dev, dtype=dtype))
        if _init:
            self._load_full(nn.Embedding(num_embeddings, embedding_dim, dtype=dtype))

    def _desc(self) -> str:
        return f"VocabParallelEmbedding({self.num_embeddings}, {self.embedding_dim})"

    def _load_full(self, dense: nn.Embedding):
        with torch.no_grad():
            self.weight.copy_(dense.weight[self.start: self.start + self.num_local])

    @classmethod
    def from_dense(cls, module: nn.Embedding, group=None) -> "VocabParallelEmbedding":
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_dense: expected nn.Embedding, got {type(module).__name__}")
        if module.padding_idx is not None or module.max_norm is not None or module.sparse:
            raise ValueError("VocabParallelEmbedding.from_dense: padding_idx, max_norm and sparse are not supported")
        layer = cls(module.num_embeddings, module.embedding_dim, group, device=module.weight.device,
                    dtype=module.weight.dtype, _init=False)
        layer._load_full(module)
        return layer

    def to_dense(self) -> nn.Embedding:
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(M._all_gather_dim(self.weight.detach(), self._pg, self.tp_size, 0, self.sizes))
        return dense

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{self._desc()} on rank {self.tp_rank}: ids must be int64 or int32, got {ids.dtype}")
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        bad = (ids < 0) | (ids >= self.num_embeddings)
        if bool(bad.any()):  # every rank would see it as another rank's row: zeros, silently
            raise IndexError(f"{self._desc()} on rank {self.tp_rank} of a group of {self.tp_size}: id "
                             f"{int(ids[bad][0])} is out of range [0, {self.num_embeddings})")
        outside = (ids < self.start) | (ids >= self.start + self.num_local)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return M._ReduceFromRegion.apply(out, self._pg)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.start}:{self.start + self.num_local}),"
                f" tp={self.tp_size}")


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, pg, start, vocab, ignore_index, smoothing):
        work_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        x = logits.to(work_dtype)
        n_local = x.shape[-1]
        x2 = x.reshape(-1, n_local)
        t = target.reshape(-1)
        # 1. global max per row (numerical stability)
        m = x2.max(dim=-1).values
        m = M._forward_collective("all_reduce(max)", _all_reduce_op, m, pg, dist.ReduceOp.MAX)
        shifted = x2 - m.unsqueeze(1)
        exp = shifted.exp()
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= vocab))
        if bool(bad.any()):
            raise IndexError(f"vocab_parallel_cross_entropy on rank {dist.get_rank(pg)} of a group of "
                             f"{dist.get_world_size(pg)}: target {int(t[bad][0])} is out of bounds for a vocabulary "
                             f"of {vocab} (ignore_index {ignore_index})")
        inside = valid & (t >= start) & (t < start + n_local)
        idx = (t - start).masked_fill(~inside, 0)
        picked = shifted.gather(1, idx.unsqueeze(1)).squeeze(1).masked_fill(~inside, 0.0)
        # 2. one all-reduce for the sum of exps, the target's logit and (label smoothing) the row's sum of logits
        parts = [exp.sum(-1), picked]
        if smoothing > 0:
            parts.append(shifted.sum(-1))
        red = M._forward_collective("all_reduce(sum)", _all_reduce_op, torch.stack(parts), pg, dist.ReduceOp.SUM)
        sum_exp, picked = red[0], red[1]
        log_z = sum_exp.log()
        nll = log_z - picked
        if smoothing > 0:
            smooth = log_z - red[2] / vocab
            loss_rows = (1.0 - smoothing) * nll + smoothing * smooth
        else:
            loss_rows = nll
        loss_rows = loss_rows.masked_fill(~valid, 0.0)
        count = valid.sum()
        ctx.save_for_backward(exp, sum_exp, idx, inside, valid, count)
        ctx.smoothing, ctx.vocab, ctx.shape, ctx.dtype = smoothing, vocab, logits.shape, logits.dtype
        # mean over the non-ignored targets, as F.cross_entropy(reduction="mean"); NaN when all are ignored (same)
        return (loss_rows.sum() / count).to(logits.dtype)

    @staticmethod
    def backward(ctx, g):
        exp, sum_exp, idx, inside, valid, count = ctx.saved_tensors
        grad = exp / sum_exp.unsqueeze(1)
        if ctx.smoothing > 0:
            grad = grad - ctx.smoothing / ctx.vocab
        rows = torch.arange(grad.shape[0], device=grad.device)
        onehot_scale = (1.0 - ctx.smoothing) * inside.to(grad.dtype)
        grad[rows, idx] -= onehot_scale
        # all targets ignored: the loss is NaN (as F.cross_entropy's), the gradient zero (as F.cross_entropy's)
        grad = grad * (valid.to(grad.dtype) * (g.to(grad.dtype) / count.clamp_min(1))).unsqueeze(1)
        return grad.reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None, None


def _all_reduce_op(t, pg, op):
    t = t.contiguous().clone()
    dist.all_reduce(t, op=op, group=pg)
    return t


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, group=None,
                                 ignore_index: int = -100, label_smoothing: float = 0.0,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits sharded along the last dimension (this rank holds the ``torch.chunk`` piece of
    the vocabulary a ``ColumnParallelLinear`` without ``gather_output`` produces), equal to ``F.cross_entropy`` of
    the gathered logits (``reduction="mean"``, ``ignore_index``, ``label_smoothing``). ``target``: class indices of
    shape ``logits_shard.shape[:-1]``. ``vocab_size``: the full vocabulary (default: equal shards, i.e. every rank
    holds as many columns as this one; pass it when the split is uneven). Half-precision logits are reduced in
    float32. The gradient needs no communication."""
    pg = resolve_group(group)
    size, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(f"vocab_parallel_cross_entropy on rank {rank}: target shape {tuple(target.shape)} does not "
                         f"match logits shape {tuple(logits_shard.shape)} without its last dimension")
    n_local = logits_shard.shape[-1]
    if vocab_size is None:
        # Every rank's shard width (one tiny all-gather): an uneven split must not be guessed.
        mine = torch.tensor([n_local], dtype=torch.int64, device=logits_shard.device)

        def gather(t):
            allw = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(allw, t, group=pg)
            return torch.cat(allw)
        widths = M._forward_collective("all_gather(vocab sizes)", gather, mine).tolist()
        vocab_size = sum(widths)
        try:
            sizes = M.chunk_sizes(vocab_size, size, "vocab size")
        except ValueError:
            sizes = None
        if widths != sizes:
            raise ValueError(f"vocab_parallel_cross_entropy on rank {rank}: the ranks' logits shards have widths "
                             f"{widths}, not the torch.chunk split of {vocab_size} ({sizes})")
    else:
        sizes = _shard_sizes(vocab_size, size, 1, "vocab_parallel_cross_entropy", "vocab_size", rank)
    if n_local != sizes[rank]:
        raise ValueError(f"vocab_parallel_cross_entropy on rank {rank} of a group of {size}: logits shard has "
                         f"{n_local} columns, the torch.chunk split of vocab_size {vocab_size} gives {sizes[rank]}")
    start = sum(sizes[:rank])
    return _VocabParallelCE.apply(logits_shard, target, pg, start, vocab_size, ignore_index, float(label_smoothing))
