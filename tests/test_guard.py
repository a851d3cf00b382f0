"""The `guard` section (docs/GUARD.md): spikes skipped, streaks of skipped steps rolled back past
their data (exactly, across a kill), stragglers named, with faults from pretrain/faults.py."""
from __future__ import annotations

import json
import math

import pytest

from train_util import check, losses, metrics, run_train

SPIKE = ["train.max_steps=36", "checkpoint.interval=0", "guard.spike_window=20", "train.eval_steps=1"]


# (processes, overrides, the rank whose loss is changed: a pipeline's last stage holds the loss)
LAYOUTS = {"one": (1, [], 0), "dp2": (2, ["parallel.zero_stage=1"], 0),
           "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=0"], 1)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spike_is_skipped_like_a_nonfinite_step(tmp_path, layout):
    """spike@30:R (rank R's loss x100 in step 31) is skipped by the 6-sigma test, every rank
    agreeing; the run goes on exactly as one whose step 31 was skipped for a NaN loss (the same
    batch consumed, nothing applied)."""
    nproc, overrides, rank = LAYOUTS[layout]
    spiked = check(run_train(tmp_path / "spike", SPIKE + overrides, nproc=nproc, faults=f"spike@30:{rank}"))
    assert "step 31: loss or gradient norm over 6 sigma of its window, step skipped" in spiked
    nan = check(run_train(tmp_path / "nan", SPIKE + overrides, nproc=nproc, faults=f"nan@30:{rank}"))
    assert "step 31: non-finite loss or gradient, step skipped" in nan
    a, b = losses(tmp_path / "spike"), losses(tmp_path / "nan")
    assert [a[s] for s in range(32, 37)] == [b[s] for s in range(32, 37)]  # exact
    assert all(math.isfinite(a[s]) for s in range(32, 37))
    last = {k: v for m in metrics(tmp_path / "spike") for k, v in m.items()}
    other = {k: v for m in metrics(tmp_path / "nan") for k, v in m.items()}
    assert last["train/skipped_steps/spike"] == other["train/skipped_steps/spike"] + 1
    assert other["train/skipped_steps/nonfinite"] == last["train/skipped_steps/nonfinite"] + 1


# Samples of steps 20..40 are NaN. Checkpoints every 10 steps; 12 skips in a row roll back: at
# step 31, to step 30, skipping step 31's samples; steps 31..39 then read the poisoned samples of
# the first run's steps 32..40 (9 skips, fewer than 12) and the rest is clean: one rollback.
BAD = ["train.max_steps=46", "checkpoint.interval=10", "guard.rollback_after=12", "guard.spike_sigma=0",
       "train.eval_steps=1"]


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    out = tmp_path_factory.mktemp("rolled") / "run"
    return out, check(run_train(out, BAD, faults="bad_data@20-40"))


def test_nan_streak_rolls_back_once_and_finishes(rolled):
    out, log = rolled
    assert log.count("guard: 12 skipped steps in a row; rolled back to step_00000030 (step 30)") == 1
    gbs = 8
    record = json.loads((out / "guard" / "skipped_samples.json").read_text())
    assert record == {"rollbacks": [{"step": 30, "from_sample": 30 * gbs, "to_sample": 31 * gbs}]}
    steps = losses(out)
    assert max(steps) == 46
    assert all(math.isfinite(steps[s]) for s in range(40, 47))  # past the poisoned samples
    assert all(math.isnan(steps[s]) for s in range(31, 40))  # the rest of them, skipped
    assert [m["guard/rollbacks"] for m in metrics(out) if "guard/rollbacks" in m] == [1]


def test_kill_after_a_rollback_resumes_exactly(rolled, tmp_path):
    """Killed at step 35 after the rollback (the newest commit is step 30 of before it): the resume
    skips the same samples (guard/skipped_samples.json) and every loss equals the unkilled run's."""
    out = tmp_path / "run"
    killed = run_train(out, BAD, faults="bad_data@20-40,kill@35:0")
    assert killed.returncode != 0
    resumed = check(run_train(out, BAD, faults="bad_data@20-40"))
    assert "resumed from" in resumed and "(samples 240-247 skipped by a rollback)" in resumed
    a, b = losses(out), losses(rolled[0])
    assert a.keys() == b.keys()
    assert all(a[s] == b[s] or (math.isnan(a[s]) and math.isnan(b[s])) for s in a)


