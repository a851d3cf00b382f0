"""A checkpoint carries what it needs: generate, export-hf and inspect from any directory and after
moving the run (and the data); export refuses to write a model without its tokenizer."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import digest
from pretrain.generate import main as generate_main
from pretrain.interop.cli import main as convert_main
from pretrain.interop.inspect import main as inspect_main
from train_util import TINY, check, run_train

ROOT = Path(__file__).resolve().parents[1]


def _train_here(cwd: Path, overrides: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("PRETRAIN_FAULTS", None)
    return subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, *overrides], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory, bpe_data):
    """A run trained with relative data and output paths, from its own working directory."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(bpe_data, work / "shards")
    check(_train_here(work, ["data.synthetic=false", "model.vocab_size=null", "data.paths=[shards]",
                             "train.out_dir=run", "train.max_steps=2", "checkpoint.interval=0",
                             "logging.tensorboard=false"]))
    return work


def _use_from(run: Path, where: Path, monkeypatch, capsys):
    monkeypatch.chdir(where)
    assert generate_main(["--checkpoint", str(run), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("the quick")  # after DeepSpeed's log lines
    out = where / f"hf_{run.name}"
    assert convert_main(["export-hf", "--run", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300  # the real vocabulary, not 384
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert inspect_main([str(run)]) == 0
    text = capsys.readouterr().out
    assert "tokenizer" in text and "vocab 300" in text


def test_checkpoint_works_from_another_directory_and_after_mv(relative_run, tmp_path, monkeypatch, capsys):
    run = relative_run / "run"
    tag = run / "checkpoints" / "step_00000002"
    state = json.loads((tag / "state.json").read_text())
    assert state["config"]["data"]["paths"] == [str((relative_run / "shards").resolve())]  # resolved at save
    assert state["vocab_size"] == 300 and set(state["tokenizer"]["files"]) == {"manifest.json", "tokenizer.json"}
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (tag / "tokenizer" / "tokenizer.json").read_bytes()

    _use_from(run, tmp_path, monkeypatch, capsys)

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(run), moved)
    shutil.move(str(relative_run / "shards"), tmp_path / "shards_gone")  # the data may move too
    try:
        _use_from(moved, moved.parent, monkeypatch, capsys)
    finally:
        shutil.move(str(moved), run)
        shutil.move(str(tmp_path / "shards_gone"), relative_run / "shards")


def test_damaged_tokenizer_copy_is_named(relative_run, tmp_path, capsys):
    src = relative_run / "run" / "checkpoints" / "step_00000002"
    tag = tmp_path / "step_00000002"
    shutil.copytree(src, tag)
    (tag / "tokenizer" / "tokenizer.json").write_text("{}")
    manifest = json.loads((tag / "manifest.json").read_text())  # re-commit so only the digest in state.json differs
    manifest["files"]["tokenizer/tokenizer.json"]["size"] = 2
    manifest["files"]["tokenizer/tokenizer.json"] = digest.bytes_entry(b"{}")
    (tag / "manifest.json").write_text(json.dumps(manifest))
    assert generate_main(["--checkpoint", str(tag), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err and "sha256" in err  # state.json's tokenizer digests


def test_export_without_tokenizer_is_refused(tmp_path, capsys):
    run = tmp_path / "synthetic"
    check(run_train(run, ["train.max_steps=2", "checkpoint.interval=0", "logging.tensorboard=false"]))
    out = tmp_path / "hf"
    assert convert_main(["export-hf", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--no-tokenizer" in err and "Traceback" not in err
    assert not out.exists()  # nothing written
    assert convert_main(["export-hf", "--run", str(run), "--out", str(out), "--no-tokenizer"]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 258
    assert not (out / "tokenizer.json").exists()
