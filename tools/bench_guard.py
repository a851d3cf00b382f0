"""The step-time cost of the `guard` section (docs/GUARD.md): the trainer with its defaults (spike
window on the device, rollback bookkeeping, hang watchdog, straggler times at logging steps) against
the same run with all of it off, alternating on/off for --repeat rounds, on the quickstart shape
(synthetic tokens, vocabulary 4096) unless told otherwise.

    python tools/bench_guard.py                       # quickstart shape, 5 + 40 steps, 3 rounds
    python tools/bench_guard.py --steps 20 --repeat 2 parallel.zero_stage=1

Reported: the mean step time of each run (metrics.jsonl `perf/step_time_ms`, warm-up excluded)
and its CPU seconds per step (bench_train's CPU stamps), the median of each side and the median
of the per-round ratios on/off.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the trainer runner and its shape handling)

OFF = ["guard.spike_sigma=0", "guard.rollback_after=0", "guard.step_timeout=0"]


def main() -> int:
    argv = sys.argv[1:]
    defaults = ["--config", str(bench_train.ROOT / "configs" / "quickstart.yaml"), "--steps", "40",
                "--warmup", "5", "--repeat", "3", "model.vocab_size=4096"]
    a, ov, env, tok = bench_train.ab_setup([*defaults, *argv], "bench_guard")  # later arguments win
    tmp = Path(tempfile.mkdtemp(prefix="bench_guard_"))

    def show(r, side, res):
        print(f"  round {r + 1} guard {side:3s}: {res['step_ms']:8.2f} ms/step, "
              f"{1e3 * (res['cpu_s_per_step'] or float('nan')):8.2f} ms CPU/step", flush=True)

    got = bench_train.alternate(a, ov, env, tok, {"on": [], "off": OFF}, tmp, show)
    runs = {side: [r["step_ms"] for r in rs] for side, rs in got.items()}
    # CPU seconds per step: less exposed to scheduling
    cpu = {side: [r["cpu_s_per_step"] or float("nan") for r in rs] for side, rs in got.items()}
    for what, xs, unit in (("wall", runs, 1.0), ("CPU", cpu, 1e3)):
        ratios = [on / off for on, off in zip(xs["on"], xs["off"])]
        print(f"{what}: guard on {unit * statistics.median(xs['on']):.2f} ms/step, off "
              f"{unit * statistics.median(xs['off']):.2f} ms/step; median/median "
              f"{statistics.median(xs['on']) / statistics.median(xs['off']):.3f}; per-round on/off median "
              f"{statistics.median(ratios):.3f} ({[round(x, 3) for x in ratios]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
