"""Asynchronous saves keep every crash-safety guarantee: kill -9 at 10 moments of a background save
(CPU, ZeRO-1, DP=2), 5 of them inside the periodic saves of steps 2 and 4 while training goes on,
5 in the final save of step 6, leaves the previous committed checkpoint, and the resume is bitwise
exact."""
from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint import store
from pretrain.interop.ds_reader import load_model_weights
from train_util import check, losses, run_train

# checkpoints at steps 2, 4 (periodic: written in the background while steps 3 and 5 train) and 6
RUN = ["train.max_steps=6", "checkpoint.interval=2", "logging.tensorboard=false", "model.dropout=0.1"]
MOMENTS = [
    # inside a periodic save, in the background, while the next steps train
    "save_point1@2:1",   # rank 1 wrote its first file of step 2, no digest yet
    "save_point2@2:0",   # rank 0 in the middle of writing its first file of step 2
    "save_point3@4:1",   # rank 1 wrote all its files of step 4, not its digests
    "kill_in_save@4:0",  # rank 0 gathered every digest of step 4, no manifest yet
    "save_point6@2:0",   # step 2's manifest written, `latest` not moved
    # inside the final save (the run waits for it)
    "save_point0@6:0",   # training thread, right after the snapshot, before any byte is written
    "save_point2@6:1",   # rank 1 in the middle of writing its first file
    "save_point4@6:1",   # rank 1 published its digests, rank 0 has not committed
    "save_point6@6:0",   # manifest written, `latest` not moved
    "save_point7@6:0",   # committed, before pruning
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
    step = int(fault.split("@")[1].split(":")[0])  # the save the kill lands in
    committed = fault.startswith(("save_point6", "save_point7"))
    if not fault.startswith("save_point4"):  # rank 1 died with its files complete: rank 0 may commit them
        assert (store.verify(ckpts / store.tag_for(step)) is None) == committed
    log = check(run_train(out, [*RUN, "checkpoint.verify=full"], nproc=2))  # the checksums split over both ranks
    if latest or committed:
        assert "resumed from" in log
    assert losses(out) == losses(straight)
    mine, ref = _weights(out), _weights(straight)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
