"""A non-editable install works from its own files: `pip install .` (a wheel built from a copy of
the tree) into a fresh directory, then `pretrain-train --plan` on a preset by name, run from
elsewhere: the presets ship as package data, not through the repository's files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_plans_a_preset(tmp_path):
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(".git", "*.egg-info", "__pycache__",
                                                                               "runs", "build"))
    target = tmp_path / "installed"
    # --no-deps: torch, deepspeed ... come from the test environment; pretrain from the wheel only.
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)  # the installed copy must not need the tree it came from
    assert not (target / "pretrain" / "presets").is_symlink() and (target / "pretrain" / "presets" / "gpt2-124m.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable checkout on sys.path
    where = subprocess.run([sys.executable, "-c", "import pretrain; print(pretrain.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr  # the installed package, not the checkout
    run = subprocess.run([sys.executable, str(target / "bin" / "pretrain-train"), "--config", "gpt2-124m", "--plan"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "124" in run.stdout and "parameters" in run.stdout.lower(), run.stdout[:2000]
