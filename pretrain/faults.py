"""Fault injection for the crash-safety tests, read from the PRETRAIN_FAULTS variable.

Comma-separated events, STEP counted as completed optimizer steps:
    nan@STEP:RANK      that rank's loss becomes NaN in the step after STEP
    grad_inf@STEP:RANK that rank's gradient of one parameter (its last 1-D one: a norm gain or
                       bias, in the no-decay group) gets an inf in the step after STEP; the
                       loss stays finite
    kill@STEP:RANK     that rank SIGKILLs itself after completing STEP (checkpoint included)
    kill_in_save@STEP  rank 0 SIGKILLs itself inside the save of STEP, after DeepSpeed
                       wrote its shards and before the commit (manifest, latest)
    sleep=SECONDS      sleep after every step (makes signal tests deterministic)
    slow_checkpoint=SECONDS, slow_validation=SECONDS
                       sleep that long at the start of every checkpoint save / validation
                       (tests that throughput windows leave that time out)
Unset in normal runs; every check is a dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import time


def _parse(spec: str) -> dict:
    events = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item:
            key, value = item.split("=", 1)
            events[key] = float(value)
            continue
        name, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        events[(name, int(step), int(rank or 0))] = True
    return events


EVENTS = _parse(os.environ.get("PRETRAIN_FAULTS", ""))


def active(name: str, step: int, rank: int = 0) -> bool:
    return (name, step, rank) in EVENTS


def poison_grad(model, step: int, rank: int = 0) -> None:
    """grad_inf@STEP:RANK: put an inf into one element of one parameter's gradient this step."""
    if not active("grad_inf", step, rank):
        return
    param = [p for p in model.parameters() if p.requires_grad and p.dim() == 1][-1]
    handle = None

    def hook(grad):
        handle.remove()  # once
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad

    handle = param.register_hook(hook)


def kill_if(name: str, step: int, rank: int = 0) -> None:
    if active(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def after_step() -> None:
    if "sleep" in EVENTS:
        time.sleep(EVENTS["sleep"])


def pause(what: str) -> None:
    """Sleep for slow_<what>=SECONDS (what: checkpoint, validation) when set."""
    if f"slow_{what}" in EVENTS:
        time.sleep(EVENTS[f"slow_{what}"])
