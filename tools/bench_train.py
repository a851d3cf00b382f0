"""Benchmark the trainer against the plain-PyTorch baseline, same model and batch, one invocation.

Runs, alternately (A, B, B, A, A, B, ...), `--repeat` times each:
  - ours: the real trainer, `python -m pretrain.train [--config FILE] overrides...` in a
    subprocess (config -> layout -> DeepSpeed engine -> training loop), on seeded synthetic
    tokens (`data.synthetic=true`) or on real shards (`--data DIR`); its per-step
    `perf/step_time_ms` is read from `metrics.jsonl`, the first `--warmup` steps excluded;
  - the baseline: `shared/baseline/plain_gpt.py` (plain eager or torch.compile PyTorch,
    AdamW, grad clipping) with the same shape, micro-batch and number of steps/warm-up.
Both run in a fresh process with the same thread settings. Reported per side: tokens/s,
step time, TFLOP/s (6N + 12*L*d*T FLOPs per token, `pretrain.plan.flops_per_token`), MFU
(when the device's peak is known or --peak-flops is given), peak memory (CPU: the process's
peak RSS; GPU: torch max_memory_allocated), and ours/baseline ratios: median of the
per-pair ratios, median/median and best/best.

Device: auto (CUDA when available). CPU: fp32, eager baseline. GPU: bf16 (DeepSpeed bf16
for ours, autocast bf16 for the baseline), `--baseline-mode compile` for the compiled one.
The baseline can only build the GPT-2 architecture (learned positions, LayerNorm, GELU,
biases, tied embeddings): other model configs are refused.

    python tools/bench_train.py --smoke                         # seconds (CI)
    python tools/bench_train.py                                 # CPU anchor: 6x384, V 50304, T 256, B 8
    python tools/bench_train.py --layers 12 --d-model 768 --heads 12 --seq 1024 --batch 16 \\
        --steps 20 --warmup 5 --baseline-mode compile           # 124M on a GPU
    python tools/bench_train.py --config configs/gpt2-124m.yaml --data data/openwebtext
Extra `section.key=value` arguments are passed to the trainer (e.g. parallel.zero_stage=0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/benchshape.py, tools/procmem.py
from benchshape import ANCHOR, SMOKE, add_shape_args, fill_defaults, shape_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
BASELINE = ROOT.parent / "shared" / "baseline" / "plain_gpt.py"

# Runs a script or module in this interpreter and prints, at exit, its peak RSS (Linux VmHWM, via
# tools/procmem.py; not printed where unknown) and the process CPU time (user + sys, all threads) at
# the end of every training step: for the trainer at each metrics line (logging.interval=1), for the
# baseline after each optimizer step. argv: tools dir, kind (module | path), target, its arguments.
_RSS_WRAPPER = r"""
import atexit, json, runpy, sys, time
sys.path.insert(0, sys.argv[1])
from procmem import status_bytes
sys.path.pop(0)
stamps = []
def _report():
    peak = status_bytes("VmHWM")
    if peak is not None:
        print("BENCH_PEAK_RSS", peak, flush=True)
    print("BENCH_CPU_STAMPS", json.dumps(stamps), flush=True)
atexit.register(_report)
kind, target = sys.argv[2], sys.argv[3]
sys.argv = [target] + sys.argv[4:]
if kind == "module":
    import pretrain.monitor as M
    _log = M.Monitor.log
    def log(self, step, scalars):
        stamps.append(time.process_time())
        return _log(self, step, scalars)
    M.Monitor.log = log
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda opt, args, kwargs: stamps.append(time.process_time()))
    runpy.run_path(target, run_name="__main__")
