"""Parallelism for pretrain: tensor-parallel layers and collectives.

Kept import-light: importing ``pretrain.parallel`` loads nothing heavy. The public names
of :mod:`pretrain.parallel.tensor` (which imports torch) resolve lazily on first access,
e.g. ``from pretrain.parallel import ColumnParallelLinear``; submodules import as usual.
"""
from __future__ import annotations

# Must equal pretrain.parallel.tensor.__all__ (checked by tests/test_tensor_parallel.py).
_TENSOR_NAMES = frozenset({
    "SEQ_DIM", "pad_vocab", "vocab_range", "init_normal", "init_rows",
    "set_tensor_model_parallel_attributes", "param_is_tensor_parallel", "sequence_parallel_param",
    "shard_tensor", "gather_tensor", "gather_full_param",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "get_world_size", "get_rank", "divide",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
})


def __getattr__(name: str):
    if name in _TENSOR_NAMES:
        from . import tensor

        return getattr(tensor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