def test_no_rollback_left_stops_with_one_line(tmp_path):
    proc = run_train(tmp_path / "run", [*BAD, "guard.max_rollbacks=0"], faults="bad_data@20-40")
    log = check(proc, rc=3)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "guard.max_rollbacks=0" in errors[0] and "Traceback" not in log


def test_slow_rank_is_named(tmp_path):
    """slow=0.3:1: rank 1 works 0.3 s more per step; the others wait for it in collectives, which
    is not work, so its busy time stands out."""
    out = tmp_path / "run"
    log = check(run_train(out, ["train.max_steps=8", "logging.interval=2", "checkpoint.interval=0",
                                "guard.straggler_windows=3", "train.eval_steps=1"], nproc=2, faults="slow=0.3:1"))
    assert "straggler: rank 1 is the slowest for 3 logging windows running" in log
    rows = [m for m in metrics(out) if "perf/step_time_max" in m]
    assert [m["step"] for m in rows] == [2, 4, 6, 8]
    assert all(m["perf/slowest_rank"] == 1 and m["perf/step_time_max"] > 0.3 > m["perf/step_time_min"]
               for m in rows)


def test_hang_writes_stacks_and_every_rank_exits(tmp_path):
    """hang@5:1 on 2 ranks, guard.step_timeout=15: rank 1 sleeps inside step 6, rank 0 waits for it
    in a collective. Both exit non-zero by themselves (not killed by a launcher) within 60 s, and
    rank 1's stacks name the hanging frame."""
    import os
    import subprocess
    import sys
    import time

    from dist_util import free_port
    from train_util import TINY

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PRETRAIN_FAULTS": "hang@5:1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "pretrain.train", *TINY, f"train.out_dir={out}", "train.max_steps=20",
           "guard.step_timeout=15", "guard.startup_timeout=120"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    t0, logs = time.monotonic(), []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, 120 - (time.monotonic() - t0)))[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    # Start-up and 5 steps take seconds; the ranks then exit on the 15 s deadline, well within 60 s.
    assert time.monotonic() - t0 < 75, time.monotonic() - t0
    hang_lines = [line for line in logs[0].splitlines() if line.startswith("hang:")]
    assert hang_lines and "did not arrive" in hang_lines[0] and "[1]" in hang_lines[0], logs[0][-3000:]
    stacks = (out / "hang" / "rank1.txt").read_text()
    assert "_hang_forever" in stacks and (out / "hang" / "rank0.txt").is_file()


def test_hang_under_local_sh_is_restarted_by_auto_resume_and_finishes(tmp_path):
    """launch/local.sh under the auto-resume wrapper: rank 1 hangs in step 6 (once: the marker of
    PRETRAIN_FAULTS_ONCE), every rank exits on guard.step_timeout, the wrapper restarts the job,
    which resumes from the step-3 checkpoint and finishes."""
    import sys

    from launch_util import LAUNCH, launch_env, run, write_tiny_config
    from launch_util import check as launch_check

    config = write_tiny_config(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.launch.autoresume", "--max-restarts", "2", "--",
           LAUNCH / "local.sh", config, f"train.out_dir={out}", "guard.step_timeout=10", "guard.startup_timeout=120"]
    proc = run(cmd, launch_env(tmp_path / "logs", NPROC_PER_NODE=2, PRETRAIN_FAULTS="hang@5:1",
                               PRETRAIN_FAULTS_ONCE=tmp_path / "once"), timeout=240)
    console = launch_check(proc)
    assert "autoresume: finished (attempt 2" in console, console[-3000:]
    assert "resumed from" in console and "step_00000003" in console
    assert (out / "hang" / "rank1.txt").is_file()
    assert max(losses(out)) == 8
