"""eval.tasks during training (issue 23): lm-evaluation-harness on the live engine at eval.interval
and at the end, RNG states restored (exact resume unchanged), a task that cannot load dropped."""
from __future__ import annotations

import math
import signal
import time

import pytest

from eval_util import write_tasks
from train_util import check, losses, metrics, run_train

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'pretrain[eval]'")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _data(bpe_data):
    return ["data.synthetic=false", "model.vocab_size=null", f"data.paths=[{bpe_data}]"]


def _eval(tasks, names=("tiny_mc",)):
    return [f"eval.tasks=[{', '.join(names)}]", f"eval.include_path={tasks}", "eval.interval=2", "eval.limit=8"]


def test_dp2_writes_eval_scalars_at_the_interval_and_drops_a_broken_task(bpe_data, tasks, tmp_path):
    out = tmp_path / "run"
    log = check(run_train(out, [*_data(bpe_data), *_eval(tasks, ("tiny_mc", "broken_mc")), "train.max_steps=5",
                                "checkpoint.interval=0"], nproc=2))
    assert "broken_mc" in log and log.count("warning") >= 1 and "done: step 5" in log
    rows = [m for m in metrics(out) if "eval/tiny_mc/acc" in m]
    assert [m["step"] for m in rows] == [2, 4, 5]  # every 2 steps, and at the end
    assert all(0.0 <= m["eval/tiny_mc/acc"] <= 1.0 for m in rows)
    assert not any(k.startswith("eval/broken_mc") for m in metrics(out) for k in m)
    seconds = [m for m in metrics(out) if "perf/eval_seconds" in m]
    assert [m["step"] for m in seconds] == [2, 4, 5]


def test_losses_with_eval_equal_losses_without_and_resume_across_sigterm_is_exact(bpe_data, tasks, tmp_path):
    """Dropout on: a draw of evaluation's left in a generator would change every later loss."""
    plain = tmp_path / "plain"
    check(run_train(plain, [*_data(bpe_data), "train.max_steps=8", "checkpoint.interval=3"]))
    with_eval = tmp_path / "eval"
    check(run_train(with_eval, [*_data(bpe_data), *_eval(tasks), "train.max_steps=8", "checkpoint.interval=3"]))
    assert losses(with_eval) == losses(plain)  # bitwise
    stopped = tmp_path / "stopped"
    overrides = [*_data(bpe_data), *_eval(tasks), "train.max_steps=8", "checkpoint.interval=3"]
    proc = run_train(stopped, overrides, faults="sleep=0.5", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and not any(m.get("step", 0) >= 3 for m in metrics(stopped)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "stop requested" in log, log[-3000:]
    check(run_train(stopped, overrides))
    assert losses(stopped) == losses(plain)
    acc = {m["step"]: m["eval/tiny_mc/acc"] for m in metrics(stopped) if "eval/tiny_mc/acc" in m}
    assert set(acc) >= {6, 8} and all(math.isfinite(v) for v in acc.values())
