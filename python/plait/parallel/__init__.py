"""plait.parallel: tensor-, sequence- and pipeline-parallel layers, heterogeneous data parallelism.

Everything takes ``group=``: ``None`` (the world), a process group, a 1-D ``DeviceMesh`` or ``(mesh, "dim")``.
See the README section "Parallel layers" for layouts and examples.
"""

from ._groups import resolve_group, group_rank, group_size, global_rank
from . import mappings
from .mappings import (
    all_to_all,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_sequence,
    scatter_to_region,
    scatter_to_sequence_region,
)
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy
from .recompute import SavedTensorMeter, checkpoint
from .blocks import ParallelTransformerBlock, TransformerBlock

__all__ = [
    "resolve_group", "group_rank", "group_size", "global_rank", "mappings",
    "all_to_all", "copy_to_region", "gather_from_region", "gather_from_sequence_region", "reduce_from_region",
    "reduce_scatter_to_sequence", "scatter_to_region", "scatter_to_sequence_region",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "SavedTensorMeter", "checkpoint", "ParallelTransformerBlock", "TransformerBlock",
]
