"""The auto-resume wrapper's decisions, on stand-in commands (no training: fast).

A stand-in is a small shell script that "commits" checkpoints (step_* dirs with a
manifest.json, what the wrapper watches) and exits with a chosen status.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.launch.autoresume import newest_committed

ROOT = Path(__file__).absolute().parents[1]


def commit(ckpt: Path, step: int) -> None:
    tag = ckpt / f"step_{step:08d}"
    tag.mkdir(parents=True, exist_ok=True)
    (tag / "manifest.json").write_text("{}")


def wrapper(args, script: str, tmp_path: Path, timeout: float = 60, wait: bool = True):
    """Run the wrapper around `bash -c script` (with $CKPT and $ATTEMPTS for the script)."""
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "CKPT": str(ckpt), "ATTEMPTS": str(tmp_path / "attempts")}
    cmd = [sys.executable, "-m", "pretrain.launch.autoresume", "--delay", "0",
           "--checkpoints", str(ckpt), *args, "--", "bash", "-c", "echo $PRETRAIN_ATTEMPT >> $ATTEMPTS\n" + script]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def attempts(tmp_path: Path) -> list[int]:
    f = tmp_path / "attempts"
    return [int(x) for x in f.read_text().split()] if f.exists() else []


# A script that commits one checkpoint further than the newest one, then fails (progress).
PROGRESS_THEN_FAIL = """
n=$(ls -d $CKPT/step_* 2>/dev/null | wc -l)
mkdir -p $CKPT/step_0000000$((n + 1)) && echo {} > $CKPT/step_0000000$((n + 1))/manifest.json
exit 1
"""


def test_newest_committed_ignores_uncommitted(tmp_path):
    assert newest_committed(tmp_path / "missing") is None
    commit(tmp_path, 3)
    (tmp_path / "step_00000006").mkdir()  # shards written, never committed
    (tmp_path / "step_junk").mkdir()
    assert newest_committed(tmp_path) == 3


def test_success_runs_once(tmp_path):
    proc = wrapper([], "exit 0", tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert attempts(tmp_path) == [1]
    assert "finished" in proc.stdout


@pytest.mark.parametrize("code", [2, 3])
def test_user_error_and_nonfinite_stop_are_not_retried(tmp_path, code):
    proc = wrapper([], f"exit {code}", tmp_path)
    assert proc.returncode == code, proc.stdout
    assert attempts(tmp_path) == [1]
    assert "not retried" in proc.stdout


def test_restarts_while_progressing_up_to_the_limit(tmp_path):
    proc = wrapper(["--max-restarts", "2"], PROGRESS_THEN_FAIL, tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert attempts(tmp_path) == [1, 2, 3]
    assert "no restarts left" in proc.stdout
    assert newest_committed(tmp_path / "ckpt") == 3


def test_restart_without_progress_stops(tmp_path):
    commit(tmp_path / "ckpt", 3)
    proc = wrapper(["--max-restarts", "5"], "exit 1", tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert attempts(tmp_path) == [1, 2]  # the first failure is retried, the fruitless restart is not
    assert "made no progress" in proc.stdout


def test_first_failure_without_checkpoint_is_retried_once(tmp_path):
    proc = wrapper(["--max-restarts", "5"], "exit 7", tmp_path)
    assert proc.returncode == 7, proc.stdout
    assert attempts(tmp_path) == [1, 2]


def test_death_by_signal_is_a_failure(tmp_path):
    proc = wrapper(["--max-restarts", "1"], PROGRESS_THEN_FAIL.replace("exit 1", "kill -9 $$"), tmp_path)
    assert proc.returncode == 128 + 9, proc.stdout
    assert attempts(tmp_path) == [1, 2]


def test_stop_signal_is_passed_on_and_not_restarted(tmp_path):
    script = """
trap 'echo child got USR1; exit 0' USR1
echo ready > $CKPT.ready
while :; do sleep 0.1; done
"""
    proc = wrapper([], script, tmp_path, wait=False)
    ready = Path(str(tmp_path / "ckpt") + ".ready")
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "child got USR1" in out and "stopped on request (SIGUSR1)" in out
    assert attempts(tmp_path) == [1]


def test_checkpoint_dir_and_finished_from_the_command_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 6\n")
    out = tmp_path / "run"
    base = [sys.executable, "-m", "pretrain.launch.autoresume", "--finished", "--",
            "launch/multinode.sh", str(cfg), f"train.out_dir={out}"]
    check = lambda *extra: subprocess.run(base + list(extra), cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    assert check().returncode == 1
    commit(out / "checkpoints", 6)
    assert check().returncode == 0
    assert check("train.max_steps=9").returncode == 1
    assert check("checkpoint.dir=" + str(tmp_path / "elsewhere")).returncode == 1
    bad = check("train.no_such_key=1")
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_help_and_usage_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "pretrain.launch.autoresume", *a],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True)
    h = run("--help")
    assert h.returncode == 0 and "--max-restarts" in h.stdout and "no progress" in h.stdout
    assert run().returncode == 2
    assert run("--max-restarts", "-1", "--", "true").returncode == 2
