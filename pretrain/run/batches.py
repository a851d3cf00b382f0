"""What a step feeds the model: windows of seq_len + 1 tokens split into inputs and targets, the
packed-document segments and loss mask (`pretrain.model.documents`), and, with
data.eod_mask_loss, the divisor that makes the loss the mean over the unmasked tokens of the
whole global batch.

Why a divisor: DeepSpeed averages the micro-batch losses over the gradient-accumulation steps
and the gradients over the data-parallel replicas. With each micro-batch's summed token loss
divided by N / (grad_accum * dp), N the unmasked targets of the global batch (one all-reduce of
a count per step, on the device), the gradient is that of (sum of all token losses) / N, and
the logged loss is that mean: the same number in every layout and split into micro-batches.
Without masked targets every micro-batch has the same count and the plain per-micro-batch
mean is already that, so nothing is counted then.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist

from pretrain.config.schema import Config
from pretrain.errors import UserError
from pretrain.model.documents import IGNORE_INDEX, Documents, choose_path


def run_documents(cfg: Config, data, device: torch.device) -> Optional[Documents]:
    """The run's document options (None when all three are off): the EOD id from the data
    (`pretrain.data.eod`), the attention path for the device."""
    from pretrain import faults
    from pretrain.data.eod import resolve_eod

    d = cfg.data
    if not d.separates_documents():
        return None
    paths = [] if d.synthetic else [s.path for ds in (data.train, data.valid, data.test) if ds is not None
                                    for s in ds.sources]
    eod = resolve_eod(d, paths, data.vocab_size)
    # The fault `no_doc_mask` builds the attention without the mask: the self-check must refuse it.
    path = "causal" if "no_doc_mask" in faults.EVENTS else choose_path(d.document_attention, device)
    if d.reset_attention_mask and path == "flex" and device.type != "cuda":
        raise UserError(f"data.document_attention 'flex' needs CUDA (FlexAttention has no backward on {device.type}); "
                        "set it to 'auto' or 'sdpa'")
    return Documents(eod, d.reset_attention_mask, d.reset_position_ids, d.eod_mask_loss, path)


def pair(batch: torch.Tensor, docs: Optional[Documents]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a (B, T + 1) window batch, the targets masked where docs say so."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    return inputs, (labels if docs is None else docs.labels(inputs, labels))


def split(batch: torch.Tensor, docs: Optional[Documents]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(inputs, targets, the model's keyword arguments doc/pos) of a (B, T + 1) window batch."""
    inputs, labels = pair(batch, docs)
    if docs is None:
        return inputs, labels, {}
    doc, pos = docs.segments(inputs)
    return inputs, labels, {k: v for k, v in (("doc", doc), ("pos", pos)) if v is not None}


def pipe_pairs(batches: Iterator[torch.Tensor], docs: Optional[Documents]) -> Iterator[tuple]:
    """(inputs, targets) per micro-batch, as DeepSpeed's pipeline reads them (the first stage
    computes the segments from the inputs itself)."""
    return (pair(b, docs) for b in batches)


def needs_denominator(docs: Optional[Documents]) -> bool:
    return docs is not None and docs.mask_loss


def step_micro_batches(source: Iterator, pipe: bool, layout, docs: Optional[Documents],
                       dp_group) -> tuple[Iterator, Optional[torch.Tensor]]:
    """One optimizer step's micro-batches from `source` (already on the device, `RunData.train_batches`)
    -- the (inputs, labels) pairs themselves for a pipeline, (inputs, labels, model keyword
    arguments) otherwise -- and the loss divisor:
    None (each micro-batch's own count), or with data.eod_mask_loss the global batch's
    (`global_denominator`; the step's micro-batches are read first to count them)."""
    gas = layout.grad_accum
    micro = source if pipe else (split(next(source), docs) for _ in range(gas))
    if not needs_denominator(docs):
        return micro, None
    micro = [next(micro) for _ in range(gas)]
    return iter(micro), global_denominator([m[1] for m in micro], dp_group, gas, layout.dp)


def global_denominator(labels: list[torch.Tensor], group, grad_accum: int, dp: int) -> torch.Tensor:
    """N / (grad_accum * dp), N the targets that are not IGNORE_INDEX in the global batch
    (`labels`: this rank's micro-batches of the step; summed over `group`, the data-parallel
    replicas). A 0-d fp32 tensor on the device; no host read."""
    from pretrain.run.engine import comm_device

    count = torch.stack([(t != IGNORE_INDEX).sum() for t in labels]).sum().to(torch.float64)
    if dp > 1:
        count = count.to(comm_device())
        dist.all_reduce(count, group=group)
        count = count.to(labels[0].device)
    return (count.clamp(min=1) / (grad_accum * dp)).float()
