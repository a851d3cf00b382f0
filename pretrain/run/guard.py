"""The guard's device-side and run-directory state (config section `guard`, docs/GUARD.md).

* `SpikeWindow` -- the rolling window of the last `spike_window` stepped (loss, global grad
  norm) pairs, kept on the device, so a spike is called with no host read: the optimizer
  (`pretrain.run.engine.GuardedAdamW`) asks it at step time with values every rank shares.
* `SkipLedger` -- the sample ranges a rollback skipped, in <train.out_dir>/guard/skipped_samples.json:
  a resume from the checkpoint a rollback returned to jumps the same samples, so the run after
  a kill is the run without it.
* `StragglerWatch` -- which rank is slowest in a logging window, from every rank's busy seconds.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

OK, NONFINITE, SPIKE = 0.0, 1.0, 2.0  # the optimizer's per-step reason (a 0-d device tensor)


class SpikeWindow:
    """The last `size` stepped values of (loss, grad norm) on `device`, and the spike test."""

    def __init__(self, size: int, sigma: float, device: torch.device):
        self.size, self.sigma = size, sigma
        self.values = torch.zeros((2, size), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # filled entries, at most size
        self.next = torch.zeros((), dtype=torch.int64, device=device)  # the slot written next
        self._slots = torch.arange(size, device=device)

    def spiking(self, x: torch.Tensor) -> torch.Tensor:
        """Whether (loss, norm) `x` is more than sigma standard deviations above the window's mean
        in either value (a bool tensor); never before half the window is filled."""
        filled = (self._slots < self.count).to(self.values.dtype)
        n = self.count.clamp(min=1).to(self.values.dtype)
        mean = (self.values * filled).sum(1) / n
        std = ((((self.values - mean[:, None]) * filled) ** 2).sum(1) / n).sqrt()
        armed = self.count * 2 >= self.size
        return armed & (x > mean + self.sigma * std).any()

    def add(self, x: torch.Tensor, keep: torch.Tensor) -> None:
        """Append `x` where `keep` (a bool tensor): skipped steps stay out of the window."""
        slot = self.next.reshape(1)
        old = self.values.index_select(1, slot).reshape(2)
        self.values.index_copy_(1, slot, torch.where(keep, x, old).reshape(2, 1))
        step = keep.to(torch.int64)
        self.count = (self.count + step).clamp(max=self.size)
        self.next = (self.next + step) % self.size

    def state(self) -> dict:
        """A host copy for the checkpoint's state.json (read at save time only)."""
        return {"values": self.values.tolist(), "count": int(self.count), "next": int(self.next)}

    def load(self, state: dict | None) -> None:
        if not state or len(state["values"][0]) != self.size:
            return  # no window saved, or another guard.spike_window: start empty
        dev = self.values.device
        self.values = torch.tensor(state["values"], dtype=torch.float64, device=dev)
        self.count = torch.tensor(state["count"], dtype=torch.int64, device=dev)
        self.next = torch.tensor(state["next"], dtype=torch.int64, device=dev)


class SkipLedger:
    """Rollbacks of this run: [{'step', 'from_sample', 'to_sample'}], oldest first. A run that
    resumes at `step` having consumed `from_sample` samples goes on at `to_sample`."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "guard" / "skipped_samples.json"
        self.rollbacks = json.loads(self.path.read_text())["rollbacks"] if self.path.is_file() else []

    def record(self, step: int, from_sample: int, to_sample: int, write: bool) -> None:
        """Add a rollback (written atomically by rank 0: `write`)."""
        from pretrain.checkpoint.store import write_atomic

        self.rollbacks.append({"step": step, "from_sample": from_sample, "to_sample": to_sample})
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"rollbacks": self.rollbacks}, indent=1) + "\n")

    def jump(self, step: int, consumed: int) -> int:
        """Where the data goes on after resuming at (`step`, `consumed`): past every recorded
        skip that starts there (the newest last: a second rollback to the same checkpoint jumps further)."""
        for r in self.rollbacks:
            if r["step"] == step and r["from_sample"] <= consumed < r["to_sample"]:
                consumed = r["to_sample"]
        return consumed


class StragglerWatch:
    """Which rank is slowest in each logging window, from every rank's busy seconds per step (a
    rank waiting in a collective does not spend them): named once it is slowest by more than
    `threshold` over the median for `windows` windows running."""

    def __init__(self, threshold: float, windows: int):
        self.threshold, self.windows = threshold, windows
        self.run = (None, 0)  # (the rank over the threshold, windows in a row)

    def update(self, busy: list[float]) -> tuple[dict, str | None]:
        """(perf/ scalars, a console line naming the straggler or None) for one window."""
        slowest = max(range(len(busy)), key=busy.__getitem__)
        worst, median = busy[slowest], statistics.median(busy)
        over = worst > (1 + self.threshold) * median
        self.run = (slowest, self.run[1] + 1 if self.run[0] == slowest else 1) if over else (None, 0)
        line = None
        if over and self.run[1] == self.windows:
            line = (f"straggler: rank {slowest} is the slowest for {self.windows} logging windows running "
                    f"({worst * 1e3:.0f} ms of work per step against a median of {median * 1e3:.0f} ms); check its node")
        return {"perf/step_time_max": worst, "perf/step_time_min": min(busy), "perf/slowest_rank": slowest}, line
