"""Run monitoring on rank 0: console lines, TensorBoard scalars, and `metrics.jsonl`.

`metrics.jsonl` holds one JSON object per logged step (the same numbers as TensorBoard),
so scripts and tests can read a run without TensorBoard.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import torch

# Dense peak FLOP/s per device by name fragment: (bf16/fp16, tf32). Sources: vendor data sheets (SXM parts).
PEAK_FLOPS = {
    "H200": (989.5e12, 494.7e12),
    "H100": (989.5e12, 494.7e12),
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),
}


def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU; None when unknown (CPU without an override)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return tf32 if precision == "fp32" else half
    return None


def memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem/allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"mem/cpu_rss_gib": psutil.Process().memory_info().rss / 2**30}


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Monitor:
    """Writes scalars on rank 0; on other ranks every method is a no-op."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, max_steps: int):
        self.enabled = enabled
        self.max_steps = max_steps
        self.writer = None
        self.metrics = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(out_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.metrics.flush()

    def train_line(self, step: int, s: dict) -> None:
        parts = [f"step {step}/{self.max_steps}", f"loss {s['train/loss']:.4f}",
                 f"lr {s['train/lr']:.2e}", f"gnorm {s['train/grad_norm']:.3f}",
                 f"{s['perf/tokens_per_sec']:,.0f} tok/s", f"{s['perf/tflops_per_device']:.2f} TFLOP/s/dev"]
        if s.get("perf/mfu") is not None:
            parts.append(f"MFU {100 * s['perf/mfu']:.1f}%")
        parts.append(f"{s['perf/step_time_ms']:.0f} ms/step")
        mem = s.get("mem/allocated_gib", s.get("mem/cpu_rss_gib"))
        parts.append(f"mem {mem:.2f} GiB")
        if s.get("train/skipped_steps"):
            parts.append(f"skipped {int(s['train/skipped_steps'])}")
        parts.append(f"ETA {_fmt_duration((self.max_steps - step) * s['perf/step_time_ms'] / 1e3)}")
        self.print(" | ".join(parts))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
