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

import os
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
    sys.argv = [sys.argv[0], *defaults, *argv]  # later arguments win
    a = bench_train._parse()
    os.chdir(bench_train.ROOT)
    ov, cfg, layout, _ = bench_train._shape(a)
    env = bench_train._env(a.threads)
    tok = layout.micro_batch_size * cfg.model.seq_len
    ver = bench_train._versions()
    print(f"bench_guard: {cfg.model.n_layer}x{cfg.model.d_model}, T {cfg.model.seq_len}, B {layout.micro_batch_size}; "
          f"{a.warmup} warm-up + {a.steps} timed steps, {a.repeat} round(s); {ver['device']}, torch {ver['torch']}, "
          f"deepspeed {ver['deepspeed']}", flush=True)
    runs: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}  # CPU seconds per step: less exposed to scheduling
    tmp = Path(tempfile.mkdtemp(prefix="bench_guard_"))
    for r in range(a.repeat):
        for side in (("on", "off") if r % 2 == 0 else ("off", "on")):
            saved = a.overrides
            a.overrides = saved + (OFF if side == "off" else [])
            res = bench_train.run_ours(a, ov, str(tmp / f"{side}{r}"), env, tok, None)
            a.overrides = saved
            runs[side].append(res["step_ms"])
            cpu[side].append(res["cpu_s_per_step"] or float("nan"))
            print(f"  round {r + 1} guard {side:3s}: {res['step_ms']:8.2f} ms/step, "
                  f"{1e3 * cpu[side][-1]:8.2f} ms CPU/step", flush=True)
    for what, xs, unit in (("wall", runs, 1.0), ("CPU", cpu, 1e3)):
        ratios = [on / off for on, off in zip(xs["on"], xs["off"])]
        print(f"{what}: guard on {unit * statistics.median(xs['on']):.2f} ms/step, off "
              f"{unit * statistics.median(xs['off']):.2f} ms/step; median/median "
              f"{statistics.median(xs['on']) / statistics.median(xs['off']):.3f}; per-round on/off median "
              f"{statistics.median(ratios):.3f} ({[round(x, 3) for x in ratios]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
