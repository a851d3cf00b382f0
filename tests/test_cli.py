"""The command lines a newcomer meets first: --help shows defaults, presets resolve from
anywhere (also after a non-editable install), inspect-ckpt states the real global batch."""
from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, argv, expected", [
    ("pretrain.generate", ["--help"], "MAX_NEW_TOKENS default: 100"),  # an option without help text
    ("pretrain.quickstart", ["--help"], "BPE vocabulary size (default: 4096)"),
    ("pretrain.data.prep", ["--help"], "(default: 'doc')"),  # --txt-mode
    ("pretrain.interop.cli", ["reshard", "--help"], "(default:"),
    ("pretrain.data.inspect", ["show", "--help"], "(default:"),
])
def test_help_shows_defaults(module, argv, expected, capsys):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert expected in out
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: True)" not in out


def test_presets_resolve_from_any_directory(tmp_path):
    """configs/ ships as package data (pyproject: pretrain/presets -> ../configs)."""
    shipped = sorted(p.name for p in (ROOT / "pretrain" / "presets").glob("*.yaml"))
    assert shipped == sorted(Path(p).name for p in glob.glob(str(ROOT / "configs" / "*.yaml"))) and shipped
    assert '"presets/*.yaml"' in (ROOT / "pyproject.toml").read_text()
    code = ("from pretrain.config.load import load_config\n"
            "for name in ('quickstart', 'configs/gpt2-124m.yaml', 'llama-7b.yaml'):\n"
            "    print(load_config(name).model.n_layer)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4", "12", "32"]
    r = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "gpt2-125m", "--print-config"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "gpt2-125m: config file not found (presets: gpt2-1.5b, gpt2-124m," in r.stderr


def test_inspect_states_the_global_batch_of_a_default():
    from pretrain.interop.inspect import _fmt

    report = {"checkpoint": "c", "checkpoints": {}, "step": 3, "layout": {"dp": 2, "zero_stage": 1},
              "config": {"train": {"micro_batch_size": 4, "global_batch_size": None}}}
    assert "global batch 8 (= micro x data 2, train.global_batch_size null)" in _fmt(report)
    report["config"]["train"]["global_batch_size"] = 16
    assert "global batch 16," in _fmt(report)


def test_a_trainer_process_leaves_with_its_code_after_the_atexit_handlers():
    """After a process group, `pretrain.train.leave` skips interpreter teardown (where freeing
    DeepSpeed's leftover gloo groups can abort) but keeps the exit code, the atexit handlers
    (bench_train's report) and everything printed; without one it is a plain sys.exit."""
    code = ("import atexit, sys; from pretrain import train; atexit.register(lambda: print('atexit ran'));"
            "train.Trainer.joined = {joined}; sys.stdout.write('unflushed'); train.leave(3)")
    for joined in (True, False):
        p = subprocess.run([sys.executable, "-c", code.format(joined=joined)], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        assert p.returncode == 3 and p.stdout == "unflushedatexit ran\n", (joined, p)
