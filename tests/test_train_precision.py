"""bf16 and optimizer offload through the real trainer (one process, CPU)."""
from __future__ import annotations

import math

import pytest

from train_util import check, losses, run_train

SHORT = ["train.max_steps=3", "checkpoint.interval=0", "model.dropout=0.0"]


def test_bf16_zero1_trains_and_checkpoints(tmp_path):
    out = tmp_path / "bf16"
    check(run_train(out, [*SHORT, "train.precision=bf16", "parallel.zero_stage=1"]))
    got = losses(out)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_zero2_optimizer_offload_matches_zero0(tmp_path):
    ref, off = tmp_path / "zero0", tmp_path / "offload"
    check(run_train(ref, [*SHORT, "parallel.zero_stage=0"]))
    check(run_train(off, [*SHORT, "parallel.zero_stage=2", "parallel.offload_optimizer=true"]))
    a, b = losses(ref), losses(off)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6)
