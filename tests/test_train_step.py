"""The training step: throughput windows, one skip verdict per step, host syncs, fp16 events.

Throughput figures (tokens/s, TFLOP/s, MFU, ms/step, ETA) come from the steps actually in each
logging window, with validation and checkpoint time left out and logged as their own scalars.
"""
from __future__ import annotations

import pytest

from train_util import check, metrics, run_train

STEP_SLEEP = 0.25  # faults sleep=: every step takes at least this long


def _windows(out):
    return [m for m in metrics(out) if "perf/step_time_ms" in m]


def test_throughput_windows_count_their_own_steps_and_leave_saves_out(tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["logging.interval=3", "train.max_steps=7", "checkpoint.interval=3",
                          "train.eval_interval=0"], faults=f"sleep={STEP_SLEEP},slow_checkpoint=3"))
    rows = _windows(out)
    assert [m["step"] for m in rows] == [3, 6, 7]
    assert [m["perf/window_steps"] for m in rows] == [3, 3, 1]
    tokens_per_step = 8 * 32  # TINY: global batch 8 x seq_len 32
    for i, m in enumerate(rows):
        # each step sleeps STEP_SLEEP after it (the first window holds one sleep fewer): dividing
        # by the interval (3) in the last, 1-step window would give a third of that
        n = m["perf/window_steps"]
        assert m["perf/step_time_ms"] >= 1e3 * STEP_SLEEP * ((n - 1) / n if i == 0 else 1), m
        # the 3 s save at step 3 falls in the window 4-6 and must not count: it would add >= 1000 ms/step
        assert m["perf/step_time_ms"] < 1e3 * STEP_SLEEP + 900, m
        assert m["perf/tokens_per_sec"] * m["perf/step_time_ms"] / 1e3 == pytest.approx(tokens_per_step)
    saves = {m["step"]: m["perf/checkpoint_seconds"] for m in metrics(out) if "perf/checkpoint_seconds" in m}
    assert set(saves) == {3, 6, 7} and all(s >= 3.0 for s in saves.values())


def test_first_window_after_a_resume_off_the_interval(tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["logging.interval=3", "train.max_steps=4", "checkpoint.interval=0"]))
    log = check(run_train(out, ["logging.interval=3", "train.max_steps=7", "checkpoint.interval=0"],
                          faults=f"sleep={STEP_SLEEP}"))
    assert "resumed from" in log
    rows = [m for m in _windows(out) if m["step"] > 4]
    assert [(m["step"], m["perf/window_steps"]) for m in rows] == [(6, 2), (7, 1)]
    assert rows[0]["perf/step_time_ms"] >= 1e3 * STEP_SLEEP / 2  # 2 steps, 1 sleep (see above)
    assert rows[1]["perf/step_time_ms"] >= 1e3 * STEP_SLEEP