"""


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="trainer YAML config; its model shape and micro-batch are used")
    p.add_argument("--data", nargs="+", help="real data (manifest dirs / Megatron prefixes) instead of synthetic "
                                              "tokens for our side (the baseline always draws random tokens)")
    add_shape_args(p, "micro-batch (one process, no accumulation)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--repeat", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage for ours (default: the config's, 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="ours: auto = fp32 on CPU, bf16 on GPU (the baseline's autocast choice)")
    p.add_argument("--baseline-mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads for both (default: all cores)")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    p.add_argument("--only", choices=["ours", "baseline"], help="run one side only (profiling)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (seconds)")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides section.key=value")
    a = p.parse_args()
    if a.smoke:
        fill_defaults(a, SMOKE)
        a.steps, a.warmup, a.repeat = min(a.steps, 3), min(a.warmup, 1), 1
        a.threads = a.threads or 1  # two OpenMP threads on a shared 2-core machine can be 10-40x slower
    return a


def _shape(a):
    """Trainer overrides for the shape, and the resolved (cfg, layout)."""
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.run_data import data_vocab_size

    if a.config is None:
        fill_defaults(a, ANCHOR)
    ov = shape_overrides(a)
    if a.data:
        ov += ["data.synthetic=false", "data.paths=" + json.dumps(a.data)]
    else:
        ov.append("data.synthetic=true")
    if a.zero_stage is not None:
        ov.append(f"parallel.zero_stage={a.zero_stage}")
    import torch

    cuda = torch.cuda.is_available()
    precision = a.precision if a.precision != "auto" else ("bf16" if cuda else "fp32")
    # null: global = micro x data-parallel (1 process: 1), no gradient accumulation: the baseline's batch
    ov += [f"train.precision={precision}", "model.dropout=0.0", "train.global_batch_size=null"]
    cfg = load_config(a.config, ov + a.overrides)
    layout = resolve(cfg, 1, data_vocab_size(cfg.data.paths) if not cfg.data.synthetic else None)
    m = cfg.model
    gpt2 = (m.position == "learned" and m.norm == "layernorm" and m.mlp == "gelu" and m.bias and m.tie_embeddings
            and m.n_kv_head in (None, m.n_head) and m.d_ff in (None, 4 * m.d_model))
    if not gpt2:
        sys.exit("bench_train: the baseline builds only the GPT-2 architecture (learned positions, LayerNorm, "
                 "GELU 4d MLP, biases, tied embeddings); this config differs")
    return ov, cfg, layout, precision


def _env(threads):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd, env, timeout=None):
    r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"bench_train: command failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout[-4000:]}")
    rss = [int(ln.split()[1]) for ln in r.stdout.splitlines() if ln.startswith("BENCH_PEAK_RSS")]
    cpu = [json.loads(ln.split(None, 1)[1]) for ln in r.stdout.splitlines() if ln.startswith("BENCH_CPU_STAMPS")]
    return r.stdout, (rss[-1] if rss else None), (cpu[-1] if cpu else [])


def _cpu_per_step(stamps, warmup, steps):
    """CPU seconds per timed step from the per-step stamps (None when they do not fit)."""
    if warmup < 1 or len(stamps) < warmup + steps:
        return None
    return round((stamps[warmup + steps - 1] - stamps[warmup - 1]) / steps, 4)


def run_baseline(a, cfg, layout, env):
    m = cfg.model
    cmd = [sys.executable, "-c", _RSS_WRAPPER, str(TOOLS), "path", str(BASELINE), "--layers", str(m.n_layer),
           "--d-model", str(m.d_model), "--heads", str(m.n_head), "--vocab", str(layout.padded_vocab_size),
           "--seq", str(m.seq_len), "--batch", str(layout.micro_batch_size), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--mode", a.baseline_mode]
    out, rss, cpu = _run(cmd, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    return {"step_ms": res["step_ms"], "tokens_per_sec": res["tokens_per_sec"], "peak_rss": rss,
            "cpu_s_per_step": _cpu_per_step(cpu, a.warmup, a.steps),
            "peak_gpu_gib": res.get("peak_mem_gib"), "loss": res.get("loss")}


def run_ours(a, ov, run_dir, env, tok):
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = a.warmup + a.steps
    trainer_ov = ov + [f"train.max_steps={steps}", "train.eval_interval=0", "train.eval_steps=1",
                       "logging.interval=1", "logging.tensorboard=false", "checkpoint.interval=0",
                       "checkpoint.resume=none", "schedule.warmup_steps=0", f"train.out_dir={run_dir}"]
    cmd = [sys.executable, "-c", _RSS_WRAPPER, str(TOOLS), "module", "pretrain.train"]
    cmd += (["--config", a.config] if a.config else []) + trainer_ov + a.overrides
    out, rss, cpu = _run(cmd, env)
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "perf/step_time_ms" in r and r["step"] > a.warmup]
    if len(timed) != a.steps:
        sys.exit(f"bench_train: expected {a.steps} timed steps in {run_dir}/metrics.jsonl, got {len(timed)}")
    step_ms = statistics.fmean(r["perf/step_time_ms"] for r in timed)
    gpu = max((r.get("mem/allocated_gib") or 0.0) for r in timed) or None
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"step_ms": round(step_ms, 2), "tokens_per_sec": round(tok / (step_ms / 1e3)), "peak_rss": rss,
            "cpu_s_per_step": _cpu_per_step(cpu, a.warmup, a.steps),
            "peak_gpu_gib": round(gpu, 2) if gpu else None, "loss": timed[-1].get("train/loss")}


def _versions() -> dict:
    from importlib.metadata import version

    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": dev, "torch": torch.__version__, "deepspeed": version("deepspeed"),
            "python": platform.python_version()}


def _peak(a, precision):
    """The device's peak FLOP/s for MFU: --peak-flops, else the GPU's known peak; None on CPU."""
    import torch

    from pretrain.monitor import peak_flops

    return peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"), precision, a.peak_flops)


def main() -> int:
    a = _parse()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    ov, cfg, layout, precision = _shape(a)
    from pretrain.plan import count_params, flops_per_token

    fpt = flops_per_token(cfg.model, layout.padded_vocab_size)
    peak = _peak(a, precision)
    env = _env(a.threads)
    ver = _versions()
    m = cfg.model
    load0 = os.getloadavg()[0]
    shape = (f"{m.n_layer}x{m.d_model} ({m.n_head} heads), vocab {layout.padded_vocab_size}, T {m.seq_len}, "
             f"B {layout.micro_batch_size}, {count_params(m, layout.padded_vocab_size)['total']:,} parameters")
    print(f"bench_train: {shape}; ours ZeRO-{layout.zero_stage} {precision} "
          f"({'real data' if a.data else 'synthetic tokens'}), baseline {a.baseline_mode}; "
          f"{a.warmup} warm-up + {a.steps} timed steps, {a.repeat} alternating runs per side", flush=True)
    print(f"  {ver['device']}, torch {ver['torch']}, deepspeed {ver['deepspeed']}, python {ver['python']}; "
          f"load average at start {load0:.2f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    runs = {"ours": [], "baseline": []}
    try:
        for r in range(a.repeat):
            order = ["baseline", "ours"] if r % 2 == 0 else ["ours", "baseline"]
            for side in order:
                if a.only and side != a.only:
                    continue
                res = run_baseline(a, cfg, layout, env) if side == "baseline" else \
                    run_ours(a, ov, str(tmp / f"ours{r}"), env, layout.micro_batch_size * m.seq_len)
                res["load"] = round(os.getloadavg()[0], 2)
                runs[side].append(res)
                print(f"  run {r + 1} {side:8s}: {res['tokens_per_sec']:>10,} tok/s  {res['step_ms']:>10.1f} ms/step"
                      f"  {res['cpu_s_per_step'] or float('nan'):8.3f} CPU s/step  (load {res['load']})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(rs):
        if not rs:
            return None
        tps = [x["tokens_per_sec"] for x in rs]
        best = max(tps)
        med = statistics.median(tps)
        rss = max((x["peak_rss"] or 0) for x in rs) or None
        gpu = max((x["peak_gpu_gib"] or 0) for x in rs) or None
        cpus = [x["cpu_s_per_step"] for x in rs if x["cpu_s_per_step"]]
        return {"tokens_per_sec_median": round(med), "tokens_per_sec_best": best,
                "cpu_s_per_step_median": statistics.median(cpus) if cpus else None,
                "step_ms_median": round(statistics.median(x["step_ms"] for x in rs), 2),
                "tflops_median": med * fpt / 1e12, "mfu_median": med * fpt / peak if peak else None,
                "peak_rss_gib": rss / 2**30 if rss else None, "peak_gpu_gib": gpu, "runs": rs}

    s = {k: summary(v) for k, v in runs.items()}
    ratio = {}
    if s["ours"] and s["baseline"]:
        pairs = [o["tokens_per_sec"] / b["tokens_per_sec"] for o, b in zip(runs["ours"], runs["baseline"])]
        ratio = {"pairs_median": statistics.median(pairs), "pairs": [round(x, 3) for x in pairs],
                 "median_over_median": s["ours"]["tokens_per_sec_median"] / s["baseline"]["tokens_per_sec_median"],
                 "cpu_baseline_over_ours": (s["baseline"]["cpu_s_per_step_median"] / s["ours"]["cpu_s_per_step_median"]
                                            if s["ours"]["cpu_s_per_step_median"] and s["baseline"]["cpu_s_per_step_median"]
                                            else None),
                 "best_over_best": s["ours"]["tokens_per_sec_best"] / s["baseline"]["tokens_per_sec_best"]}

    def fmt(x, f):
        return "-" if x is None else f.format(x)

    print()
    print("| side | tokens/s median (best) | ms/step median | CPU s/step median | TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for side, label in (("ours", f"ours: trainer ZeRO-{layout.zero_stage} {precision}"),
                        ("baseline", f"baseline: plain {a.baseline_mode}")):
        x = s[side]
        if not x:
            continue
        mem = (f"{x['peak_gpu_gib']:.2f} GiB GPU, " if x["peak_gpu_gib"] else "") + \
            fmt(x["peak_rss_gib"], "{:.2f} GiB RSS")
        print(f"| {label} | {x['tokens_per_sec_median']:,} ({x['tokens_per_sec_best']:,}) | {x['step_ms_median']:.1f} | "
              f"{fmt(x['cpu_s_per_step_median'], '{:.3f}')} | {x['tflops_median']:.3f} | {fmt(x['mfu_median'] and 100 * x['mfu_median'], '{:.1f}%')} | {mem} |")
    if ratio:
        print(f"\nratio ours/baseline tokens/s: {ratio['pairs_median']:.3f} (median of per-pair ratios "
              f"{ratio['pairs']}); median/median {ratio['median_over_median']:.3f}; best/best {ratio['best_over_best']:.3f}; "
              f"CPU time per step baseline/ours {fmt(ratio['cpu_baseline_over_ours'], '{:.3f}')}")
    print(f"FLOPs per token {fpt:,} (6N + 12*L*d*T); MFU {'vs peak ' + format(peak, '.4g') + ' FLOP/s' if peak else 'n/a (no known peak; --peak-flops)'}; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    result = {"shape": shape, "zero_stage": layout.zero_stage, "precision": precision,
              "baseline_mode": a.baseline_mode, "steps": a.steps, "warmup": a.warmup, "repeat": a.repeat,
              "flops_per_token": fpt, "peak_flops": peak, **ver, "ours": s["ours"], "baseline": s["baseline"],
              "ratio": ratio, "overrides": ov + a.overrides}
    print("RESULT " + json.dumps(result), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
