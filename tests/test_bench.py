"""The benchmark tools' --smoke modes run in seconds and print their figures.

tools/bench_train.py (trainer vs the project's plain loop tools/plain_gpt.py; also the four-setup
suite behind tools/gpu_suite.sh), tools/bench_loader.py
(loader time per batch, sample index at scale) and tools/bench_memory.py (ZeRO 0-3 and
TP=2 per-rank memory beside the --plan estimate).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tool: str, *args: str, timeout: float = 240) -> tuple[str, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--smoke", *args], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:]
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-4000:]
    return r.stdout, json.loads(line[len("RESULT "):])


def test_bench_train_smoke():
    out, res = _run("bench_train.py")
    assert "| ours ZeRO-1 |" in out and "| plain eager |" in out
    assert "ratio ours ZeRO-1 / plain eager:" in out
    for side in ("ours", "baseline"):
        s = res[side]
        assert s["tokens_per_sec_median"] > 0 and s["step_ms_median"] > 0 and s["tflops_median"] > 0
        assert s["peak_rss_gib"] and s["peak_rss_gib"] > 0.05  # peak RSS of the process (CPU)
        assert len(s["runs"]) == 1 and s["runs"][0]["loss"] > 0
    assert res["ratio"]["pairs_median"] > 0
    assert res["flops_per_token"] > 0


def test_bench_train_failure_is_one_message_without_the_wrapper_script():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--smoke", "--only", "ours",
                        "model.n_head=3"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=240)
    assert r.returncode != 0
    assert "bench_train: command failed" in r.stdout or "error:" in r.stdout
    assert "atexit" not in r.stdout and "runpy" not in r.stdout  # the wrapper's text is not dumped


def test_bench_loader_smoke():
    out, res = _run("bench_loader.py")
    assert "ms per micro-batch" in out and "loader / step" in out and "target met: True" in out
    r = res["loader_real"]
    assert 0 < r["batch_ms_median"] < 1000
    idx = res["index"]
    assert idx["first"]["samples_per_epoch"] == (idx["tokens"] - 1) // idx["seq"]
    assert idx["first"]["documents"] == idx["docs"] and idx["first"]["tokens"] == idx["tokens"]
    assert idx["first"]["open_seconds"] > 0 and idx["first"]["open_peak_rss"] > 0
    assert "sample index epoch 0 (SampleIndex._build)" in idx["first"]["phases"]
    assert "index cache read (np.load)" in idx["cached"]["phases"]  # the second open hit the cache


def test_bench_memory_smoke():
    out, res = _run("bench_memory.py")
    names = [x["name"] for x in res]
    for run in ("ZeRO-0, DP=2", "ZeRO-1, DP=2", "ZeRO-2, DP=2", "ZeRO-3, DP=2", "TP=2, ZeRO-1"):
        assert names.count(run) == 2, names  # both ranks
    by = {(x["name"], x["rank"]): x for x in res}
    for x in res:
        assert x["rc"] == 0 and x["rss_peak"] >= x["rss_start"] > 0
        t = x["tensors"]
        assert t["total"] > 0 and t["weights"] > 0 and x["activations"] > 0
        assert x["estimate"]["total"] > 0
    # ZeRO-0 fp32 replicates everything: measured weights/grads/Adam = the estimate exactly
    z0 = by[("ZeRO-0, DP=2", 0)]
    assert z0["tensors"]["weights"] == z0["estimate"]["weights"]
    assert z0["tensors"]["optimizer"] == pytest.approx(z0["estimate"]["optimizer"], abs=1024)
    # ZeRO-3 shards the weights, TP=2 halves the parameters per rank
    assert by[("ZeRO-3, DP=2", 0)]["tensors"]["weights"] < 0.75 * z0["tensors"]["weights"]
    assert by[("TP=2, ZeRO-1", 0)]["estimate"]["params"] < z0["estimate"]["params"]
    assert "| ZeRO-3, DP=2 | 1 |" in out and "RSS start -> peak" in out
    assert "estimate vs measured peak, worst rank per run:" in out
    assert all(x["estimate_over_peak"] > 0 for x in res)
    assert by[("ZeRO-3, DP=2", 0)]["estimate"]["buffers"] > 0  # the gathered layer


def test_gpu_suite_smoke_runs_the_four_setups():
    """tools/gpu_suite.sh --smoke: the GPU suite's four setups (plain eager/compiled, ours ZeRO-1
    eager/compiled) on a tiny model, here on CPU (inductor compiles both compiled setups)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_suite.sh"), "--smoke"], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:]
    res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    names = ["plain compiled", "plain eager", "ours ZeRO-1 eager", "ours ZeRO-1 compiled"]
    assert list(res["setups"]) == names and res["reference"] == "plain compiled"
    assert "| tokens/s vs plain compiled |" in r.stdout.replace("peak memory ", "")
    for name in names:
        assert res["setups"][name]["tokens_per_sec_median"] > 0 and res["setups"][name]["runs"][0]["loss"] > 0
    assert res["ratios"]["plain compiled"] is None
    assert all(res["ratios"][n]["pairs_median"] > 0 for n in names[1:])


def test_bench_ckpt_smoke():
    out, res = _run("bench_ckpt.py")  # one rank here; the figures in docs/PERFORMANCE.md use two
    assert "stall per save: async" in out and "commit overhead vs bare save_checkpoint" in out
    assert set(res["median"]) == {"bare", "before", "sync", "async_stall", "async_total"}
    assert all(v > 0 for v in res["median"].values()) and res["world"] == 1
    bare = res["pt_bytes"]["bare"]  # the writer saves what DeepSpeed's own save writes (pickles differ slightly)
    assert set(res["pt_bytes"]) == {"bare", "before", "sync", "async"}
    assert bare > 0 and all(abs(n / bare - 1) < 0.01 for n in res["pt_bytes"].values()), res["pt_bytes"]


def test_bench_ckpt_load_smoke():
    out, res = _run("bench_ckpt.py", "--kinds", "load")
    assert "verification cost (full / sizes - 1)" in out and "first step after it" in out
    kinds = {f"{m}_{c}" for m in ("full", "sizes", "bare") for c in ("warm", "cold")}
    assert set(res["median"]) == kinds == set(res["first_step"])
    assert all(v > 0 for v in res["median"].values()) and res["checkpoint_gb"] > 0
