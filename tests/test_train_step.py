"""The training step: throughput windows, one skip verdict per step, no host reads, device
synchronizations or blocking host-to-device copies between logging steps, pinned batches, fp16
loss-scale events, train.compile.

Throughput figures (tokens/s, TFLOP/s, MFU, ms/step, ETA) come from the steps actually in each
logging window, with validation and checkpoint time left out and logged as their own scalars.
A poisoned gradient (finite loss) skips the whole optimizer step under ZeRO 1-3, once. Host
reads, synchronizations and blocking copies are counted by tests/sync_probe.py; where DeepSpeed
itself reads, the test names the place.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from train_util import check, losses, metrics, run_train

STEP_SLEEP = 0.25  # faults sleep=: every step takes at least this long


def _windows(out):
    return [m for m in metrics(out) if "perf/step_time_ms" in m]


def test_throughput_windows_count_their_own_steps_and_leave_saves_out(tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["logging.interval=3", "train.max_steps=7", "checkpoint.interval=3",
                          "train.eval_interval=0"], faults=f"sleep={STEP_SLEEP},slow_checkpoint=3"))
    rows = _windows(out)
    assert [m["step"] for m in rows] == [3, 6, 7]
    assert [m["perf/window_steps"] for m in rows] == [3, 3, 1]
    tokens_per_step = 8 * 32  # TINY: global batch 8 x seq_len 32
    for i, m in enumerate(rows):
        # each step sleeps STEP_SLEEP after it (the first window holds one sleep fewer): dividing
        # by the interval (3) in the last, 1-step window would give a third of that
        n = m["perf/window_steps"]
        assert m["perf/step_time_ms"] >= 1e3 * STEP_SLEEP * ((n - 1) / n if i == 0 else 1), m
        # the 3 s save at step 3 falls in the window 4-6 and must not count: it would add >= 1000 ms/step
        assert m["perf/step_time_ms"] < 1e3 * STEP_SLEEP + 900, m
        assert m["perf/tokens_per_sec"] * m["perf/step_time_ms"] / 1e3 == pytest.approx(tokens_per_step)
    saves = {m["step"]: m["perf/checkpoint_seconds"] for m in metrics(out) if "perf/checkpoint_seconds" in m}
    assert set(saves) == {3, 6, 7} and all(s >= 3.0 for s in saves.values())


def test_first_window_after_a_resume_off_the_interval(tmp_path):
    out = tmp_path / "run"
    check(run_train(out, ["logging.interval=3", "train.max_steps=4", "checkpoint.interval=0"]))
    log = check(run_train(out, ["logging.interval=3", "train.max_steps=7", "checkpoint.interval=0"],
                          faults=f"sleep={STEP_SLEEP}"))
    assert "resumed from" in log
    rows = [m for m in _windows(out) if m["step"] > 4]
    assert [(m["step"], m["perf/window_steps"]) for m in rows] == [(6, 2), (7, 1)]
    assert rows[0]["perf/step_time_ms"] >= 1e3 * STEP_SLEEP / 2  # 2 steps, 1 sleep (see above)
    assert rows[1]["perf/step_time_ms"] >= 1e3 * STEP_SLEEP


# ---------------------------------------------------------------- one verdict per step
def _tensors(obj, prefix=""):
    """Every tensor in a (nested) checkpoint object, by path."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _checkpoint_tensors(tag_dir):
    import torch

    out = {}
    for f in sorted(tag_dir.glob("*.pt")):
        for path, t in _tensors(torch.load(f, map_location="cpu", weights_only=False)):
            out[f"{f.name}{path}"] = t
    return out


