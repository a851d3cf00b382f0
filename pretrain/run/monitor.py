"""Run monitoring on rank 0: console lines, TensorBoard scalars, `metrics.jsonl`, optionally W&B.

`metrics.jsonl` holds one JSON object per logged step (the same numbers as TensorBoard),
so scripts and tests can read a run without TensorBoard. After a resume it is rewound to the
checkpoint's step (`rewind`), so a step appears once however often the run was restarted.

Names: the trainer logs `train/loss`, `val/loss`, `perf/...`, `mem/...` (metrics.jsonl and
W&B keep them). TensorBoard sorts its sections by name, so `tensorboard_tags` files the losses
under `loss/` (first, above `mem/` and `perf/`) and adds each loss against tokens seen
(`loss/train_vs_tokens`, `loss/val_vs_tokens`: x axis = consumed tokens, not steps).
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


def throughput(cfg, layout, device: torch.device, flops_per_token: float, steps: int, elapsed: float) -> dict:
    """perf/ and mem/ scalars of a window of `steps` steps in `elapsed` training seconds."""
    elapsed = max(elapsed, 1e-9)
    tokens_per_sec = steps * layout.global_batch_size * cfg.model.seq_len / elapsed
    flops_dev = tokens_per_sec * flops_per_token / layout.world_size
    peak = peak_flops(device, cfg.train.precision, cfg.logging.peak_flops)
    return {"perf/tokens_per_sec": tokens_per_sec, "perf/tflops_per_device": flops_dev / 1e12,
            "perf/mfu": flops_dev / peak if peak else None,
            "perf/step_time_ms": 1e3 * elapsed / steps, "perf/window_steps": steps, **memory_gib(device)}


def memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem/allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"mem/cpu_rss_gib": psutil.Process().memory_info().rss / 2**30}


# TensorBoard tag of a trainer scalar name (others keep their name).
TB_TAGS = {"train/loss": "loss/train", "val/loss": "loss/val", "val/perplexity": "loss/val_perplexity",
           "test/loss": "loss/test", "test/perplexity": "loss/test_perplexity"}
TOKENS = "train/consumed_tokens"


def tensorboard_tags(step: int, scalars: dict, tokens: int | None) -> list[tuple[str, float, int]]:
    """(tag, value, x) for TensorBoard: x is the step, or the tokens seen for the *_vs_tokens curves."""
    out = [(TB_TAGS.get(k, k), v, step) for k, v in scalars.items() if v is not None]
    tokens = scalars.get(TOKENS, tokens)
    if tokens is not None:
        out += [(f"loss/{k.split('/')[0]}_vs_tokens", scalars[k], int(tokens))
                for k in ("train/loss", "val/loss", "test/loss") if scalars.get(k) is not None]
    return out


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _row_step(row: str) -> int | None:
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line of the run that stopped


class Monitor:
    """Writes scalars on rank 0; on other ranks every method is a no-op.

    wandb: None, or {"project": ..., "config": {...}} to also log to Weights & Biases (the
    `wandb` extra; WANDB_MODE=offline writes the run under <out_dir>/wandb without a network).
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, max_steps: int,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.out_dir = Path(out_dir)
        self.tensorboard = tensorboard
        self.writer = None  # opened at the first scalar, after a resume set purge_step
        self.purge_step = None
        self.metrics = None
        self.wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.out_dir / "metrics.jsonl", "a")
        if wandb is not None:
            import wandb as wandb_lib

            self.wandb = wandb_lib.init(project=wandb["project"], config=wandb.get("config"),
                                        dir=str(self.out_dir), name=self.out_dir.name)

    def rewind(self, step: int) -> None:
        """Resumed at `step`: drop what the stopped run logged after it (metrics.jsonl rows now,
        TensorBoard events through purge_step), so no step appears twice."""
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        self.metrics.close()
        rows = path.read_text().splitlines(keepends=True)
        keep = [r if r.endswith("\n") else r + "\n" for r in rows
                if (n := _row_step(r)) is not None and n <= step]
        if keep != rows:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(path)
        self.metrics = open(path, "a")
        self.purge_step = step + 1

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def log(self, step: int, scalars: dict, tokens: int | None = None) -> None:
        """Scalars of `step`; `tokens` = tokens seen so far, unless scalars carry train/consumed_tokens."""
        if not self.enabled:
            return
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.purge_step)
        if self.writer is not None:
            for tag, v, x in tensorboard_tags(step, scalars, tokens):
                self.writer.add_scalar(tag, v, x)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in scalars.items() if v is not None}, step=step)
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
        if self.wandb is not None:
            self.wandb.finish()
        if self.metrics is not None:
            self.metrics.close()
