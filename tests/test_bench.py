"""The benchmark tools' --smoke modes run in seconds and print their figures.

tools/bench_train.py (trainer vs shared/baseline/plain_gpt.py), tools/bench_loader.py
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
BASELINE = ROOT.parent / "shared" / "baseline" / "plain_gpt.py"


def _run(tool: str, *args: str, timeout: float = 240) -> tuple[str, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--smoke", *args], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:]
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-4000:]
    return r.stdout, json.loads(line[len("RESULT "):])


@pytest.mark.skipif(not BASELINE.is_file(), reason=f"no baseline at {BASELINE}")
def test_bench_train_smoke():
    out, res = _run("bench_train.py")
    assert "| ours: trainer ZeRO-1 fp32 |" in out and "| baseline: plain eager |" in out
    assert "ratio ours/baseline tokens/s:" in out
    for side in ("ours", "baseline"):
        s = res[side]
        assert s["tokens_per_sec_median"] > 0 and s["step_ms_median"] > 0 and s["tflops_median"] > 0
        assert s["peak_rss_gib"] and s["peak_rss_gib"] > 0.05  # peak RSS of the process (CPU)
        assert len(s["runs"]) == 1 and s["runs"][0]["loss"] > 0
    assert res["ratio"]["pairs_median"] > 0
    assert res["flops_per_token"] > 0


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


def test_bench_ckpt_smoke():
    out, res = _run("bench_ckpt.py")  # one rank here; the figures in docs/PERFORMANCE.md use two
    assert "stall per save: async" in out and "commit overhead vs bare save_checkpoint" in out
    assert set(res["median"]) == {"bare", "before", "sync", "async_stall", "async_total"}
    assert all(v > 0 for v in res["median"].values()) and res["world"] == 1
