"""Autograd-aware collectives for tensor and sequence parallelism (Megatron-core style).

Every function takes the tensor-parallel process group explicitly; there are no
module-level group globals. ``group=None`` means *no parallelism* (a world of one):
every op is then the identity and no ``torch.distributed`` call is made, so the same
model code runs single-process without ``init_process_group``. (Note that this differs
from ``torch.distributed``'s own convention, where ``None`` means the default world.)

Tensor-parallel region ops (the hidden/feature dim is the *last* dim):

=====================================  =====================  ======================
op                                     forward                backward
=====================================  =====================  ======================
copy_to_tensor_model_parallel_region   identity               all-reduce
reduce_from_tensor_model_parallel_...  all-reduce             identity
scatter_to_tensor_model_parallel_...   split last dim         all-gather last dim
gather_from_tensor_model_parallel_...  all-gather last dim    split last dim
=====================================  =====================  ======================

Sequence-parallel ops (the sequence dim, ``SEQ_DIM = 1`` of a ``(B, T, C)`` activation):

=========================================  =====================  ======================
scatter_to_sequence_parallel_region        split T                all-gather T
gather_from_sequence_parallel_region       all-gather T           reduce-scatter T (or split)
reduce_scatter_to_sequence_parallel_region reduce-scatter T       all-gather T
=========================================  =====================  ======================

Inputs are never modified in place: collectives that write into their buffer
(all-reduce) work on a copy, so a gradient tensor that autograd hands to several
consumers (e.g. the two branches of a residual add) is never corrupted.

Backends: gloo only guarantees ``all_reduce``/``all_gather``/``broadcast`` across the torch
versions we support, so on gloo reduce-scatter is an all-reduce followed by taking this
rank's slice, and all-gather uses the list form. Other backends (NCCL) use the fused
single-tensor collectives.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

SEQ_DIM = 1
"""The sequence dimension of a ``(batch, seq, hidden)`` activation."""

# Test hook: route gloo through the fused single-tensor collectives too (torch >= 2.5
# gloo implements them), so the fused code path can be checked on CPU.
_GLOO_USE_FUSED = False

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- basics
def get_world_size(group: Optional[ProcessGroup]) -> int:
    """World size of ``group``; 1 for ``None`` (no parallelism)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def get_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank inside ``group``; 0 for ``None`` (no parallelism)."""
    if group is None:
        return 0
    return dist.get_rank(group)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def _use_fused(group: ProcessGroup) -> bool:
    return _GLOO_USE_FUSED or dist.get_backend(group) != "gloo"


# ------------------------------------------------- plain (non-autograd) collectives
def all_reduce(x: torch.Tensor, group: Optional[ProcessGroup],
               op: "dist.ReduceOp.RedOpType" = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a *copy* of ``x`` over ``group``; returns ``x`` itself for a world of one."""
    if get_world_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def split_along_dim(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (size must divide evenly)."""
    ws = get_world_size(group)
    if ws == 1:
        return x
    dim = dim % x.dim()
    chunk = divide(x.shape[dim], ws)
    return x.narrow(dim, get_rank(group) * chunk, chunk).contiguous()


def gather_along_dim(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    ws = get_world_size(group)
    if ws == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    if _use_fused(group):
        out = torch.empty((ws * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=group)
        if dim == 0:
            return out
        return torch.cat(out.view((ws,) + tuple(x.shape)).unbind(0), dim=dim)
    parts = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``."""
    ws = get_world_size(group)
    if ws == 1:
        return x
    dim = dim % x.dim()
    chunk = divide(x.shape[dim], ws)
    if _use_fused(group):
        xt = x.movedim(dim, 0).contiguous()
        out = torch.empty((chunk,) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, xt, group=group)
        return out.movedim(0, dim).contiguous()
    # gloo fallback: all-reduce (works on every torch version) + slice.
    full = all_reduce(x, group)
    return full.narrow(dim, get_rank(group) * chunk, chunk).contiguous()


# ---------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, ctx.dim, ctx.group), None, None


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_scatter_grad):
        ctx.group, ctx.dim, ctx.rs = group, dim, reduce_scatter_grad
        return gather_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.rs:
            return reduce_scatter_along_dim(grad, ctx.dim, ctx.group), None, None, None
        return split_along_dim(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, ctx.dim, ctx.group), None, None


# ------------------------------------------------------------- public autograd ops
def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Identity forward, all-reduce backward (entry of a column-parallel layer)."""
    if get_world_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """All-reduce forward, identity backward (exit of a row-parallel layer)."""
    if get_world_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Split the last dim forward, all-gather the last dim backward."""
    if get_world_size(group) == 1:
        return x
    return _ScatterAlongDim.apply(x, group, -1)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """All-gather the last dim forward, split the last dim backward."""
    if get_world_size(group) == 1:
        return x
    return _GatherAlongDim.apply(x, group, -1, False)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup],
                                        dim: int = SEQ_DIM) -> torch.Tensor:
    """Split the sequence dim forward, all-gather it backward."""
    if get_world_size(group) == 1:
        return x
    return _ScatterAlongDim.apply(x, group, dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup],
                                         tensor_parallel_output_grad: bool = True,
                                         dim: int = SEQ_DIM) -> torch.Tensor:
    """All-gather the sequence dim forward.

    Backward is a reduce-scatter when the consumer is tensor-parallel (each rank then
    holds only a partial gradient of the gathered tensor, e.g. the input of a
    column-parallel linear), otherwise a plain split (``tensor_parallel_output_grad=False``,
    when every rank computed the same full gradient).
    """
    if get_world_size(group) == 1:
        return x
    return _GatherAlongDim.apply(x, group, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Optional[ProcessGroup],
                                               dim: int = SEQ_DIM) -> torch.Tensor:
    """Reduce-scatter the sequence dim forward, all-gather it backward."""
    if get_world_size(group) == 1:
        return x
    return _ReduceScatterAlongDim.apply(x, group, dim)


__all__ = [
    "SEQ_DIM", "get_world_size", "get_rank", "divide",
    "all_reduce", "split_along_dim", "gather_along_dim", "reduce_scatter_along_dim",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]
