"""The data side of a run (pretrain/run_data.py): epochs reported, repetition warned."""
from __future__ import annotations

from pretrain.data.loader import open_dataset
from pretrain.run_data import epoch_report


def test_epochs_reported_and_repetition_warned(bpe_data, tmp_path):
    ds = open_dataset([str(bpe_data)], None, "train", 16, 1, 0, str(tmp_path))
    per_epoch = len(ds)  # num_samples 0 = one epoch
    once = epoch_report(ds, per_epoch // 2)
    assert len(once) == 1 and "this run reads 0.50 epochs" in once[0] and f"{per_epoch:,} samples" in once[0]
    many = epoch_report(ds, 15 * per_epoch)
    assert "this run reads 15.00 epochs" in many[0]
    assert many[1].startswith("warning: the run repeats data: 15.0 epochs of")
