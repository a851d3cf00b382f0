"""tools/bench_prepare.py --smoke runs in seconds and reports throughput, memory and the ratio, and with
--profile the per-chunk CPU by step and the pool start both ways."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_prepare_smoke():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_prepare.py"), "--smoke", "--workers", "2",
                        "--profile"],
                       capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("| 1x", "| 10x"))]
    assert len(rows) == 2, r.stdout
    assert "tool MB/s" in r.stdout and "ratio tool/raw" in r.stdout and "peak RSS" in r.stdout
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("| tokenizer encode_batch_fast |")]
    assert len(steps) == 1 and float(steps[0].split("|")[3].strip(" %")) > 50, r.stdout  # the tokenizer dominates
    assert "pool of 2 worker(s), spawn: ready in" in r.stdout and "pool of 2 worker(s), fork: ready in" in r.stdout
