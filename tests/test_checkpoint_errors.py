"""Checkpoint faults get one line: disk full / read-only during a save (on a small tmpfs), no silent
restart from step 0, resume messages that name the changed key or source, a precision change."""
from __future__ import annotations

import contextlib
import shutil
import subprocess

import pytest

from fault_util import one_error_line, run_split, small_fs, train_cmd
from pretrain.checkpoint import store
from train_util import check, losses, run_train

FAST = ["logging.tensorboard=false"]


def _run(out, overrides=()):
    """The trainer with stderr kept apart: (returncode, stdout, stderr)."""
    p = run_split(train_cmd(out, [*FAST, *overrides]))
    return p.returncode, p.stdout, p.stderr


def _one_error_line(rc, stdout, stderr) -> str:
    assert rc == 2, (rc, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout, stdout[-3000:]
    return one_error_line(stderr)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a small tmpfs (root, as in CI), unmounted afterwards."""
    with contextlib.ExitStack() as stack:
        yield lambda size: stack.enter_context(small_fs(tmp_path / "tmpfs", size))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A run committed at step 3 (copied by each test that changes something)."""
    out = tmp_path_factory.mktemp("three")
    check(run_train(out, ["train.max_steps=3", "checkpoint.interval=0", *FAST]))
    return out


def _copy(run, dst):
    shutil.copytree(run, dst)
    return dst


def test_disk_full_during_save_names_the_file_and_last_commit(tmpfs, tmp_path):
    ckpts = tmpfs("3m")  # one checkpoint of the tiny model (~2.1 MB) fits, a second does not
    rc, out, err = _run(tmp_path / "run", [f"checkpoint.dir={ckpts}", "checkpoint.interval=3", "checkpoint.keep_last=3"])
    line = _one_error_line(rc, out, err)
    assert line.startswith("error: disk full writing ") and str(ckpts / "step_00000006") in line
    assert line.endswith(f"the last committed checkpoint is step 3 ({ckpts / 'step_00000003'})")
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    assert store.verify(ckpts / "step_00000003") is None  # nothing good lost
    assert not (ckpts / "step_00000006").exists()  # the partial save is gone, never committed


def test_disk_full_on_two_ranks_stops_every_rank_with_the_same_line(tmpfs, tmp_path):
    """ZeRO-1, DP=2: whichever rank's write fails first, every rank gets its one line at the next
    wait (the verdict is gathered), exits 2 and leaves the last commit as it was."""
    ckpts = tmpfs("3m")
    proc = run_train(tmp_path / "run", [*FAST, f"checkpoint.dir={ckpts}", "checkpoint.interval=3",
                                        "checkpoint.keep_last=3", "parallel.zero_stage=1"], nproc=2)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [ln.split("error: ", 1)[1] for ln in proc.stdout.splitlines() if "error: " in ln]
    assert len(errors) == 2 and errors[0] == errors[1], errors  # one line per rank, the same
    assert errors[0].startswith("disk full writing ") and str(ckpts / "step_00000006") in errors[0]
    assert errors[0].endswith(f"the last committed checkpoint is step 3 ({ckpts / 'step_00000003'})")
    assert store.verify(ckpts / "step_00000003") is None and not (ckpts / "step_00000006").exists()


def test_read_only_checkpoint_dir_is_refused_before_training(tmpfs, tmp_path):
    ckpts = tmpfs("64m")
    run = tmp_path / "run"
    check(run_train(run, ["train.max_steps=3", "checkpoint.interval=0", f"checkpoint.dir={ckpts}", *FAST]))
    subprocess.run(["mount", "-o", "remount,ro", str(ckpts)], check=True)
    rc, out, err = _run(run, [f"checkpoint.dir={ckpts}"])
    line = _one_error_line(rc, out, err)
    # Refused before step 1 by the pre-flight check (pretrain.plan.preflight), so nothing is trained
    # that could not be saved. (A file system that turns read-only in the middle of a save takes
    # the same path as a full disk, test above; it cannot be remounted here while the trainer
    # holds its lock file open for writing.)
    assert line.startswith("error: cannot write checkpoint.dir ") and "read-only" in line
    assert "step 4" not in out and store.verify(ckpts / "step_00000003") is None


def test_no_silent_restart_when_no_checkpoint_verifies(three_steps, tmp_path):
    run = _copy(three_steps, tmp_path / "run")
    shard = next((run / "checkpoints" / "step_00000003").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: the sizes check sees it
    line = _one_error_line(*_run(run))
    assert "no checkpoint verifies" in line and "step_00000003" in line and "checkpoint.resume=none" in line
    assert not (run / "checkpoints" / "step_00000006").exists()  # refused before training anything
    rc, out, err = _run(run, ["checkpoint.resume=none"])  # the explicit start-over
    assert rc == 0, err[-2000:]
    assert store.verify(run / "checkpoints" / "step_00000003") is None  # rewritten by the new run


def test_changed_model_key_is_named(three_steps, tmp_path):
    run = _copy(three_steps, tmp_path / "run")
    line = _one_error_line(*_run(run, ["model.n_layer=3"]))
    assert "model.n_layer is 2 in the checkpoint, 3 in the config" in line and "{" not in line


def test_precision_change_is_one_line(three_steps, tmp_path):
    run = _copy(three_steps, tmp_path / "run")
    line = _one_error_line(*_run(run, ["train.precision=bf16"]))
    assert "train.precision=fp32" in line and "bf16" in line


def test_changed_data_or_lr_needs_the_override(three_steps, tmp_path):
    run = _copy(three_steps, tmp_path / "run")
    line = _one_error_line(*_run(run, ["data.seed=99"]))
    assert "data.seed 1234 -> 99" in line and "checkpoint.allow_changes=[data]" in line
    line = _one_error_line(*_run(run, ["optim.lr=0.001", "schedule.kind=linear"]))
    assert "optim.lr 0.0006 -> 0.001" in line and "schedule.kind 'cosine' -> 'linear'" in line
    assert "checkpoint.allow_changes=[optim,schedule]" in line
    rc, out, err = _run(run, ["data.seed=99", "checkpoint.allow_changes=[data]"])
    assert rc == 0, err[-2000:]
    assert "resuming with a change: data.seed 1234 -> 99" in out and "resumed from" in out
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_changed_data_source_is_named(bpe_data, tmp_path):
    data = shutil.copytree(bpe_data, tmp_path / "data")
    run = tmp_path / "run"
    common = ["data.synthetic=false", "model.vocab_size=null", f"data.paths=[{data}]", *FAST]
    check(run_train(run, [*common, "train.max_steps=2", "checkpoint.interval=0"]))
    other = shutil.copytree(bpe_data, tmp_path / "other")
    line = _one_error_line(*_run(run, [*common[:2], f"data.paths=[{data},{other}]"]))
    assert f"data.paths: {other.resolve()} added" in line and "checkpoint.allow_changes=[data]" in line
