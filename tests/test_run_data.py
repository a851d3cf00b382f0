"""The data side of a run (pretrain/run/data.py): epochs reported, repetition warned."""
from __future__ import annotations

from pretrain.data.loader import open_dataset
from pretrain.run.data import epoch_report


def test_epochs_reported_and_repetition_warned(bpe_data, tmp_path):
    ds = open_dataset([str(bpe_data)], None, "train", 16, 1, 0, str(tmp_path))
    per_epoch = len(ds)  # num_samples 0 = one epoch
    once = epoch_report(ds, per_epoch // 2)
    assert len(once) == 1 and "this run reads 0.50 epochs" in once[0] and f"{per_epoch:,} samples" in once[0]
    many = epoch_report(ds, 15 * per_epoch)
    assert "this run reads 15.00 epochs" in many[0]
    assert many[1].startswith("warning: the run repeats data: 15.0 epochs of")


def _prep(d, docs, *args):
    import json

    from pretrain.data.prep import main as prep_main

    d.mkdir(parents=True, exist_ok=True)
    (d / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return prep_main([str(d / "in.jsonl"), "-o", str(d / "out"), "--quiet", "--workers", "1", *args])


def test_prep_warns_when_a_split_gets_no_document(tmp_path, capsys):
    assert _prep(tmp_path / "small", [f"doc {i} hello world" for i in range(5)], "--tokenizer", "byte") == 0
    err = capsys.readouterr().err
    assert "warning: the 'valid' split got 0 of 5 documents (--split gives it 0.02" in err
    assert "data.valid_paths" in err
    assert _prep(tmp_path / "enough", [f"doc {i} hello world" for i in range(5)], "--tokenizer", "byte",
                 "--split", "0.5,0.5") == 0
    assert "warning" not in capsys.readouterr().err


def test_validation_survives_a_source_without_it_and_separate_eval_paths(bpe_data, tmp_path):
    """One source of a blend without a valid split no longer turns validation off; data.valid_paths
    and data.test_paths (a pretrain-prep output read whole, a bare Megatron prefix) are evaluated."""
    from train_util import TINY, check, metrics, run_train

    docs = [f"more text {i}: the lazy dog sleeps " * 3 for i in range(40)]
    assert _prep(tmp_path / "train_only", docs, "--tokenizer", f"hf:{bpe_data / 'tokenizer.json'}", "--split", "1") == 0
    train_only = str(tmp_path / "train_only" / "out")
    prefix = str(next(bpe_data.glob("valid_*.idx"))).removesuffix(".idx")  # a bare Megatron prefix
    common = ["data.synthetic=false", "model.vocab_size=null", "train.max_steps=2", "checkpoint.interval=0",
              "logging.tensorboard=false", "train.eval_steps=1"]
    assert "data.synthetic=true" in TINY
    log = check(run_train(tmp_path / "blend", [*common, f"data.paths=[{bpe_data},{train_only}]"]))
    assert f"warning: 1 of 2 data sources have no 'valid' split ({train_only}); validation uses the other 1" in log
    assert "validation at step 2" in log and "test at step" not in log
    log = check(run_train(tmp_path / "separate", [*common, f"data.paths=[{train_only}]",
                                                  f"data.valid_paths=[{train_only}]", f"data.test_paths=[{prefix}]"]))
    assert "warning" not in log.replace("Setting accelerator to CPU", "").lower().replace("[warning]", "")
    assert "validation at step 2" in log and "test at step 2" in log
    final = [m for m in metrics(tmp_path / "separate") if m["step"] == 2]
    assert any("test/loss" in m for m in final) and any("val/loss" in m for m in final)
