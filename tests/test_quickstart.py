"""The README's main job, shortened: corpus -> BPE + shards -> training -> checkpoint -> sample."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from pretrain.checkpoint import store


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "pretrain.quickstart", "--out", str(out), "--max-mb", "1", "--vocab", "320",
           "train.max_steps=8", "schedule.warmup_steps=2", "logging.interval=4", "checkpoint.interval=4",
           "train.eval_interval=4", "train.eval_steps=2", "train.micro_batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    log = proc.stdout
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "validation at step 8", "tensorboard --logdir"):
        assert stage in log, stage
    sample = log.split("[4/4] sample from the final checkpoint:")[1].split("-" * 60)[1].strip()
    _assert_readable(sample, "def ")
    assert (out / "data" / "manifest.json").is_file() and (out / "data" / "tokenizer.json").is_file()
    assert store.verify(store.resolve_tag_dir(str(out))) is None
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # The suggested follow-up: several samples in one call; the prompt's trailing space is healed
    # (the first new token carries the space: "import" + " x", not "import " + a lone " ").
    from pretrain.generate import main as generate_main

    capsys.readouterr()
    assert generate_main(["--checkpoint", str(out), "--prompt", "import ", "--num-samples", "3",
                          "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    samples = [s.strip("\n") for s in printed.split("---")[2::2]]
    assert printed.count("--- sample ") == 3 and len(samples) == 3, printed
    for s in samples:
        _assert_readable(s, "import ")
    assert len(set(samples)) > 1  # independent draws
    assert generate_main(["--checkpoint", str(out), "--num-samples", "0"]) == 2
    assert "--num-samples must be at least 1" in capsys.readouterr().err


def _assert_readable(text: str, prompt: str) -> None:
    """What test_sampling's healing test asks of a continuation, on the real quickstart model: the
    prompt, then a token that carries the prompt's trailing space and more (no lone space, so
    "def" + " name", not "def " + " "), then text: every character printable or a line break or
    tab, no replacement character (the byte-level BPE never splits a character here)."""
    assert text.startswith(prompt) and len(text) > len(prompt), text[:200]
    assert text[len(prompt)] != " " or text[len(prompt):].strip(), text[:200]
    assert "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text), repr(text[:200])
    assert re.search(r"[A-Za-z_]{2,}", text[len(prompt):]), text[:200]  # at least one word after the prompt
