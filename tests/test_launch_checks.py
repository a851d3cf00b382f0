"""The launch scripts check the config for their world size before starting any process, and
keep torchrun's own tracebacks off the console (they go to PRETRAIN_LOG_DIR/launcher.log)."""
from __future__ import annotations

import signal
import subprocess

import pytest

from fault_util import one_error_line
from launch_util import LAUNCH, ROOT, kill_tree, launch_env, run, wait_for
from train_util import metrics

pytestmark = pytest.mark.slow


def test_layout_error_is_one_line_before_any_process_starts(tmp_path, config):
    # global batch 8 = micro 2 x accumulation x data-parallel 3: impossible
    env = launch_env(tmp_path / "logs", NPROC_PER_NODE=3)
    proc = run([LAUNCH / "local.sh", config, f"train.out_dir={tmp_path / 'run'}"], env, timeout=300)
    assert proc.returncode == 2, proc.stdout
    one_error_line(proc.stdout, "global_batch_size")
    assert "ChildFailedError" not in proc.stdout
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("rank_*.log"))
    assert not (tmp_path / "run").exists()


def test_deepspeed_passthrough_error_is_one_line_before_start(tmp_path, config):
    env = launch_env(tmp_path / "logs", NPROC_PER_NODE=2)
    proc = run([LAUNCH / "local.sh", config, f"train.out_dir={tmp_path / 'run'}",
                "deepspeed.zero_optimization.stage3_prefech_bucket_size=5"], env, timeout=300)
    assert proc.returncode == 2, proc.stdout
    one_error_line(proc.stdout, "deepspeed.zero_optimization.stage3_prefech_bucket_size")
    assert not (tmp_path / "run").exists()


def test_sigterm_to_local_sh_stops_cleanly_without_a_torchrun_traceback(tmp_path, config):
    out = tmp_path / "run"
    env = launch_env(tmp_path / "logs", NPROC_PER_NODE=2, PRETRAIN_FAULTS="sleep=0.5")
    proc = subprocess.Popen([str(LAUNCH / "local.sh"), str(config), f"train.out_dir={out}"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(m.get("step", 0) >= 1 for m in metrics(out)), 300, "the first step")
        proc.send_signal(signal.SIGTERM)
        console, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, console[-4000:]
    assert "stop requested" in console
    assert "Traceback" not in console and "SignalException" not in console, console[-4000:]
    assert (tmp_path / "logs" / "launcher.log").exists()


@pytest.mark.parametrize("who", ["rank1", "both"])
def test_a_rank_s_error_reaches_the_console_once(tmp_path, who):
    # stand-in ranks: rank 1 alone fails (its line is printed by the node script), or both fail
    # with the same line (rank 0's console copy is enough)
    script = ('. launch/common.sh && . launch/env.sh && PRETRAIN_NPROC=2 && pretrain_run '
              '"$PRETRAIN_PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 '
              '--no-python launch/rank.sh bash -c "$RANK_SCRIPT"')
    fail = 'echo "error: rank one is unhappy" >&2; exit 2'
    rank = f'if [ "$RANK" = 1 ]; then {fail}; fi; exec sleep 60' if who == "rank1" else fail
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank_00001.log").write_text("==== an earlier run\nerror: an old line\n")
    proc = run(["bash", "-c", script], launch_env(logs, RANK_SCRIPT=rank), timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout.count("error: rank one is unhappy") == 1, proc.stdout
    assert ("launch: rank 1: error:" in proc.stdout) == (who == "rank1")
    assert "old line" not in proc.stdout and "Traceback" not in proc.stdout, proc.stdout
