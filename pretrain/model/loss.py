"""Cross entropy fused with the output projection, a chunk of tokens at a time.

`linear_cross_entropy(h, weight, targets)` is `F.cross_entropy(F.linear(h, weight).float(),
targets)` (mean over the targets that are not `ignore_index`) without ever holding the
(tokens x vocab) logits or log-probabilities: each chunk of tokens gets its logits, their
log-sum-exp and, when gradients are wanted, its part of both gradients at once --
d loss / d h (rows of the chunk) and d loss / d weight (summed in fp32) -- which are kept for
the backward pass, scaled there by the incoming gradient. A chunk's logits are dropped
before the next one, so the memory saved for the backward is h's and the weight's size
(`CHUNK_ELEMENTS` bounds the transient chunk), not tokens x vocab x 4 bytes.

Vocabulary sharding (tensor parallelism) plugs in through two reductions over the shards,
`reduce_max` and `reduce_sum` (identity here; `pretrain.parallel.cross_entropy` passes
all-reduces); the gradient of h is then this shard's part, summed by the caller's region op.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pretrain.config.schema import LOSS_CHUNK_ELEMENTS

CHUNK_ELEMENTS = LOSS_CHUNK_ELEMENTS  # logits per chunk (128 MiB in fp32)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, want_grad, reduce_max, reduce_sum, vocab_start, chunk,
                denominator):
        n, v_local = h.shape[0], weight.shape[0]
        valid = target != ignore_index
        count = valid.sum().clamp(min=1).float() if denominator is None else denominator.float()
        local_t = target.long() - vocab_start
        here = valid & (local_t >= 0) & (local_t < v_local)
        local_t = local_t.masked_fill(~here, 0)
        scale = valid.float() / count  # d mean / d per-token loss
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_grad else None
        rows = max(1, chunk // max(v_local, 1))
        fp32 = h.dtype == torch.float32 and weight.dtype == torch.float32
        for s in range(0, n, rows):
            e = min(n, s + rows)
            hc, tc = h[s:e], local_t[s:e]
            logits = (hc @ weight.t()).float()  # (rows, V/tp), as F.linear(...).float()
            gmax = reduce_max(logits.amax(dim=-1))
            logits -= gmax.unsqueeze(-1)
            target_logit = logits.gather(-1, tc.unsqueeze(-1)).squeeze(-1).masked_fill(~here[s:e], 0.0)
            probs = logits.exp_()
            both = reduce_sum(torch.stack([target_logit, probs.sum(dim=-1)]))
            loss += ((both[1].log() - both[0]) * scale[s:e]).sum()
            if want_grad:
                # g = (softmax - onehot) * scale, in place: one pass over the chunk's logits
                probs *= (scale[s:e] / both[1]).unsqueeze(-1)
                probs.scatter_add_(-1, tc.unsqueeze(-1), -(here[s:e].float() * scale[s:e]).unsqueeze(-1))
                if fp32:  # straight into the outputs, no (rows, C) or (V, C) temporaries
                    torch.mm(probs, weight, out=grad_h[s:e])
                    grad_w.addmm_(probs.t(), hc)
                else:
                    g = probs.to(h.dtype)
                    grad_h[s:e] = g @ weight
                    grad_w += (g.t() @ hc).float()
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_loss).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, reduce_max: Optional[Callable] = None,
                         reduce_sum: Optional[Callable] = None, vocab_start: int = 0,
                         chunk: int = CHUNK_ELEMENTS, denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean fp32 cross entropy of `h @ weight.T` (h: (..., C), weight: (V, C) or this rank's
    vocab rows starting at `vocab_start`; targets: (...) ids in the full vocabulary).

    `denominator` (a 0-d tensor): the sum of the token losses is divided by it instead of by the
    number of targets that are not `ignore_index` (the trainer's global-batch token mean)."""
    want = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index, want,
                                     reduce_max or _same, reduce_sum or _same, vocab_start, chunk, denominator)
