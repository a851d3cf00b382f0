"""Continued pretraining (checkpoint.init_from = one of our runs): new data, new schedule, another layout."""
from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint import store
from pretrain.generate import load_model
from pretrain.run.data import SyntheticData
from train_util import check, losses, run_train

FAST = ["logging.tensorboard=false"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Trained at DP=2 with ZeRO-1 (dropout on), committed at step 3."""
    out = tmp_path_factory.mktemp("source")
    check(run_train(out, ["train.max_steps=3", "checkpoint.interval=0", "parallel.zero_stage=1", *FAST], nproc=2))
    return out


def _source_loss_on_new_data(src, seed: int) -> float:
    """The source weights' loss on the first global batch (8 samples, 4 micro-batches of 2) of the new data."""
    model, _ = load_model(store.resolve_tag_dir(str(src)), torch.device("cpu"))
    data = SyntheticData(258, 32, seed, 8)
    batch = torch.stack([torch.from_numpy(data.get(i)) for i in range(8)])
    with torch.no_grad():
        micro = [float(model(b[:, :-1], b[:, 1:])) for b in batch.split(2)]
    return sum(micro) / len(micro)


@pytest.mark.slow
def test_init_from_our_checkpoint_with_new_data_in_another_layout(source, tmp_path):
    out = tmp_path / "continued"
    log = check(run_train(out, [f"checkpoint.init_from={source}", "parallel.zero_stage=0", "data.seed=77",
                                "model.dropout=0.0", "schedule.kind=constant", "optim.lr=0.0001",
                                "schedule.warmup_steps=0", "train.max_steps=2", "checkpoint.interval=0", *FAST]))
    assert "initialised from" in log and "weights only" in log and "starts at step 0" in log
    first = losses(out)[1]
    assert first == pytest.approx(_source_loss_on_new_data(source, 77), rel=1e-6, abs=1e-6)
    state = store.read_state(store.resolve_tag_dir(str(out)))
    assert state["step"] == 2 and state["consumed_samples"] == 16  # counted from 0 in the new run
    assert state["layout"]["zero_stage"] == 0 and state["layout"]["dp"] == 1


@pytest.mark.slow
def test_init_optimizer_loads_the_adam_state(source, tmp_path):
    common = [f"checkpoint.init_from={source}", "parallel.zero_stage=1", "data.seed=77", "model.dropout=0.0",
              "schedule.kind=constant", "schedule.warmup_steps=0", "train.max_steps=2", "checkpoint.interval=0",
              *FAST]
    weights_only, with_adam = tmp_path / "w", tmp_path / "wa"
    check(run_train(weights_only, common, nproc=2))
    log = check(run_train(with_adam, [*common, "checkpoint.init_optimizer=true"], nproc=2))
    assert "weights and optimizer state" in log
    a, b = losses(weights_only), losses(with_adam)
    assert a[1] == pytest.approx(b[1], rel=1e-6)  # the same weights on the same batch
    assert a[2] != b[2]  # the first update differs: Adam's moments (and step count) came along


@pytest.mark.slow
# TP=2 keeps the source's padded vocabulary (384 rows) with vocab_multiple 64 x 2: padding rows take
# part in the softmax, so more of them would change the loss (resume_check says so at resume).
@pytest.mark.parametrize("layout", [["parallel.tensor=2", "model.vocab_multiple=64"], ["parallel.pipeline=2"]],
                         ids=["tp2", "pp2"])
def test_init_from_gives_the_same_first_loss_under_tensor_and_pipeline_parallelism(source, tmp_path, layout):
    """DP=2 ZeRO-1 -> TP=2 and -> PP=2 (with the test above, DP=2 -> one process: three layout
    pairs): the continued run's first loss is the source weights' loss on the new data."""
    out = tmp_path / "continued"
    log = check(run_train(out, [f"checkpoint.init_from={source}", *layout, "parallel.zero_stage=1", "data.seed=77",
                                "model.dropout=0.0", "schedule.kind=constant", "optim.lr=0.0001",
                                "schedule.warmup_steps=0", "train.max_steps=2", "checkpoint.interval=0", *FAST], nproc=2))
    assert "initialised from" in log and "weights only" in log
    assert losses(out)[1] == pytest.approx(_source_loss_on_new_data(source, 77), rel=1e-5, abs=1e-5)
