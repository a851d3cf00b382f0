"""Helpers shared by the launcher tests (tests/test_launch.py, tests/test_launch_slurm.py)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from train_util import TINY, metrics

ROOT = Path(__file__).absolute().parents[1]
LAUNCH = ROOT / "launch"
STEPS = 8
TIMEOUT_MIN = 0.5  # parallel.timeout_minutes for every run here (PRETRAIN_TIMEOUT_MINUTES)
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def last_step(run_dir: Path) -> int:
    return max((m["step"] for m in metrics(run_dir) if "train/loss" in m), default=0)


def launch_env(log_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PRETRAIN_", "MASTER_", "GLOO_", "NCCL_"))
           and k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "LOCAL_ADDR", "RANK", "WORLD_SIZE",
                         "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PRETRAIN_PYTHON=sys.executable,
               PRETRAIN_LOG_DIR=str(log_dir), PRETRAIN_TIMEOUT_MINUTES=str(TIMEOUT_MIN),
               PRETRAIN_RESTART_DELAY="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    """Run a launcher to the end; on a timeout, kill it with everything it started, then raise."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun puts its ranks in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check(proc, rc=0) -> str:
    out = proc.stdout if isinstance(proc.stdout, str) else ""
    assert proc.returncode == rc, f"exit {proc.returncode} (wanted {rc}):\n{out[-5000:]}"
    return out


def write_tiny_config(directory: Path) -> Path:
    """TINY as a YAML file (the launchers take CONFIG [overrides]), STEPS steps."""
    cfg: dict = {}
    for item in [*TINY, f"train.max_steps={STEPS}"]:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        cfg.setdefault(section, {})[field] = yaml.safe_load(value)
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
