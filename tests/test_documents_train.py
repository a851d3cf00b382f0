"""Training on packed documents (issue 22), end to end on prepared shards (byte tokenizer, EOD 256):

* identical 16-token documents at seq_len 64 train exactly like the same corpus at seq_len 16
  with 4x the micro-batch, with data.reset_attention_mask, reset_position_ids and eod_mask_loss
  on (loss curves within 1e-5, fp32); with them off the curves differ;
* TP=2 (sequence parallel, activation checkpointing), PP=2 (activation checkpointing, compiled
  blocks) and DP=2 x ZeRO-1 give the single process's losses and gradient norms with the
  options on; documents of
  random lengths put different numbers of masked targets in each micro-batch, and each layout
  splits the global batch of 8 differently (1 x 8, 4 x 2, 2 x 4, 2 ranks x 2 x 2), so equal
  losses also show the global-batch token mean;
* a SIGKILL and auto-resume with the options on is bitwise exact;
* a run whose attention ignores the mask (fault no_doc_mask) stops before step 1 with the
  self-check's one line.
"""
from __future__ import annotations

import json
import random

import pytest

from pretrain.data.prep import main as prep_main
from train_util import check, grad_norms, losses, run_train

ON = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]
# learned positions (the layouts' restarted positions go through the sequence-parallel embedding)
BASE = ["data.synthetic=false", "model.vocab_size=512", "model.dropout=0.0", "checkpoint.interval=3",
        "train.max_steps=5"]


def _prep(d, docs):
    d.mkdir()
    (d / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert prep_main([str(d / "in.jsonl"), "-o", str(d / "out"), "--tokenizer", "byte", "--quiet", "--workers", "1",
                      "--split", "0.9,0.1"]) == 0
    return d / "out"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    short = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(600)]
    return {"short": _prep(root / "short", short),
            # 15 bytes + EOD = 16 tokens: every window of 16 or 64 inputs starts at a document
            "same": _prep(root / "same", ["fifteen bytes!!"] * 600)}


def test_identical_documents_train_the_same_at_seq_len_64_and_16(corpora, tmp_path):
    # rope: the model's weights do not depend on seq_len (a learned table would)
    data = [f"data.paths=[{corpora['same']}]", "train.max_steps=4", "checkpoint.interval=0",
            "logging.interval=1", "model.position=rope"]
    curves = {}
    for opts in ("on", "off"):
        for seq, mbs in ((64, 2), (16, 8)):
            out = tmp_path / f"{opts}{seq}"
            check(run_train(out, [*BASE, *data, f"model.seq_len={seq}", f"train.micro_batch_size={mbs}",
                                  f"train.global_batch_size={mbs}",
                                  *(ON if opts == "on" else [])]))
            curves[opts, seq] = losses(out)
    assert len(curves["on", 64]) == 4
    for step, loss in curves["on", 64].items():
        assert curves["on", 16][step] == pytest.approx(loss, rel=1e-5), step
    assert any(abs(curves["off", 16][s] - curves["off", 64][s]) > 1e-3 * curves["off", 64][s] for s in curves["off", 64])


# Global batch 8 in every layout, split into micro-batches differently: the single process
# takes it whole (its mean is the global token mean by definition), the others in 2-4 pieces.
LAYOUTS = {
    "single": (1, ["train.micro_batch_size=8"]),
    "tp2-sp-ckpt": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.activation_checkpointing=true"]),
    "pp2-ckpt-compile": (2, ["parallel.pipeline=2", "parallel.zero_stage=0", "model.activation_checkpointing=true",
                             "train.compile=true", "train.micro_batch_size=4"]),
    "dp2-zero1": (2, ["parallel.data=2", "parallel.zero_stage=1"]),
}


@pytest.fixture(scope="module")
def layout_runs(corpora, tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            nproc, overrides = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name)
            check(run_train(out, [*BASE, *ON, f"data.paths=[{corpora['short']}]", *overrides], nproc=nproc))
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "single"])
def test_layouts_equal_one_process_with_the_options_on(layout_runs, name):
    ref, got = layout_runs("single"), layout_runs(name)
    ref_losses, ref_norms = losses(ref), grad_norms(ref)
    assert len(ref_losses) == 5
    for step, loss in ref_losses.items():
        assert losses(got)[step] == pytest.approx(loss, rel=1e-5), (name, step)
        assert grad_norms(got)[step] == pytest.approx(ref_norms[step], rel=1e-5), (name, step)


def test_sigkill_and_auto_resume_with_the_options_on_is_exact(layout_runs, corpora, tmp_path):
    out = tmp_path / "run"
    run = [*BASE, *ON, f"data.paths=[{corpora['short']}]", *LAYOUTS["single"][1]]
    assert run_train(out, run, faults="kill@4:0").returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert "resumed from" in check(run_train(out, run))
    assert losses(out) == losses(layout_runs("single"))  # exact, every step


def test_a_path_that_ignores_the_mask_stops_before_step_1(corpora, tmp_path):
    proc = run_train(tmp_path / "run", [*BASE, *ON, f"data.paths=[{corpora['short']}]"], faults="no_doc_mask=1")
    assert proc.returncode != 0
    assert "step 1/" not in proc.stdout and "Traceback" not in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if "self-check failed" in line]
    assert len(errors) == 1 and "data.reset_attention_mask" in errors[0], proc.stdout[-2000:]
