"""tests/warm.py: a process forked from the warm server sees what a fresh `python -m` sees."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import warm

TESTS = Path(__file__).parent


def _both(tmp_path, monkeypatch, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "warm_probe", *args]
    env = {**os.environ, "PROBE": "p1", "OMP_NUM_THREADS": "1", "PRETRAIN_FAULTS": "nan@3:1,sleep=0.5",
           "PYTHONPATH": str(TESTS)}
    env.pop("HOME", None)
    fresh = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    monkeypatch.chdir(tmp_path)  # warm.start takes the caller's cwd, as subprocess does
    return fresh, warm.run(cmd, env, timeout=120, split=True)


@pytest.mark.parametrize("code", ["0", "3"])
def test_a_forked_process_sees_what_a_fresh_one_sees(tmp_path, monkeypatch, code):
    fresh, forked = _both(tmp_path, monkeypatch, code, "x y")
    assert fresh.returncode == int(code) and forked.returncode == int(code)
    assert fresh.stdout.splitlines() == forked.stdout.splitlines(), (fresh.stdout, forked.stdout)
    assert "faults {('nan', 3, 1): True, 'sleep': 0.5}" in forked.stdout  # the child's own variable
    assert f"cwd {tmp_path}" in forked.stdout and "atexit ran" in forked.stdout
    assert fresh.stderr == forked.stderr == "to stderr\n"


def test_an_exception_exits_1_with_its_traceback(tmp_path, monkeypatch):
    fresh, forked = _both(tmp_path, monkeypatch, "raise")
    assert fresh.returncode == forked.returncode == 1
    for proc in (fresh, forked):
        assert proc.stderr.rstrip().endswith("ValueError: from the probe"), proc.stderr
        assert "Traceback" in proc.stderr


def test_only_pretrain_modules_are_forked_and_the_variable_turns_it_off(monkeypatch):
    monkeypatch.delenv(warm.FRESH, raising=False)
    assert warm.enabled([sys.executable, "-m", "pretrain.train"])
    assert not warm.enabled([sys.executable, "-m", "pip"])
    assert not warm.enabled(["pretrain-train"])
    monkeypatch.setenv(warm.FRESH, "1")
    assert not warm.forking() and not warm.enabled([sys.executable, "-m", "pretrain.train"])
