"""Per-step outcomes of the training loop, kept on the device between boundaries.

Each optimizer step adds its loss and its skip verdict as 0-d device tensors (no copy to the
host); a logging, checkpoint or validation boundary reads them all with one copy (`settle`).
`SkipCount` keeps the host-side tally: skipped steps in a row, from our guard's verdicts only
(`train.max_consecutive_skips`), and fp16 loss-scale events (DeepSpeed's loss scaler skipping
an overflowing step during its warm-up), which neither count as skips nor break a run of them.
"""
from __future__ import annotations

import torch

OK, SKIP, SPIKE, LOSS_SCALE = "ok", "skip", "spike", "loss_scale"


class SkipCount:
    def __init__(self, total: int = 0, spikes: int = 0):
        self.total = total  # our guard's skips over the whole run (saved in checkpoints)
        self.spikes = spikes  # of which spikes (guard.spike_sigma)
        self.in_a_row = 0
        self.worst_run = 0  # the longest run of skips since the last reset_worst()
        self.loss_scale_events = 0  # DeepSpeed's fp16 overflow skips, this process

    def record(self, outcome: str) -> None:
        if outcome == LOSS_SCALE:
            self.loss_scale_events += 1
            return
        if outcome in (SKIP, SPIKE):
            self.total += 1
            self.spikes += outcome == SPIKE
            self.in_a_row += 1
            self.worst_run = max(self.worst_run, self.in_a_row)
        else:
            self.in_a_row = 0

    def reset_worst(self) -> None:
        self.worst_run = self.in_a_row


class StepLedger:
    """The steps since the last boundary: their losses and verdicts, on the device."""

    def __init__(self):
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor | None, str]] = []

    def add(self, step: int, loss: torch.Tensor, verdict: torch.Tensor | None, fp16: bool) -> None:
        """`verdict`: our guard's reason (0-d: 0 stepped, 1 non-finite, 2 spike), or None when DeepSpeed skipped the step
        without calling the optimizer: with fp16 its loss scaler's overflow skip (a loss-scale
        event), otherwise its own non-finite gradient-norm check (a skip)."""
        known = OK if verdict is not None else (LOSS_SCALE if fp16 else SKIP)
        loss = loss.detach().float().reshape(())
        self.steps.append((step, loss, None if verdict is None else verdict.float().reshape(()), known))

    def settle(self) -> list[tuple[int, float, str]]:
        """[(step, loss, outcome)] for the steps since the last call; one device-to-host copy."""
        if not self.steps:
            return []
        dev = self.steps[0][1].device
        zero = torch.zeros((), device=dev)
        values = torch.stack([torch.stack([loss, zero if v is None else v.to(dev)])
                              for _, loss, v, _ in self.steps]).tolist()
        out = [(step, loss, SPIKE if verdict == 2 else SKIP if verdict > 0 else known)
               for (step, _, _, known), (loss, verdict) in zip(self.steps, values)]
        self.steps = []
        return out
