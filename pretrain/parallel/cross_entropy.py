"""Cross entropy over vocab-sharded logits (tensor parallelism), never gathering them.

Each tensor-parallel rank holds the logits of its vocabulary columns. The loss needs three
reductions over the vocabulary: the max (for stability), the sum of exps and the target's
logit, each an all-reduce of one value per token over the group; the softmax stays sharded
and the backward (``softmax - onehot`` on the local shard) is written by hand, in fp32.
``group=None`` means no parallelism.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .comm import ProcessGroup, all_reduce, get_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, real_vocab):
        v_local = logits.shape[-1]
        start = get_rank(group) * v_local
        end = start + v_local
        x = logits.float()
        if real_vocab is not None and real_vocab < end:
            pad_cols = torch.arange(start, end, device=x.device) >= real_vocab
            x = x.masked_fill(pad_cols, float("-inf"))  # out of place: never touch `logits`
        gmax = all_reduce(x.max(dim=-1).values, group, op=dist.ReduceOp.MAX)
        x = x - gmax.unsqueeze(-1)  # new tensor, ours to modify

        ignored = target == ignore_index
        not_here = (target < start) | (target >= end) | ignored
        local_t = (target.long() - start).masked_fill(not_here, 0)
        target_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        both = all_reduce(torch.stack([target_logit, sum_exp]), group)  # one collective for two sums
        target_logit, sum_exp = both[0], both[1]
        loss = (torch.log(sum_exp) - target_logit).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, not_here, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, not_here, ignored = ctx.saved_tensors
        g = grad_loss.float().masked_fill(ignored, 0.0)
        grad = softmax * g.unsqueeze(-1)  # new tensor: saved softmax stays intact (retain_graph)
        onehot_g = (-g).masked_fill(not_here, 0.0)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), onehot_g.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 group: Optional[ProcessGroup], *, ignore_index: int = -100,
                                 real_vocab: Optional[int] = None) -> torch.Tensor:
    """Per-token cross entropy from vocab-sharded logits, never gathering them.

    ``logits``: ``(..., V/tp)``, this rank's vocab columns (rank order, as produced by a
    ``ColumnParallelLinear`` LM head without ``gather_output``). ``target``: ``(...)`` int64
    ids in the full (padded) vocab, identical on all TP ranks. Returns the fp32 loss of
    shape ``target.shape``, identical on all ranks (0 where ``target == ignore_index``).
    ``real_vocab``: columns ``>= real_vocab`` (vocab padding) are excluded from the softmax.
    Collective over ``group``.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and "
                         f"target {tuple(target.shape)} disagree")
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index, real_vocab)


def vocab_parallel_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                        group: Optional[ProcessGroup], *, ignore_index: int = -100,
                                        denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean fp32 cross entropy of `h @ weight.T` with `weight` this rank's vocab rows (rank
    order), fused and chunked (`pretrain.model.loss`): neither the logits nor the softmax are
    held whole. Per chunk of tokens: an all-reduce of the row max and one of [target logit,
    sum of exps] over `group`. The gradient of h is this shard's part: pass h through
    `copy_to_tensor_model_parallel_region` (or the sequence-parallel gather) first."""
    from pretrain.model.loss import linear_cross_entropy

    return linear_cross_entropy(h, weight, target, ignore_index=ignore_index,
                                reduce_max=lambda t: all_reduce(t, group, op=dist.ReduceOp.MAX),
                                reduce_sum=lambda t: all_reduce(t, group),
                                vocab_start=get_rank(group) * weight.shape[0], denominator=denominator)
