"""Crash safety on one process: kill mid-save, corrupt shard, SIGTERM, NaN guard, refusals."""
from __future__ import annotations

import json
import math
import signal
import time

import pytest
import torch

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.interop.ds_reader import load_model_weights
from train_util import check, losses, metrics, run_train


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    check(run_train(out))
    return out


def test_kill_during_save_resumes_from_previous_commit(straight, tmp_path):
    out = tmp_path / "run"
    killed = run_train(out, faults="kill_in_save@6")
    assert killed.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000006").is_dir()  # DeepSpeed's shards were written ...
    assert not (ckpts / "step_00000006" / "manifest.json").exists()  # ... but never committed
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    log = check(run_train(out))
    assert "skipping checkpoint" in log and "step_00000006" in log
    assert "resumed from" in log and "step_00000003" in log
    assert losses(out) == losses(straight)
    assert store.verify(ckpts / "step_00000006") is None  # re-saved and committed
    # the killed run had logged steps 4-6 too: metrics.jsonl and TensorBoard hold each step once
    steps = [m["step"] for m in metrics(out) if "train/loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, 7)), steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == steps


def test_corrupt_shard_makes_auto_resume_fall_back(straight, tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["train.max_steps=6"]))
    shard = next((out / "checkpoints" / "step_00000006").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    log = check(run_train(out, ["train.max_steps=6", "checkpoint.verify=full"]))  # sizes alone miss a flipped byte
    assert "skipping checkpoint" in log and "step_00000006" in log and digest.CHECKPOINT in log
    assert "resumed from" in log and "step_00000003" in log
    assert losses(out) == losses(straight)


def test_sigterm_checkpoints_exits_zero_and_resume_is_exact(straight, tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, faults="sleep=0.5", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not any(m.get("step", 0) >= 1 for m in metrics(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    assert "stop requested" in log
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < 6
    check(run_train(out))
    assert losses(out) == losses(straight)


def test_nan_on_one_rank_is_skipped_under_zero0(tmp_path):
    out = tmp_path / "run"
    log = check(run_train(out, ["parallel.zero_stage=0"], nproc=2, faults="nan@2:1"))
    assert "step 3: non-finite" in log
    last = [m for m in metrics(out) if "train/skipped_steps" in m][-1]
    assert last["step"] == 6 and last["train/skipped_steps"] == 1
    steps = losses(out)
    assert math.isnan(steps.pop(3))  # the skipped step logs its non-finite loss
    assert all(math.isfinite(v) for v in steps.values())
    weights = load_model_weights(store.resolve_tag_dir(str(out)))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, ["train.max_consecutive_skips=2"], faults="nan@1:0,nan@2:0")
    log = check(proc, rc=3)
    assert "2 consecutive non-finite steps" in log
    tag = store.resolve_tag_dir(str(out))
    state = json.loads((tag / "state.json").read_text())
    assert state["step"] == 3 and state["skipped_steps"] == 2


def test_resume_with_another_model_shape_is_refused(straight, tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["train.max_steps=3"]))
    # Started again as it was, a finished run trains nothing and leaves its checkpoint as it is.
    manifest = out / "checkpoints" / "step_00000003" / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns, len(metrics(out)))
    log = check(run_train(out, ["train.max_steps=3"]))
    assert "nothing to train" in log and "validation at" not in log
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns, len(metrics(out))) == before
    proc = run_train(out, ["model.n_layer=3"])
    log = check(proc, rc=2)
    assert "error:" in log and "model of shape" in log and "Traceback" not in log


def test_tensorboard_has_every_scalar(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # the losses come first in TensorBoard's (sorted) sections, also against tokens seen
    expected = {"loss/train", "loss/val", "loss/val_perplexity", "loss/train_vs_tokens", "loss/val_vs_tokens",
                "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/tflops_per_device",
                "perf/step_time_ms", "mem/cpu_rss_gib", "train/skipped_steps", "train/consumed_tokens"}
    assert expected <= tags, expected - tags
    assert sorted({t.split("/")[0] for t in tags})[0] == "loss"
    # MFU needs a peak: CPU has none unless logging.peak_flops is set (test below);
    # loss_scale exists only for fp16, which needs a GPU.
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx(list(losses(straight).values()))
    by_tokens = acc.Scalars("loss/train_vs_tokens")
    assert [e.step for e in by_tokens] == [m["train/consumed_tokens"] for m in metrics(straight) if "train/loss" in m]
    assert [e.value for e in by_tokens] == pytest.approx(list(losses(straight).values()))


def test_mfu_logged_with_peak_override(tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["train.max_steps=2", "logging.peak_flops=1e12"]))
    assert all(0 < m["perf/mfu"] < 1 for m in metrics(out) if "perf/mfu" in m)


def test_generate_from_checkpoint(straight):
    from pretrain.generate import main

    assert main(["--checkpoint", str(straight), "--prompt", "ab", "--tokenizer", "byte",
                 "--max-new-tokens", "8"]) == 0