@pytest.mark.parametrize("zero,precision", [(1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_poisoned_gradient_skips_the_whole_step_once(tmp_path, zero, precision):
    """An inf in one parameter's gradient on rank 1 (finite loss), DP=2: DeepSpeed calls the
    optimizer once per group (ZeRO 1/2) or sub-group (ZeRO 3); no group may step. The checkpoint
    after the poisoned step 2 holds the same weights, fp32 masters and Adam moments as step 1's.
    (fp32 ZeRO-2 and ZeRO-3: DeepSpeed's own norm check is left to the guard, on the device.)"""
    out = tmp_path / "run"
    log = check(run_train(out, [f"train.precision={precision}", f"parallel.zero_stage={zero}", "model.dropout=0.0",
                             "train.max_steps=3", "checkpoint.interval=1", "checkpoint.keep_last=3"],
                       nproc=2, faults="grad_inf@1:1"))
    assert log.count("non-finite loss or gradient, step skipped") == 1 and "step 2: non-finite" in log
    assert [m["train/skipped_steps"] for m in metrics(out) if "train/skipped_steps" in m] == [0, 1, 1]
    ckpts = out / "checkpoints"
    before, after = _checkpoint_tensors(ckpts / "step_00000001"), _checkpoint_tensors(ckpts / "step_00000002")
    assert before.keys() == after.keys() and len(before) > 4
    changed = [k for k in before if not torch_equal(before[k], after[k])]
    assert not changed, changed
    # and the step after it trains again
    last = _checkpoint_tensors(ckpts / "step_00000003")
    assert any(not torch_equal(after[k], last[k]) for k in after)


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


# ---------------------------------------------------------------- no host reads between logs
SYNC_RUNS = {
    # name: (processes, overrides, DeepSpeed frames allowed to read a value per non-logging step).
    # Reads, synchronizations (DeepSpeed's throughput timer is off in the generated config) and
    # blocking host-to-device copies alike (ZeRO's NaN sentinel and the pipeline's batch copy:
    # pretrain.dsadapter.device_side_invalid_grad_norm, pretrain.run.data.to_device).
    "zero0": (1, ["parallel.zero_stage=0"], {}),
    "zero1-bf16": (1, ["parallel.zero_stage=1", "train.precision=bf16"], {}),
    # fp32 ZeRO-2 and ZeRO-3: DeepSpeed's own host check of the norm is left to our device guard
    # (pretrain.dsadapter.device_side_invalid_grad_norm)
    "zero2": (1, ["parallel.zero_stage=2"], {}),
    "zero3": (1, ["parallel.zero_stage=3"], {}),
    "tp2": (2, ["parallel.tensor=2", "parallel.zero_stage=0"], {}),
    "pp2": (2, ["parallel.pipeline=2", "parallel.zero_stage=0"], {}),
    # DeepSpeed's BF16_Optimizer under the pipeline; activation checkpointing recomputes blocks
    "pp2-zero1-bf16-checkpointing": (2, ["parallel.pipeline=2", "parallel.zero_stage=1", "train.precision=bf16",
                                         "model.activation_checkpointing=true"], {}),
}


def _probe(out, nproc, overrides):
    """Run tests/sync_probe.py (the trainer, counting reads, synchronizations and blocking copies per
    step) on nproc ranks."""
    import json
    import os
    import subprocess
    import sys

    from dist_util import free_port
    from train_util import TINY

    probe = Path(__file__).with_name("sync_probe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    env.pop("PRETRAIN_FAULTS", None)
    cmd = [sys.executable, str(probe), str(out / "reads"), *TINY, f"train.out_dir={out}", "model.vocab_size=512",
           "model.dropout=0.0", "logging.interval=4", "train.max_steps=6", "checkpoint.interval=0",
           "train.eval_interval=0", "logging.tensorboard=false", *overrides]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(nproc)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-3000:]
    return [json.loads((out / f"reads.rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("name", list(SYNC_RUNS))
def test_no_device_to_host_reads_between_logging_steps(tmp_path, name):
    nproc, overrides, allowed = SYNC_RUNS[name]
    for rank, reads in enumerate(_probe(tmp_path, nproc, overrides)):
        # steps 2, 3, 5: 4 and 6 log; step 1 is set-up (ZeRO-3 traces the module and builds its
        # optimizer in the first forward, broadcasting lists and formatting its arguments)
        quiet = [r for r in reads if r[0] in (1, 2, 4)]
        logged = [r for r in reads if r[0] == 3]
        assert logged, "the probe saw no reads at the logging step 4"  # the counter works
        by_place = {}
        for _, method, caller, callers_caller in quiet:
            place = next((p for p in allowed if p in callers_caller), f"{method} {caller} <- {callers_caller}")
            by_place[place] = by_place.get(place, 0) + 1
        assert by_place == {p: 3 * n for p, n in allowed.items()}, (rank, by_place)


def test_the_probe_counts_deepspeed_synchronizations(tmp_path):
    """The counter works on CPU: with DeepSpeed's synchronized throughput timer switched back on
    (the `deepspeed:` passthrough) the probe sees its accelerator synchronizations, two per
    micro-batch (4 micro-batches a step) from the timer's third step on; the generated config's
    timer is off (test_no_device_to_host_reads_between_logging_steps[zero0])."""
    from pretrain.config import deepspeed_config, load_config, resolve
    from train_util import TINY

    cfg = load_config(None, TINY)
    generated = deepspeed_config(cfg, resolve(cfg, 1, None, cuda_available=False))
    assert generated["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    timer = ["deepspeed.timers.throughput.enabled=true", "deepspeed.timers.throughput.synchronized=true"]
    reads = _probe(tmp_path, 1, ["parallel.zero_stage=0", *timer])[0]
    syncs = [r for r in reads if r[1] == "sync:accelerator" and r[0] in (1, 2, 4)]
    assert all("deepspeed/utils/timer.py" in r[2] for r in syncs), syncs[:3]
    assert [sum(r[0] == done for r in syncs) for done in (1, 2, 4)] == [0, 8, 8]


def test_the_probe_counts_blocking_copies():
    """What the probe calls a blocking host-to-device copy, in this process (CPU): a host tensor
    (from numpy, its views and clones) moved to a named device without non_blocking, host data
    made into a tensor on a named device, a host tensor copied into a device one."""
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator

    import sync_probe

    with sync_probe.counting() as events:
        batch = torch.from_numpy(np.zeros((2, 5), dtype=np.int64))
        batch[:, :-1].clone().to("cpu")  # DeepSpeed's pipeline copy of an input batch
        moved = batch.to(torch.device("cpu"), non_blocking=True)  # to_device on CPU: the move, not counted
        moved[:, 1:].clone().to("cpu")  # a device tensor already
        torch.tensor(-1.0, device="cpu")
        torch.tensor(-1.0)  # made on the host: no copy
        torch.zeros(3).copy_(torch.from_numpy(np.ones(3, dtype=np.float32)))
        torch.zeros(3).copy_(torch.ones(3))
        get_accelerator().synchronize()
    assert [e[1] for e in events] == ["h2d:to", "h2d:tensor", "h2d:copy_", "sync:accelerator"]
    assert all("test_train_step.py" in e[2] for e in events)  # the calling line
    assert not hasattr(torch.Tensor.to, "__wrapped__") and "to" not in vars(torch.Tensor)  # undone


def test_batches_are_pinned_before_the_copy_to_a_gpu(monkeypatch):
    """`pretrain.run.data.to_device`: on CUDA each batch is copied to pinned memory and then to the
    device with non_blocking (recorded here with torch.Tensor's two methods stubbed: no GPU); on
    CPU the batch itself comes back."""
    import torch

    from pretrain.run.data import to_device

    calls = []

    def pin_memory(self):
        calls.append("pin")
        out = self.clone()
        out.pinned = True
        return out

    def to(self, device, non_blocking=False):
        calls.append(("to", str(device), non_blocking, getattr(self, "pinned", False)))
        return self

    batch = torch.arange(6).reshape(2, 3)
    assert next(to_device(iter([batch]), torch.device("cpu"))) is batch
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    got = list(to_device(iter([batch, batch]), torch.device("cuda", 0)))
    assert calls == ["pin", ("to", "cuda:0", True, True)] * 2 and torch.equal(got[0], batch)


# ---------------------------------------------------------------- skip accounting
def test_loss_scale_events_do_not_count_as_skips():
    import torch

    from pretrain.run.steplog import LOSS_SCALE, OK, SKIP, SkipCount, StepLedger

    ledger = StepLedger()
    one, zero = torch.ones(()), torch.zeros(())
    # fp16 warm-up: DeepSpeed's loss scaler skips 6 steps without calling our optimizer
    for step in range(1, 7):
        ledger.add(step, torch.tensor(10.0), None, fp16=True)
    ledger.add(7, torch.tensor(5.0), one, fp16=True)  # our guard's verdict
    ledger.add(8, torch.tensor(4.0), None, fp16=True)  # an overflow between two guard skips
    ledger.add(9, torch.tensor(3.0), one, fp16=True)
    ledger.add(10, torch.tensor(2.0), zero, fp16=True)
    ledger.add(11, torch.tensor(1.0), None, fp16=False)  # bf16/fp32: DeepSpeed's own norm check = a skip
    got = ledger.settle()
    assert [o for _, _, o in got] == [LOSS_SCALE] * 6 + [SKIP, LOSS_SCALE, SKIP, OK, SKIP]
    assert got[9] == (10, 2.0, OK) and ledger.settle() == []
    count = SkipCount(total=5)
    for _, _, outcome in got:
        count.record(outcome)
    assert count.loss_scale_events == 7 and count.total == 5 + 3
    assert count.worst_run == 2 and count.in_a_row == 1  # the overflow neither counted nor broke the run
    count.reset_worst()
    assert count.worst_run == 1


# ---------------------------------------------------------------- train.compile
def test_compiled_blocks_train_like_eager(tmp_path):
    """train.compile=true (torch.compile of every block, inductor on CPU): fp32 losses equal eager's
    within 1e-5 over 10 steps."""
    common = ["train.max_steps=10", "checkpoint.interval=0", "model.dropout=0.0", "parallel.zero_stage=0",
              "train.eval_interval=0"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    check(run_train(eager, common))
    log = check(run_train(compiled, common + ["train.compile=true"], timeout=900))
    found = re.search(r"train.compile: (\d+) graph\(s\) compiled", log)
    assert found and int(found.group(1)) >= 1, log[-2000:]  # the blocks did run compiled
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == list(range(1, 11)) and a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2"]], ids=["tp2", "pp2"])
def test_compiled_blocks_train_like_eager_under_tensor_and_pipeline_parallelism(tmp_path, layout):
    """train.compile=true on 2 ranks, TP=2 and PP=2 (ZeRO-1): fp32 losses equal eager's within 1e-5."""
    common = ["train.max_steps=4", "checkpoint.interval=0", "model.dropout=0.0", "parallel.zero_stage=1",
              "train.eval_interval=0", *layout]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    check(run_train(eager, common, nproc=2))
    log = check(run_train(compiled, common + ["train.compile=true"], nproc=2, timeout=900))
    assert re.search(r"train.compile: [1-9]\d* graph\(s\) compiled", log), log[-2000:]
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == [1, 2, 3, 4] and a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


def test_compile_with_zero3_is_refused(tmp_path):
    proc = run_train(tmp_path / "run", ["train.compile=true", "parallel.zero_stage=3"])
    log = check(proc, rc=2)
    assert "train.compile does not work with parallel.zero_stage 3" in log and "Traceback" not in log
