"""Helpers for the fault tests: a small tmpfs (disk full, read-only), and the checks every
refusal must pass (exit status, exactly one `error:` line on stderr, no traceback)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import warm
from train_util import TINY


@contextlib.contextmanager
def small_fs(path: Path, size: str = "2m", readonly: bool = False, populate=None):
    """A tmpfs of `size` at `path` (needs root: CI runs the suite as root). `populate(path)` runs
    before a read-only remount. Unmounted on exit; skipped, with the reason, where mount is refused."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        if populate:
            populate(path)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def one_error_line(stderr: str, *fragments: str) -> str:
    """The single `error:` line of stderr (third-party warnings may come before it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def train_cmd(out_dir, overrides=()) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", *TINY, f"train.out_dir={out_dir}", *overrides]


def run_split(cmd, faults: str = "", wait: bool = True, timeout: float = 300):
    """Run with stdout and stderr apart (CompletedProcess, or the Popen when wait=False)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    if faults:
        env["PRETRAIN_FAULTS"] = faults
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if warm.enabled(cmd):
        return warm.run(cmd, env, timeout, split=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
