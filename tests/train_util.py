"""Helpers for tests that run the trainer as real processes (python -m, several ranks, torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warm

# A tiny model on seeded random tokens: fast on 2 CPU cores, exercises dropout RNG too.
TINY = [
    "data.synthetic=true", "model.vocab_size=258", "model.n_layer=2", "model.d_model=64",
    "model.n_head=4", "model.seq_len=32", "model.dropout=0.1", "train.micro_batch_size=2",
    "train.global_batch_size=8", "train.precision=fp32", "train.device=cpu", "train.max_steps=6",
    "train.eval_steps=2", "logging.interval=1", "checkpoint.interval=3", "parallel.timeout_minutes=2",
    "schedule.warmup_steps=2",
]


def run_train(out_dir: Path, overrides=(), nproc: int = 1, faults: str = "", timeout: float = 300,
              wait: bool = True, torchrun: bool = False):
    """Run the trainer; returns CompletedProcess (or the Popen when wait=False, one process).

    Several ranks are started directly with the environment torchrun would set (`run_ranks`):
    torchrun's own interpreter costs seconds per run on 2 cores. `torchrun=True` goes through
    torchrun (tests/test_train_zero.py keeps that path covered)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    if faults:
        env["PRETRAIN_FAULTS"] = faults
    args = ["-m", "pretrain.train", *TINY, f"train.out_dir={out_dir}", *overrides]
    if nproc > 1 and not torchrun:
        assert wait, "run_ranks waits for its ranks"
        return run_ranks([sys.executable, *args], env, nproc, timeout)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "--no-python", sys.executable, *args]
    else:
        cmd = [sys.executable, *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if warm.enabled(cmd):
        return warm.run(cmd, env, timeout)
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def run_ranks(cmd: list[str], env: dict, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cmd` as `nproc` local ranks; like torchrun, the first rank to fail takes the others down
    (they would otherwise wait for it in a collective). Rank 0's output, then the others' with a
    `[rank N]` prefix."""
    from dist_util import free_port

    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc)}
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        paths = [os.path.join(logs, f"rank{r}.log") for r in range(nproc)]
        procs = [_start(cmd, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}, paths[r]) for r in range(nproc)]
        deadline, rc = time.monotonic() + timeout, None
        try:
            while rc is None:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed:
                    rc = failed[0]
                elif all(c == 0 for c in codes):
                    rc = 0
                elif time.monotonic() > deadline:
                    rc = -9
                else:
                    time.sleep(0.05)
        finally:
            for p in procs:  # only the processes started here
                if p.poll() is None:
                    p.kill()
                p.wait()
        text = []
        for r, path in enumerate(paths):
            with open(path) as f:
                text.append(f.read() if r == 0 else "".join(f"[rank {r}] {line}" for line in f))
    return subprocess.CompletedProcess(cmd, rc, stdout="".join(text))


def _start(cmd, env: dict, log: str):
    if warm.enabled(cmd):
        return warm.start(cmd, env, log)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)


def metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out_dir: Path) -> dict[int, float]:
    """Train loss per step; a step logged twice (re-done after a resume) keeps its last value."""
    return {m["step"]: m["train/loss"] for m in metrics(out_dir) if "train/loss" in m}


def grad_norms(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/grad_norm"] for m in metrics(out_dir) if "train/grad_norm" in m}


def check(proc, rc: int = 0) -> str:
    assert proc.returncode == rc, f"exit {proc.returncode} (wanted {rc}):\n{proc.stdout[-4000:]}"
    return proc.stdout
