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
    spike@STEP:RANK    that rank's loss (and so its gradient) is multiplied by 100 in the step
                       after STEP: a finite spike for guard.spike_sigma
    hang@STEP:RANK     that rank sleeps forever inside the step after STEP (guard.step_timeout)
    slow=SECONDS:RANK  that rank busy-works SECONDS more in every step (a straggler)
    bad_data@FROM-TO   the samples that steps FROM..TO read in a run that skips nothing are
                       poisoned: a step reading any of them has a NaN loss on every rank. By
                       sample, so a rollback that skips them trains on cleanly.
    slow_checkpoint=SECONDS, slow_validation=SECONDS
                       sleep that long at the start of every checkpoint save / validation
                       (tests that throughput windows leave that time out)
With PRETRAIN_FAULTS_ONCE=DIR, hang@ fires once per job: the rank that hangs leaves a marker
in DIR, so a run restarted by launch/'s auto-resume goes on past that step.
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
            seconds, _, rank = value.partition(":")
            events[key] = (float(seconds), int(rank)) if rank else float(seconds)
            continue
        name, _, where = item.partition("@")
        if "-" in where:  # a step range
            first, _, last = where.partition("-")
            events[name] = (int(first), int(last))
            continue
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


def _hang_forever() -> None:
    """hang@STEP:RANK: what a rank stuck in a kernel or a lost collective looks like from Python."""
    while True:
        time.sleep(1.0)


def _first_time(event: str) -> bool:
    """False when PRETRAIN_FAULTS_ONCE names a directory where `event` already fired; else
    leaves the marker there (if set) and returns True."""
    once = os.environ.get("PRETRAIN_FAULTS_ONCE")
    if not once:
        return True
    marker = os.path.join(once, event.replace("@", "_at_").replace(":", "_rank"))
    if os.path.exists(marker):
        return False
    os.makedirs(once, exist_ok=True)
    open(marker, "w").close()
    return True


def in_step(step: int, rank: int) -> None:
    """Inside the step after `step` completed steps: hang@ and slow= faults of this rank."""
    if active("hang", step, rank) and _first_time(f"hang@{step}:{rank}"):
        _hang_forever()
    slow = EVENTS.get("slow")
    if slow and slow[1] == rank:
        end = time.thread_time() + slow[0]
        while time.thread_time() < end:  # busy (CPU) work, as a slow node's compute is
            pass


def loss_factor(step: int, rank: int, first_sample: int, global_batch: int) -> float:
    """The factor on this rank's loss in the step after `step` completed steps, which reads global
    samples from `first_sample` on: NaN for nan@ and bad_data@, 100 for spike@, else 1."""
    if active("nan", step, rank) or bad_samples(first_sample, global_batch, global_batch):
        return float("nan")
    if active("spike", step, rank):
        return 100.0
    return 1.0


def bad_samples(first: int, count: int, global_batch: int) -> bool:
    """bad_data@FROM-TO: whether global samples [first, first + count) meet the samples that
    steps FROM..TO (1-based) read in a run that skips nothing (global_batch samples a step)."""
    bad = EVENTS.get("bad_data")
    if not bad:
        return False
    lo, hi = (bad[0] - 1) * global_batch, bad[1] * global_batch
    return first < hi and lo < first + count
