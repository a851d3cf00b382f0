"""Many short trainer runs without paying torch's import each time: this process imports the
trainer once, then forks a child per run that calls `pretrain.train.main` (the same code
path as `python -m pretrain.train` after its imports). Used by the stop-signal trials.

    python tests/fork_trainer.py SPEC.json RESULT.json

SPEC: {"trials": N, "seed": S, "base": [overrides], "root": DIR, "lanes": L (default 2)}.
For each trial: a run is stopped by SIGTERM after its first step, then hit again by SIGTERM
or SIGUSR1 0-300 ms after it printed that it saved and is exiting; then the run is resumed to
the end. L trials run at once. One straight run gives the reference.
RESULT: {"straight": {step: loss}, "trials": [{"gap_ms", "second", "stop_rc", "resume_rc",
"stopped_at", "losses"}]}.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import deepspeed.runtime.engine  # noqa: F401  (imported once, before any fork)
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (DeepSpeed's ZeRO check imports it: seconds)
import pretrain.run.engine  # noqa: F401
import pretrain.train
import torch.utils.tensorboard  # noqa: F401
from pretrain import faults


def _losses(out: Path) -> dict:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}


def _spawn(args: list[str], log: Path, sleep: bool = True) -> int:
    pid = os.fork()
    if pid == 0:  # child
        try:
            if not sleep:
                faults.EVENTS.pop("sleep", None)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = pretrain.train.main(args)
        except BaseException:
            traceback.print_exc()
            rc = 1
        _exit_like_python(rc)
    return pid


def _exit_like_python(rc: int) -> None:
    """What the interpreter's shutdown does to stop signals, then exit. Python puts its own
    handlers back to the default action (SIG_DFL: a signal now kills) and keeps SIG_IGN; torch
    and DeepSpeed teardown then take a while, a window stood for here by 0.4 s. (A real shutdown
    takes seconds in a forked child; test_train_guards also runs real processes.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)
    time.sleep(0.4)
    os._exit(rc)


class Child:
    """A forked run; `done()` polls it without blocking and keeps its exit code."""

    def __init__(self, args: list[str], log: Path, sleep: bool = True):
        self.log = log
        self.pid = _spawn(args, log, sleep)
        self.rc = None

    def done(self) -> bool:
        if self.rc is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(st)
        return self.rc is not None

    def said(self, text: str) -> bool:
        return self.log.exists() and text in self.log.read_text(errors="replace")


def _until(cond, child: Child, timeout: float = 180):
    """Yield (let other trials run) until cond() or the child exits; True when cond() held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if child.done():
            return cond()
        yield
    return False


class Trial:
    def __init__(self, root: Path, i: int, base: list[str], rng: random.Random):
        self.out = root / f"t{i:02d}"
        self.args = [*base, f"train.out_dir={self.out}"]
        self.gap = rng.uniform(0.0, 0.3)
        self.second = rng.choice(["SIGTERM", "SIGUSR1"])
        self.res = {"gap_ms": round(self.gap * 1000), "second": self.second}

    def stop_run(self):
        c = Child(self.args, self.out.with_suffix(".log"))
        self.res["first_step_seen"] = yield from _until(lambda: bool(_losses(self.out)), c)
        if not c.done():
            os.kill(c.pid, signal.SIGTERM)
        self.res["stop_seen"] = yield from _until(lambda: c.said("stop requested"), c)
        t = time.time() + self.gap  # the second signal lands in the shutdown
        yield from _until(lambda: time.time() >= t, c)
        if not c.done():  # not reaped yet: the pid is still this child's (a zombie ignores it)
            os.kill(c.pid, getattr(signal, self.second))
        yield from _until(lambda: False, c)
        self.res["stop_rc"] = c.rc
        latest = self.out / "checkpoints" / "latest"
        self.res["stopped_at"] = int(latest.read_text().split("_")[1]) if latest.exists() else None

    def resume_run(self):
        c = Child(self.args, self.out.with_suffix(".log"), sleep=False)
        yield from _until(lambda: False, c)
        self.res["resume_rc"] = c.rc
        self.res["losses"] = _losses(self.out)


def _run_all(jobs, lanes: int) -> None:
    """Step the generator jobs, at most `lanes` at once (each polls its own child)."""
    todo, active = list(jobs), []
    while todo or active:
        while todo and len(active) < lanes:
            active.append(todo.pop(0))
        for job in list(active):
            try:
                next(job)
            except StopIteration:
                active.remove(job)
        time.sleep(0.005)


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    root, base = Path(spec["root"]), spec["base"]
    rng = random.Random(spec["seed"])
    straight = root / "straight"
    ref = Child([*base, f"train.out_dir={straight}"], straight.with_suffix(".log"), sleep=False)
    _run_all([_until(lambda: False, ref)], 1)
    trials = [Trial(root, i, base, rng) for i in range(spec["trials"])]
    lanes = int(spec.get("lanes", 2))
    _run_all([t.stop_run() for t in trials], lanes)
    _run_all([t.resume_run() for t in trials], lanes)
    result = {"straight_rc": ref.rc, "straight": _losses(straight), "trials": [t.res for t in trials]}
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
