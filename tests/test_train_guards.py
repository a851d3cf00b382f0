"""The trainer's guards before step 1 and at a stop: the run-directory lock, directories that
cannot be written, the DeepSpeed pass-through checked by DeepSpeed's own config model, and
stop signals that keep a clean stop clean (exit 0, exact resume)."""
from __future__ import annotations

import os
import signal
import subprocess
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


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (Linux: SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _stop_twice(out: Path, gap_s: float, second: int) -> dict:
    """The real `pretrain-train`: SIGTERM after its first step, then `second` `gap_s` after its
    handler took the first (a scheduler and a launcher both signalling), while the run finishes
    the step, saves and exits; then the resume (tests/warm.py)."""
    import threading

    exe = str(Path(sys.executable).with_name("pretrain-train"))
    args = [*TINY, f"train.out_dir={out}", "logging.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PRETRAIN_FAULTS": "sleep=0.2"}
    proc = subprocess.Popen([exe, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {"first_step": False, "stop": False, "alive": False}

    def again():
        handled = time.monotonic() + 30
        while proc.poll() is None and _catches_sigterm(proc.pid) and time.monotonic() < handled:
            time.sleep(0.005)  # until the first signal's handler has run: it no longer catches SIGTERM
        time.sleep(gap_s)
        seen["alive"] = proc.poll() is None  # it lands inside the stop: step, save or exit
        proc.send_signal(second)

    timer = threading.Thread(target=again)
    try:
        for line in proc.stdout:
            if not seen["first_step"] and line.startswith("step "):
                seen["first_step"] = True
                proc.send_signal(signal.SIGTERM)
                timer.start()
            seen["stop"] |= "stop requested" in line
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    if timer.is_alive() or seen["first_step"]:
        timer.join()
    stopped = (out / "checkpoints" / "latest").read_text().strip() if (out / "checkpoints" / "latest").exists() else ""
    resume = run_train(out, ["logging.tensorboard=false"])  # the resume is not what is tested: a warm fork
    return {**seen, "stop_rc": proc.returncode, "log": log[-2000:], "stopped": stopped,
            "resume_rc": resume.returncode, "losses": losses(out)}


def test_second_stop_signal_is_absorbed_20_runs_all_exit_0_and_resume_exactly(alone, tmp_path):
    # 20 runs of the real command, two at a time: SIGTERM after the first step, then SIGTERM or
    # SIGUSR1 again 0-300 ms after its handler ran, while the run finishes its step, saves and
    # exits. Each run must exit 0 and resume exactly. Without the absorbing handler (SIG_IGN after
    # the first signal), these runs exit -15 / -10.
    from concurrent.futures import ThreadPoolExecutor

    gaps = [0.3 * i / 19 for i in range(20)]
    seconds = [signal.SIGTERM if i % 2 else signal.SIGUSR1 for i in range(20)]
    with ThreadPoolExecutor(2) as pool:
        trials = list(pool.map(lambda i: _stop_twice(tmp_path / f"t{i:02d}", gaps[i], seconds[i]), range(20)))
    assert sum(t["alive"] for t in trials) >= 15, [t["alive"] for t in trials]  # the second signal met a live run
    for gap, t in zip(gaps, trials):
        assert t["first_step"] and t["stop"] and t["stop_rc"] == 0, (gap, t["stop_rc"], t["log"])
        assert t["stopped"].startswith("step_") and 1 <= int(t["stopped"][5:]) < 6, t["stopped"]
        assert t["resume_rc"] == 0 and t["losses"] == alone, (gap, t["losses"])


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


def test_a_holder_that_has_not_written_its_name_yet_is_waited_for(tmp_path):
    """The refused trainer's line names the holder also when the holder took the lock a moment
    before writing its name (the window a clean run of the two-trainer test once hit)."""
    import fcntl
    import threading

    from pretrain.errors import UserError
    from pretrain.run.lock import LOCK_NAME, lock_dir

    holder = open(tmp_path / LOCK_NAME, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, name not written yet

    def write_name():
        holder.write("host h1, pid 7, started 2026-12-06\n")
        holder.flush()

    timer = threading.Timer(0.2, write_name)
    timer.start()
    try:
        with pytest.raises(UserError, match=r"in use by another trainer \(host h1, pid 7, started 2026"):
            lock_dir(tmp_path, "train.out_dir", print)
    finally:
        timer.join()
        holder.close()
