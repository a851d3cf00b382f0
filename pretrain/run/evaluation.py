"""Validation loss of the live engine, in any layout, and the mean over data-parallel replicas."""
from __future__ import annotations

import torch
import torch.distributed as dist


def mean_over_dp(value: float, group, dp: int) -> float:
    """Mean over the data-parallel replicas. Tensor-parallel peers hold the same loss, and a
    pipeline's `train_batch`/`eval_batch` give every stage the last stage's DP-mean loss."""
    from pretrain.run.engine import comm_device

    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, group=group)
    return float(t.item()) / dp


def validation_loss(engine, batches, pipe: bool, eval_steps: int, device: torch.device) -> float:
    """This replica's mean loss over `batches` (micro-batches of seq_len + 1 tokens), the engine
    back in training mode after."""
    engine.eval()
    total, n = 0.0, 0
    if pipe:  # mean over the micro-batches and data-parallel replicas, on every stage
        total = float(engine.eval_batch(((b[:, :-1], b[:, 1:]) for b in batches), num_micro_batches=eval_steps))
        n = 1
    with torch.no_grad():
        for batch in ([] if pipe else batches):
            batch = batch.to(device)
            total += float(engine(batch[:, :-1], batch[:, 1:]))
            n += 1
    engine.train()
    return total / max(n, 1)
