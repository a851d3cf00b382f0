"""Fault injection for the crash-safety tests, read from the PRETRAIN_FAULTS variable.

Comma-separated events, STEP counted as completed optimizer steps:
    nan@STEP:RANK      that rank's loss becomes NaN in the step after STEP
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
