"""Megatron-core-style tensor-parallel (TP) layers with the process group passed explicitly.

There are no module-level group globals: every layer and function takes
``group: torch.distributed.ProcessGroup | None``, where ``None`` means *no parallelism*
(a world of one; nothing from ``torch.distributed`` is called). Autograd-aware
collectives live in :mod:`pretrain.parallel.comm` and are re-exported here.

Layers
------
* :class:`ColumnParallelLinear` -- weight ``(out/tp, in)``; each rank computes a slice of
  the output features. With ``sequence_parallel`` the ``(B, T/tp, C)`` input is
  all-gathered along T first.
* :class:`RowParallelLinear` -- weight ``(out, in/tp)``; partial outputs are all-reduced
  (or reduce-scattered along T with ``sequence_parallel``) and *then* the replicated bias
  is added.
* :class:`VocabParallelEmbedding` -- each rank holds rows ``[rank*V/tp, (rank+1)*V/tp)``;
  ids outside the slice give zeros, then the partial outputs are all-reduced.
* :func:`vocab_parallel_cross_entropy` -- the loss from vocab-sharded logits, in
  :mod:`pretrain.parallel.cross_entropy` (re-exported here).

Initialisation is TP-invariant: a layer draws its *full* weight on the CPU with the
default torch generator (``init_method(full)``) and keeps its own shard, so for the same
seed and the same construction order TP=1 and TP=k hold the same full weights. The same
path is available explicitly: ``layer.load_full_weight(full_w, full_b)`` /
:func:`shard_tensor`, and the inverse ``layer.gather_full_weight()`` /
:func:`gather_tensor` / :func:`gather_full_param` (checkpoint export).

Parameter marking, and what DeepSpeed reads
-------------------------------------------
Sharded parameters get (Megatron's names)::

    param.tensor_model_parallel = True
    param.partition_dim = <dim split across ranks>   # 0 for column/embedding, 1 for row weight
    param.partition_stride = 1

replicated ones (row-parallel bias, and whatever the model adds: layer norms ...) get
``tensor_model_parallel = False, partition_dim = -1, partition_stride = 1``.

DeepSpeed 0.19.8 reads **only** ``tensor_model_parallel`` (or the legacy ``model_parallel``)
through ``deepspeed.runtime.utils.is_model_parallel_parameter(p)``, plus
``ds_pipe_replicated`` (pipeline-tied params, skipped). In ``clip_grad_norm_``,
``get_grad_norm``/``get_flattened_grad_norm``, ``get_weight_norm``, ZeRO-1/2/3
(``stage_1_and_2.py``/``stage3.py``: ``is_model_parallel_parameter(p) or
model_parallel_rank == 0``), the BF16 and FP16 optimizers, a parameter's squared grad norm
is added on every TP rank if it is model-parallel and only on TP rank 0 otherwise; the sum
is then all-reduced over ``mpu.get_model_parallel_group()``. So every shard counts once and
every replicated parameter counts once. That needs an ``mpu`` passed to
``deepspeed.initialize`` (``get_model_parallel_rank/_group/_world_size``,
``get_tensor_model_parallel_rank/_group/_world_size``, ``get_data_parallel_rank/_group/_world_size``);
``partition_dim``/``partition_stride`` are not read by DeepSpeed's norm code -- they are for our
own checkpoint export (:func:`gather_full_param`).

Sequence parallelism
--------------------
With ``sequence_parallel=True`` a replicated parameter that is applied to a sequence
*shard* (row-parallel bias, layer norms between TP regions) receives only a partial
gradient on each rank. We fix that inside autograd rather than with a post-backward hook:
such a parameter is used through :func:`sequence_parallel_param` (identity forward,
all-reduce backward), so its ``.grad`` is already complete and identical on every TP rank
by the time DeepSpeed's gradient hooks see it. It is also tagged
``param.sequence_parallel = True`` for information.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .comm import (  # noqa: F401  (re-exported)
    SEQ_DIM,
    ProcessGroup,
    copy_to_tensor_model_parallel_region,
    divide,
    gather_along_dim,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_rank,
    get_world_size,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    split_along_dim,
)

from .cross_entropy import vocab_parallel_cross_entropy  # noqa: F401  (re-exported)

InitMethod = Callable[[torch.Tensor], object]


# ------------------------------------------------------------------ misc helpers
def pad_vocab(vocab: int, multiple: int, tp: int) -> int:
    """Round ``vocab`` up to a multiple of ``multiple * tp`` (every rank gets an equal,
    ``multiple``-aligned slice)."""
    if vocab <= 0 or multiple <= 0 or tp <= 0:
        raise ValueError(f"pad_vocab needs positive ints, got vocab={vocab}, multiple={multiple}, tp={tp}")
    step = multiple * tp
    return ((vocab + step - 1) // step) * step


def vocab_range(padded_vocab: int, group: Optional[ProcessGroup]) -> tuple[int, int]:
    """``[start, end)`` of the vocab rows this rank holds."""
    per = divide(padded_vocab, get_world_size(group))
    start = get_rank(group) * per
    return start, start + per


def init_normal(std: float = 0.02) -> InitMethod:
    """``init_method`` drawing N(0, std^2) (the GPT default)."""
    def init_(t: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(t, mean=0.0, std=std)
    return init_


def init_rows(init_method: InitMethod, rows: int) -> InitMethod:
    """Wrap ``init_method`` to initialise only the first ``rows`` rows and zero the rest.

    For vocab-padded tables: the random draws then do not depend on the padding (which
    changes with TP through :func:`pad_vocab`), so the real rows and every later layer
    get the same values whatever the TP size.
    """
    def init_(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            init_method(t[:rows])
            t[rows:].zero_()
        return t
    return init_


# ---------------------------------------------------------- parameter marking
def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool,
                                         dim: int, stride: int = 1) -> None:
    """Mark ``param`` the way Megatron does (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``). DeepSpeed reads ``tensor_model_parallel`` (see module doc)."""
    param.tensor_model_parallel = bool(is_parallel)
    param.partition_dim = int(dim) if is_parallel else -1
    param.partition_stride = int(stride)


def param_is_tensor_parallel(param: torch.Tensor) -> bool:
    """Same test as DeepSpeed's ``is_model_parallel_parameter``."""
    return bool(getattr(param, "tensor_model_parallel", False) or getattr(param, "model_parallel", False))


