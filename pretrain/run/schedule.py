"""Learning-rate schedule: linear warmup, then cosine / linear / constant / warmup-stable-decay.

A pure function of the step, so resume needs no scheduler state: the trainer sets
the rate of every parameter group before each optimizer step.
"""
from __future__ import annotations

import math

from pretrain.config.schema import OptimConfig, ScheduleConfig


def lr_at(step: int, optim: OptimConfig, sched: ScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = optim.lr, sched.min_lr
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    decay_steps = sched.decay_steps if sched.decay_steps is not None else max_steps - sched.warmup_steps
    if sched.kind == "constant" or decay_steps <= 0:
        return peak
    t = min(1.0, (step - sched.warmup_steps) / decay_steps)  # progress through the decay, 0..1
    if sched.kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if sched.kind == "linear":
        return peak + (floor - peak) * t
    if sched.kind == "wsd":  # stable at peak, then a linear cool-down over the last fraction
        start = 1.0 - sched.wsd_decay_fraction
        return peak if t <= start else peak + (floor - peak) * (t - start) / sched.wsd_decay_fraction
    raise ValueError(f"unknown schedule.kind {sched.kind!r}")  # validate.py rejects this earlier
