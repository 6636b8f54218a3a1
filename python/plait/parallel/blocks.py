"""Example transformer blocks: a dense pre-LayerNorm GPT block and its tensor/sequence-parallel version.

Layout: activations are ``[seq, batch, hidden]`` (sequence first, as Megatron lays them out, so sequence
parallelism shards the first dimension). The fused QKV projection stores its rows head by head
(``[head][q, k, v][head_dim]``), so a column split by whole heads (``shard_unit = 3 * head_dim``) gives each rank
complete heads.

``ParallelTransformerBlock``: QKV and the first MLP linear are ``ColumnParallelLinear``, the attention output
projection and the second MLP linear are ``RowParallelLinear``; rank ``r`` computes the heads
``torch.chunk(range(heads), tp)[r]`` and the MLP columns ``torch.chunk(range(ffn), tp)[r]``. With
``sequence_parallel`` the block's input and output are this rank's ``torch.chunk`` of the sequence, LayerNorms run on
the local chunk (their weight gradients are summed over the group), and the layers all-gather / reduce-scatter.
``recompute=True`` checkpoints the whole block with :func:`plait.parallel.recompute.checkpoint` (activations
recomputed in backward, forward collectives replayed rather than repeated).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._groups import resolve_group
from . import layers as L
from . import mappings as M
from .recompute import checkpoint

__all__ = ["TransformerBlock", "ParallelTransformerBlock"]


def _attention(qkv: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    s, b, _ = qkv.shape
    q, k, v = qkv.view(s, b, heads, 3, head_dim).permute(3, 1, 2, 0, 4).unbind(0)  # each [b, heads, s, d]
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)


class TransformerBlock(nn.Module):
    """Dense reference block (pre-LayerNorm, causal self-attention, GELU MLP, no dropout)."""

    def __init__(self, hidden: int, heads: int, ffn: int | None = None, *, recompute: bool = False, dtype=None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"TransformerBlock: hidden {hidden} is not a multiple of heads {heads}")
        self.hidden, self.heads, self.head_dim, self.ffn = hidden, heads, hidden // heads, ffn or 4 * hidden
        self.recompute = recompute
        self.ln1 = nn.LayerNorm(hidden, dtype=dtype)
        self.qkv = nn.Linear(hidden, 3 * hidden, dtype=dtype)
        self.proj = nn.Linear(hidden, hidden, dtype=dtype)
        self.ln2 = nn.LayerNorm(hidden, dtype=dtype)
        self.fc1 = nn.Linear(hidden, self.ffn, dtype=dtype)
        self.fc2 = nn.Linear(self.ffn, hidden, dtype=dtype)

    def _forward(self, x):
        x = x + self.proj(_attention(self.qkv(self.ln1(x)), self.heads, self.head_dim))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward(self, x):
        return checkpoint(self._forward, x) if self.recompute and self.training else self._forward(x)


class _ParallelLayerNorm(nn.LayerNorm):
    """LayerNorm whose parameters are replicated over the group; with sequence parallelism each rank normalises its
    own sequence chunk, so the parameters' gradients are summed over the group in backward."""

    def __init__(self, hidden, group, sequence_parallel, dtype=None):
        super().__init__(hidden, dtype=dtype)
        self._pg = resolve_group(group)
        self.tp_size = torch.distributed.get_world_size(self._pg)
        self.sequence_parallel = sequence_parallel
        for p in self.parameters():
            p.tp_grad_summed = sequence_parallel  # summed over the group in backward already (see layers.py)

    def forward(self, x):
        if self.sequence_parallel and self.tp_size > 1:
            return F.layer_norm(x, self.normalized_shape, L._copy_param(self.weight, self._pg, self.tp_size),
                                L._copy_param(self.bias, self._pg, self.tp_size), self.eps)
        return super().forward(x)


