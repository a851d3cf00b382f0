"""Asynchronous saves keep every crash-safety guarantee: kill -9 at 10 moments of a background save
(CPU, ZeRO-1, DP=2) leaves the previous committed checkpoint, and the resume is bitwise exact."""
from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint import store
from pretrain.interop.ds_reader import load_model_weights
from train_util import check, losses, run_train

# checkpoints at steps 2 and 4 (the last): every kill lands in the save of step 4 or in the step after
# the periodic save of step 2, while that save is still being written in the background
RUN = ["train.max_steps=4", "checkpoint.interval=2", "logging.tensorboard=false", "model.dropout=0.1"]
MOMENTS = [
    "save_point0@4:0",   # training thread, right after the snapshot, before any byte is written
    "save_point1@4:1",   # rank 1 wrote its first file, no digest yet
    "save_point2@4:0",   # rank 0 in the middle of writing its first file
    "save_point2@4:1",   # rank 1 in the middle of writing its first file
    "save_point3@4:1",   # rank 1 wrote all its files, not its digests
    "save_point4@4:1",   # rank 1 published its digests, rank 0 has not committed
    "kill_in_save@4:0",  # rank 0 gathered every digest, no manifest yet
    "save_point6@4:0",   # manifest written, `latest` not moved
    "save_point7@4:0",   # committed, before pruning
    "save_point1@2:0",   # rank 0 inside the periodic save of step 2 (training goes on meanwhile)
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    check(run_train(out, RUN, nproc=2))
    return out


def _weights(run):
    return load_model_weights(store.resolve_tag_dir(str(run)))


@pytest.mark.slow
@pytest.mark.parametrize("fault", MOMENTS)
def test_kill9_during_async_save_resumes_exactly(straight, tmp_path, fault):
    out = tmp_path / "run"
    killed = run_train(out, RUN, nproc=2, faults=fault)
    assert killed.returncode != 0, killed.stdout[-2000:]
    ckpts = out / "checkpoints"
    latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").exists() else None
    if latest:  # whatever `latest` names is a complete, committed checkpoint
        assert store.verify(ckpts / latest) is None
    committed_4 = fault.startswith(("save_point6", "save_point7"))
    if not fault.startswith("save_point4@4:1"):  # rank 1 died with its files complete: rank 0 may commit them
        assert (store.verify(ckpts / "step_00000004") is None) == committed_4
    log = check(run_train(out, [*RUN, "checkpoint.verify=full"], nproc=2))  # the checksums split over both ranks
    if latest or committed_4:
        assert "resumed from" in log
    assert losses(out) == losses(straight)
    mine, ref = _weights(out), _weights(straight)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
