"""The trainer's guards before step 1 and at a stop: the run-directory lock, directories that
cannot be written, the DeepSpeed pass-through checked by DeepSpeed's own config model, and
stop signals that keep a clean stop clean (exit 0, exact resume)."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from fault_util import one_error_line, run_split, small_fs, train_cmd
from train_util import TINY, check, losses, metrics, run_train

ROOT = Path(__file__).absolute().parents[1]


@pytest.fixture(scope="module")
def alone_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone")
    check(run_train(out))
    return out


@pytest.fixture(scope="module")
def alone(alone_run):
    return losses(alone_run)


def test_plan_checkpoint_estimate_is_near_a_real_checkpoint(alone_run):
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.plan.estimate import checkpoint_bytes

    cfg = load_config(None, list(TINY))
    tag = alone_run / "checkpoints" / "step_00000006"
    real = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    assert 0.9 < checkpoint_bytes(cfg, resolve(cfg, 1)) / real < 1.1, real


def test_second_trainer_on_one_directory_is_refused_and_the_first_is_unharmed(alone, tmp_path):
    out = tmp_path / "run"
    # Both start at once; each step sleeps 1 s, so the winner holds the lock for 6 s or more.
    procs = [run_split(train_cmd(out), faults="sleep=1", wait=False) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    refused = [r for r in results if r[0].returncode == 2]
    finished = [r for r in results if r[0].returncode == 0]
    assert len(refused) == 1 and len(finished) == 1, [(p.returncode, err[-2000:]) for p, _, err in results]
    winner = finished[0][0]
    line = one_error_line(refused[0][2], "in use by another trainer", str(out), f"pid {winner.pid}", "host ")
    assert "started 20" in line
    assert losses(out) == alone
    steps = [m["step"] for m in metrics(out) if "train/loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # one writer of metrics.jsonl


def test_checkpoint_dir_shared_by_two_runs_is_refused(tmp_path):
    from pretrain.errors import UserError
    from pretrain.run.lock import lock_run

    ck = tmp_path / "ck"
    for d in (tmp_path / "a", tmp_path / "b", ck):
        d.mkdir()
    held = lock_run(tmp_path / "a", ck, print)
    try:
        # flock is per open file: a second open in this process conflicts like another process
        with pytest.raises(UserError, match=r"checkpoint.dir .*ck is in use by another trainer \(host .*pid"):
            lock_run(tmp_path / "b", ck, print)
        assert (tmp_path / "b" / ".pretrain.lock").exists()
    finally:
        for fh in held:
            fh.close()
    for fh in lock_run(tmp_path / "b", ck, print):  # the holder ended: the lock is free
        fh.close()


@pytest.mark.parametrize("case", ["out_dir_file", "ckpt_dir_file", "out_dir_readonly"])
def test_unwritable_directories_fail_before_step_1_with_one_line(tmp_path, case):
    out = tmp_path / "run"
    overrides, frag = [], []
    if case == "out_dir_file":
        out.write_text("precious\n")
        frag = ["train.out_dir", "exists and is not a directory"]
    elif case == "ckpt_dir_file":
        (tmp_path / "ck").write_text("precious\n")
        overrides = [f"checkpoint.dir={tmp_path / 'ck'}"]
        frag = ["checkpoint.dir", "exists and is not a directory"]
    if case == "out_dir_readonly":
        with small_fs(tmp_path / "ro", readonly=True):
            proc = run_split(train_cmd(tmp_path / "ro" / "run"))
        frag = ["train.out_dir", "read-only"]
    else:
        proc = run_split(train_cmd(out, overrides))
    assert proc.returncode == 2, proc.stderr[-2000:]
    one_error_line(proc.stderr, *frag)
    assert "step 1" not in proc.stdout
    if case == "out_dir_file":
        assert out.read_text() == "precious\n"
    if case == "ckpt_dir_file":
        assert (tmp_path / "ck").read_text() == "precious\n"
        assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,frag", [
    ("deepspeed.zero_optimization.stage3_prefech_bucket_size=5", "deepspeed.zero_optimization.stage3_prefech_bucket_size"),
    ("deepspeed.zero_optimization.reduce_bucket_size=lots", "deepspeed.zero_optimization.reduce_bucket_size"),
    ("deepspeed.bf16.enabld=true", "deepspeed.bf16.enabld"),
    ("deepspeed.zero_optimisation.stage=2", "did you mean deepspeed.zero_optimization"),
])
def test_deepspeed_passthrough_checked_by_deepspeed_before_start(override, frag, capsys):
    from pretrain.train import main

    assert main([*TINY, override, "--check"]) == 2
    err = capsys.readouterr().err
    line = one_error_line(err, frag, "DeepSpeed")
    assert line.count("\n") == 0
    assert main([*TINY, "--check"]) == 0


def test_free_space_below_one_checkpoint_warns(tmp_path):
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.plan.estimate import checkpoint_bytes
    from pretrain.plan.preflight import check_free_space

    cfg = load_config(None, list(TINY))
    lay = resolve(cfg, 1)
    assert checkpoint_bytes(cfg, lay) > 1.5 * 2**20  # 126,720 parameters x (4 + 12) bytes
    said = []
    with small_fs(tmp_path / "small", size="1m") as d:
        check_free_space(cfg, lay, d, said.append)
    check_free_space(cfg, lay, tmp_path, said.append)  # plenty of room: silent
    assert len(said) == 1 and "warning:" in said[0] and "GiB free" in said[0], said


def test_sigterm_while_importing_and_again_at_exit_still_stops_cleanly(alone, tmp_path):
    out = tmp_path / "run"
    proc = run_split(train_cmd(out), wait=False)
    time.sleep(0.2)  # torch is still importing: the handler must already be there
    proc.send_signal(signal.SIGTERM)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "stop requested" in line:
            proc.send_signal(signal.SIGTERM)  # during the real interpreter shutdown
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + rest + err[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    check(run_train(out))
    assert losses(out) == alone


def test_second_stop_signal_is_absorbed_20_runs_all_exit_0_and_resume_exactly(tmp_path):
    # 20 runs: SIGTERM after the first step, then SIGTERM or SIGUSR1 again 0-300 ms after the run
    # said it saved and is exiting (a scheduler and a launcher both signalling); each run must
    # exit 0 and resume exactly. Without the absorbing handler, these runs exit -15 / -10.
    # One process imports the trainer once and forks the runs (tests/fork_trainer.py).
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"trials": 20, "seed": 15, "root": str(tmp_path),
                                "base": [*TINY, "logging.tensorboard=false"]}))
    result = tmp_path / "result.json"
    proc = run_split([sys.executable, str(ROOT / "tests" / "fork_trainer.py"), str(spec), str(result)],
                     faults="sleep=0.2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["straight_rc"] == 0 and sorted(map(int, r["straight"])) == list(range(1, 7))
    gaps = [t["gap_ms"] for t in r["trials"]]
    assert len(gaps) == 20 and min(gaps) < 50 and max(gaps) > 250
    for t in r["trials"]:
        assert t["first_step_seen"] and t["stop_seen"] and t["stop_rc"] == 0 and t["resume_rc"] == 0, t
        assert 1 <= t["stopped_at"] < 6, t
        assert t["losses"] == r["straight"], t


def test_out_of_vocabulary_id_under_structure_verification_is_one_line(tmp_path):
    import numpy as np

    from pretrain.data.indexed import write_pair

    prefix = tmp_path / "bare" / "corpus_text_document"
    prefix.parent.mkdir()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 258, 200) for _ in range(20)]
    for d in docs[::3]:
        d[::40] = 1000  # beyond model.vocab_size and the padded table (384 rows): IndexError without the check
    write_pair(str(prefix), docs, np.uint16)
    overrides = ["data.synthetic=false", f"data.paths=[{prefix}]"]
    proc = run_split(train_cmd(tmp_path / "run", overrides))
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, "token id 1000", "outside the vocabulary 0..257", "pretrain-shards verify")
    assert "IndexError" not in proc.stderr


def test_lock_of_a_killed_holder_is_free(tmp_path):
    import os
    import subprocess

    from pretrain.run.lock import lock_run

    (tmp_path / "ck").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pretrain.run.lock import lock_run; "
         f"h = lock_run(Path({str(tmp_path)!r}), Path({str(tmp_path / 'ck')!r}), print); "
         "print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from pretrain.errors import UserError

        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            lock_run(tmp_path, tmp_path / "ck", print)
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the flock
        holder.wait(timeout=30)
        for fh in lock_run(tmp_path, tmp_path / "ck", print):
            fh.close()
    finally:
        if holder.poll() is None:
            holder.kill()