def sequence_parallel_param(param: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Use a replicated parameter inside a sequence-parallel region: identity forward,
    all-reduce of its gradient over ``group`` backward (see module doc)."""
    return copy_to_tensor_model_parallel_region(param, group)


# ------------------------------------------------------------- shard / gather
def shard_tensor(full: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """This rank's contiguous shard of ``full`` along ``dim`` (a copy; no autograd)."""
    with torch.no_grad():
        return split_along_dim(full.detach(), dim, group).clone()


def gather_tensor(shard: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: concatenate all ranks' shards along ``dim``.
    Collective: every rank of ``group`` must call it."""
    with torch.no_grad():
        return gather_along_dim(shard.detach(), dim, group).clone()


def gather_full_param(tensor: torch.Tensor, group: Optional[ProcessGroup],
                      like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full tensor for a (possibly sharded) parameter, or for a tensor shaped like one
    (``like=param``, e.g. its ``.grad`` or an optimizer moment). Replicated parameters are
    returned as a copy. Collective for sharded parameters."""
    ref = tensor if like is None else like
    if param_is_tensor_parallel(ref):
        return gather_tensor(tensor, ref.partition_dim, group)
    return tensor.detach().clone()


def _check_full(name: str, full: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(full.shape) != tuple(shape):
        raise ValueError(f"{name}: expected a full tensor of shape {tuple(shape)}, got {tuple(full.shape)}")


class _TPModule(nn.Module):
    """Shared shard/gather plumbing for the layers below."""

    group: Optional[ProcessGroup]
    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    def _full_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        shape = list(p.shape)
        if param_is_tensor_parallel(p):
            shape[p.partition_dim] *= get_world_size(self.group)
        return tuple(shape)

    def _load(self, p: torch.Tensor, full: torch.Tensor, name: str) -> None:
        _check_full(f"{type(self).__name__}.{name}", full, self._full_shape(p))
        shard = split_along_dim(full.detach(), p.partition_dim, self.group) if param_is_tensor_parallel(p) else full
        with torch.no_grad():
            p.copy_(shard.to(dtype=p.dtype, device=p.device))

    def load_full_weight(self, full_w: torch.Tensor, full_b: Optional[torch.Tensor] = None) -> None:
        """Copy this rank's shard of the full (unsharded) weight, and bias if given."""
        self._load(self.weight, full_w, "weight")
        if full_b is not None:
            if self.bias is None:
                raise ValueError(f"{type(self).__name__} has no bias but full_b was given")
            self._load(self.bias, full_b, "bias")

    def gather_full_weight(self) -> torch.Tensor:
        """The full weight (collective over ``group``)."""
        return gather_full_param(self.weight, self.group)

    def gather_full_bias(self) -> Optional[torch.Tensor]:
        """The full bias, or None (collective over ``group`` when the bias is sharded)."""
        return None if self.bias is None else gather_full_param(self.bias, self.group)

    def _init_from_full(self, init_method: Optional[InitMethod]) -> None:
        if init_method is None:  # the caller loads the weights next (from_linear, load_full_weight)
            return
        full = torch.empty(self._full_shape(self.weight), dtype=torch.float32)
        init_method(full)
        self.load_full_weight(full)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()


# --------------------------------------------------------------------- layers
class ColumnParallelLinear(_TPModule):
    """``Y = X A^T + b`` with ``A`` split along its output dim: weight ``(out_f/tp, in_f)``.

    Input: full ``(..., in_f)`` replicated on the TP ranks, or with ``sequence_parallel``
    the ``(B, T/tp, in_f)`` sequence shard. Output: ``(..., out_f/tp)``, or ``(..., out_f)``
    with ``gather_output``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: Optional[ProcessGroup] = None, gather_output: bool = False,
                 sequence_parallel: bool = False, *, init_method: Optional[InitMethod] = init_normal(),
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if gather_output and sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output is incompatible with sequence_parallel")
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and get_world_size(group) > 1
        tp = get_world_size(group)
        self.out_per_partition = divide(out_features, tp)
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(self.out_per_partition, in_features, **kw))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_partition, **kw))
            set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.register_parameter("bias", None)
        self._init_from_full(init_method)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Optional[ProcessGroup], **kwargs) -> "ColumnParallelLinear":
        kwargs.setdefault("init_method", None)  # the weights come from `linear`
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    dtype=linear.weight.dtype, device=linear.weight.device, **kwargs)
        layer.load_full_weight(linear.weight, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group, tensor_parallel_output_grad=True)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.group)
        out = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.group)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.out_per_partition}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TPModule):
    """``Y = X A^T + b`` with ``A`` split along its input dim: weight ``(out_f, in_f/tp)``.

    Input: ``(..., in_f/tp)`` (``input_is_parallel``, e.g. a column-parallel output) or the
    full ``(..., in_f)`` which is then split. Output: full ``(..., out_f)`` after an
    all-reduce, or with ``sequence_parallel`` the ``(B, T/tp, out_f)`` shard after a
    reduce-scatter. The bias is replicated and added after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: Optional[ProcessGroup] = None, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, *, init_method: Optional[InitMethod] = init_normal(),
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel requires input_is_parallel=True")
        self.group = group
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and get_world_size(group) > 1
        tp = get_world_size(group)
        self.in_per_partition = divide(in_features, tp)
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_partition, **kw))
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)
        self._init_from_full(init_method)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Optional[ProcessGroup], **kwargs) -> "RowParallelLinear":
        kwargs.setdefault("init_method", None)  # the weights come from `linear`
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group,
                    dtype=linear.weight.dtype, device=linear.weight.device, **kwargs)
        layer.load_full_weight(linear.weight, linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        out = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, self.group)
        if self.bias is not None:
            bias = sequence_parallel_param(self.bias, self.group) if self.sequence_parallel else self.bias
            out = out + bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.in_per_partition}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TPModule):
    """Embedding table split along the vocab: weight ``(num_embeddings/tp, dim)``.

    ``num_embeddings`` must divide by the TP size (use :func:`pad_vocab`). Output is the
    full ``(..., dim)`` after an all-reduce, or with ``sequence_parallel`` the
    ``(B, T/tp, dim)`` shard after a reduce-scatter along T.
    """

    bias = None

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Optional[ProcessGroup] = None,
                 *, sequence_parallel: bool = False, init_method: Optional[InitMethod] = init_normal(),
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        tp = get_world_size(group)
        if num_embeddings % tp != 0:
            raise ValueError(f"VocabParallelEmbedding: vocab {num_embeddings} is not divisible by TP size {tp}; "
                             f"pad it with pad_vocab()")
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel and tp > 1
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, group)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim,
                                               dtype=dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self._init_from_full(init_method)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_world_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tensor_model_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"local rows [{self.vocab_start}, {self.vocab_end}), sequence_parallel={self.sequence_parallel}")


__all__ = [
    "SEQ_DIM", "pad_vocab", "vocab_range", "init_normal", "init_rows",
    "set_tensor_model_parallel_attributes", "param_is_tensor_parallel", "sequence_parallel_param",
    "shard_tensor", "gather_tensor", "gather_full_param",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "get_world_size", "get_rank", "divide",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]
