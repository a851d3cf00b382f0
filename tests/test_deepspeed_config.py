"""The DeepSpeed config the trainer hands to deepspeed.initialize: batch arithmetic, precision,
ZeRO and offload, pass-through merge, and DeepSpeed's own config object accepting it."""
from __future__ import annotations

import pytest

from pretrain.config import deepspeed_config, resolve
from test_config import _cfg


def _ds_accepts(ds: dict, dp: int, monkeypatch) -> None:
    """Construct DeepSpeed's own config object (its batch and pydantic checks), without a
    process group: DeepSpeedConfig reads the data-parallel size from deepspeed.comm, which
    we stub to report `dp` ranks."""
    from deepspeed.runtime import config as ds_config_mod

    monkeypatch.setattr(ds_config_mod.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config_mod.dist, "get_world_size", lambda *a, **k: dp)
    parsed = ds_config_mod.DeepSpeedConfig(ds)
    assert parsed.world_size == dp
    assert parsed.train_batch_size == ds["train_batch_size"]
    assert parsed.gradient_accumulation_steps == ds["gradient_accumulation_steps"]
    assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]


@pytest.mark.parametrize("overrides, world, gpu", [
    ([], 1, False),
    (["train.global_batch_size=32"], 4, False),
    (["parallel.zero_stage=0", "train.precision=bf16"], 2, False),
    (["parallel.zero_stage=2", "parallel.offload_optimizer=true", "train.precision=bf16"], 2, True),
    (["parallel.zero_stage=3", "train.precision=fp16", "train.device=auto", "optim.grad_clip=0"], 4, True),
])
def test_deepspeed_config(overrides, world, gpu, monkeypatch):
    cfg = _cfg(*overrides)
    layout = resolve(cfg, world, None, cuda_available=gpu)
    ds = deepspeed_config(cfg, layout)
    assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"]
                                      * ds["gradient_accumulation_steps"] * layout.dp)
    assert ds["train_batch_size"] == layout.global_batch_size
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage
    assert ds["bf16"]["enabled"] == (cfg.train.precision == "bf16")
    assert ds["fp16"]["enabled"] == (cfg.train.precision == "fp16")
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
    if cfg.parallel.offload_optimizer:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    else:
        assert "offload_optimizer" not in ds["zero_optimization"]
    _ds_accepts(ds, layout.dp, monkeypatch)


def test_deepspeed_passthrough_deep_merge(monkeypatch):
    cfg = _cfg("parallel.zero_stage=2", "deepspeed.zero_optimization.reduce_bucket_size=1e6",
               "deepspeed.communication_data_type=fp32", "deepspeed.bf16.immediate_grad_update=true")
    layout = resolve(cfg, 2, None, cuda_available=False)
    ds = deepspeed_config(cfg, layout)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1_000_000        # overridden
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True  # kept
    assert ds["communication_data_type"] == "fp32"
    assert ds["bf16"] == {"enabled": False, "immediate_grad_update": True}
    assert cfg.deepspeed["zero_optimization"] == {"reduce_bucket_size": 1_000_000}  # not mutated
    _ds_accepts(ds, layout.dp, monkeypatch)
