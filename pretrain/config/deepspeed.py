"""The DeepSpeed JSON config: generated here and nowhere else (one source of truth).

`deepspeed_config(cfg, layout)` maps our schema onto DeepSpeed's keys, then deep-merges
the `deepspeed:` passthrough section over the result (for DeepSpeed keys we do not
model). Keys that we generate from our own fields (batch sizes, ZeRO stage, precision,
clipping, optimizer, scheduler) are rejected in the passthrough by `validate.resolve`.

There is deliberately no "optimizer" or "scheduler" key: the trainer passes its own
torch AdamW to `deepspeed.initialize` and sets the learning rate itself every step.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pretrain.config.schema import Config

if TYPE_CHECKING:  # annotations only: validate -> deepspeed would otherwise be an import cycle
    from pretrain.config.validate import Layout

__all__ = ["deepspeed_config", "deep_merge"]

# We print our own log lines; DeepSpeed's periodic prints would interleave with them.
_NEVER = 2**31 - 1


def deep_merge(base: dict, extra: dict) -> dict:
    """A new dict: `extra` merged over `base`, recursing into dicts present in both."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _zero_section(cfg: Config, layout: Layout) -> dict[str, Any]:
    stage = layout.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    on_gpu = layout.device == "cuda"
    d = cfg.model.d_model
    zero.update({
        "contiguous_gradients": True,
        # Overlapping reduction with the backward pass needs side streams: GPU only.
        "overlap_comm": on_gpu,
        "reduce_scatter": True,
        # DeepSpeed's defaults (5e8 elements); fine for every model size we ship.
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000,
    })
    if stage == 3:
        # Model-aware sizes (the values HF Accelerate derives from the hidden size): buckets
        # of about one d x d matrix, and small parameters (norms, biases) kept unpartitioned.
        zero.update({
            "reduce_bucket_size": d * d,
            "stage3_prefetch_bucket_size": int(0.9 * d * d),
            "stage3_param_persistence_threshold": 10 * d,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
        })
        del zero["allgather_bucket_size"]  # stages 1/2 only
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return zero


def deepspeed_config(cfg: Config, layout: Layout) -> dict:
    """The config dict for `deepspeed.initialize(config=...)`, for a resolved layout."""
    precision = cfg.train.precision
    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        # 0.0 = no clipping in DeepSpeed.
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": _zero_section(cfg, layout),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": _NEVER,
        # Both would synchronize the device: the throughput timer at every micro-step (its
        # default), the breakdown timers when read. We time steps ourselves, at logging.
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if cfg.parallel.offload_optimizer:
        # The trainer's optimizer is torch.optim.AdamW (not DeepSpeedCPUAdam, which needs a
        # compiled extension); DeepSpeed refuses a client optimizer with offload unless told.
        ds["zero_force_ds_cpu_optimizer"] = False
    return deep_merge(ds, cfg.deepspeed)
