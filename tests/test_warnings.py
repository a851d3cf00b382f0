"""Third-party noise: the known-harmless messages are gone, real warnings stay, and a CPU run
compiles no DeepSpeed C++ op (pretrain/run/third_party.py)."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

from train_util import TINY

# DeepSpeed's accelerator notice is the only warning a clean CPU run may print (once per process).
ACCELERATOR = "Setting accelerator to CPU"


def warning_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"warn", line, re.I) and ACCELERATOR not in line]


def test_zero3_cpu_run_prints_no_known_harmless_warning_and_builds_no_op(tmp_path):
    ext = tmp_path / "torch_extensions"  # a fresh extension cache: any JIT build would land here
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext)}
    env.pop("PRETRAIN_FAULTS", None)
    cmd = [sys.executable, "-m", "pretrain.train", *TINY, f"train.out_dir={tmp_path / 'run'}",
           "train.max_steps=2", "parallel.zero_stage=3", "train.precision=bf16", "checkpoint.interval=0"]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # Without pretrain.run.third_party this run prints 37 FutureWarnings (ZeRO-3's collectives) and
    # DeepSpeed's "untested optimizer" line, after compiling deepspeed_shm_comm for 60-90 s.
    assert warning_lines(proc.stdout) == []
    assert proc.stdout.count(ACCELERATOR) <= 1
    assert "built successfully" not in proc.stdout
    assert not (ext / "deepspeed_shm_comm").exists()
    assert "done: step 2" in proc.stdout


def test_only_the_listed_messages_are_dropped():
    from pretrain.run.third_party import quiet_third_party

    ds_logger = logging.getLogger("DeepSpeed")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("c10d::broadcast_: an autograd kernel was not registered to the Autograd key(s)", UserWarning)
        warnings.warn("`torch.distributed.some_other_call` is deprecated", FutureWarning)  # real: kept
        warnings.warn("c10d::all_reduce_: an autograd kernel was not registered", UserWarning)  # kept
    assert [str(w.message) for w in seen] == ["`torch.distributed.some_other_call` is deprecated",
                                              "c10d::all_reduce_: an autograd kernel was not registered"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    ds_logger.addHandler(handler)
    try:
        ds_logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        ds_logger.warning("a real DeepSpeed warning")
    finally:
        ds_logger.removeHandler(handler)
    # Logger filters run before handlers: only the real warning reaches them.
    assert [r.getMessage() for r in records] == ["a real DeepSpeed warning"]