class ParallelTransformerBlock(nn.Module):
    """Tensor-parallel (and optionally sequence-parallel) ``TransformerBlock`` over ``group``."""

    def __init__(self, hidden: int, heads: int, ffn: int | None = None, group=None, sequence_parallel: bool = False,
                 recompute: bool = False, *, dtype=None, _init: bool = True):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"ParallelTransformerBlock: hidden {hidden} is not a multiple of heads {heads}")
        self.group, self._pg = group, resolve_group(group)
        self.tp_size = torch.distributed.get_world_size(self._pg)
        self.tp_rank = torch.distributed.get_rank(self._pg)
        self.hidden, self.heads, self.head_dim, self.ffn = hidden, heads, hidden // heads, ffn or 4 * hidden
        self.sequence_parallel, self.recompute = sequence_parallel, recompute
        try:
            head_sizes = M.chunk_sizes(heads, self.tp_size, "heads")
        except ValueError as e:
            raise ValueError(f"ParallelTransformerBlock on rank {self.tp_rank} of a group of {self.tp_size}: {e}") from None
        self.heads_local = head_sizes[self.tp_rank]
        d = self.head_dim
        kw = dict(group=group, sequence_parallel=sequence_parallel, dtype=dtype, _init=_init)
        self.ln1 = _ParallelLayerNorm(hidden, group, sequence_parallel, dtype=dtype)
        self.qkv = L.ColumnParallelLinear(hidden, 3 * hidden, shard_unit=3 * d, **kw)
        self.proj = L.RowParallelLinear(hidden, hidden, shard_unit=d, **kw)
        self.ln2 = _ParallelLayerNorm(hidden, group, sequence_parallel, dtype=dtype)
        self.fc1 = L.ColumnParallelLinear(hidden, self.ffn, **kw)
        self.fc2 = L.RowParallelLinear(self.ffn, hidden, **kw)

    @classmethod
    def from_dense(cls, block: TransformerBlock, group=None, sequence_parallel: bool = False,
                   recompute: bool | None = None) -> "ParallelTransformerBlock":
        p = block.qkv.weight
        out = cls(block.hidden, block.heads, block.ffn, group, sequence_parallel,
                  block.recompute if recompute is None else recompute, dtype=p.dtype, _init=False)
        with torch.no_grad():
            out.ln1.load_state_dict(block.ln1.state_dict())
            out.ln2.load_state_dict(block.ln2.state_dict())
        for name in ("qkv", "proj", "fc1", "fc2"):
            getattr(out, name)._load_full(getattr(block, name))
        return out.to(p.device)

    def to_dense(self) -> TransformerBlock:
        w = self.qkv.weight
        dense = TransformerBlock(self.hidden, self.heads, self.ffn, recompute=self.recompute, dtype=w.dtype).to(w.device)
        with torch.no_grad():
            dense.ln1.load_state_dict(self.ln1.state_dict())
            dense.ln2.load_state_dict(self.ln2.state_dict())
            for name in ("qkv", "proj", "fc1", "fc2"):
                getattr(dense, name).load_state_dict(getattr(self, name).to_dense().state_dict())
        return dense

    def _forward(self, x, seq_len=None):
        a = self.qkv(self.ln1(x), seq_len)
        x = x + self.proj(_attention(a, self.heads_local, self.head_dim), seq_len)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x), seq_len)), seq_len)

    def forward(self, x, seq_len: int | None = None):
        """``x``: ``[seq, batch, hidden]``, replicated over the group, or with ``sequence_parallel`` this rank's
        chunk of the sequence (``seq_len``: the full length, needed when it does not split evenly)."""
        if x.shape[-1] != self.hidden:
            raise ValueError(f"ParallelTransformerBlock on rank {self.tp_rank}: input has {x.shape[-1]} features, "
                             f"expected hidden {self.hidden} (input shape {tuple(x.shape)})")
        if self.recompute and self.training:
            return checkpoint(self._forward, x, seq_len, region="ParallelTransformerBlock")
        return self._forward(x, seq_len)
