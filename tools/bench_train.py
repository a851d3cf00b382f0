"""Benchmark the trainer against the project's plain-PyTorch loop, same model and batch, one invocation.

Setups (each run in a fresh process with the same thread settings, alternating A B .. B A ..
for `--repeat` rounds):
  - ours: the real trainer, `python -m pretrain.train [--config FILE] overrides...` (config ->
    layout -> DeepSpeed engine -> training loop), on seeded synthetic tokens (`data.synthetic=true`)
    or on real shards (`--data DIR`); its per-step `perf/step_time_ms` is read from
    `metrics.jsonl` (logging.interval=1), the first `--warmup` steps excluded;
  - plain: `tools/plain_gpt.py` (the same `pretrain.model.GPT` in a plain loop: full-logits
    cross entropy, torch AdamW, grad clipping; eager or torch.compile of the whole model) with the
    same shape, micro-batch and number of steps/warm-up.
By default one plain (`--baseline-mode`) and one ours (train.compile from the config); `--suite`
runs four: plain eager, plain compiled, ours eager, ours compiled (`train.compile`), and reports
each against plain compiled. Reported per setup: tokens/s, step time, TFLOP/s (6N + 12*L*d*T
FLOPs per token, `pretrain.plan.estimate.flops_per_token`), MFU (when the device's peak is known or
--peak-flops is given), peak memory (CPU: the process's peak RSS; GPU: torch
max_memory_allocated), and the ratio to the reference: median of the per-round ratios.

Device: auto (CUDA when available). CPU: fp32. GPU: bf16 (DeepSpeed bf16 for ours, autocast
bf16 for plain).

    python tools/bench_train.py --smoke                         # seconds (CI)
    python tools/bench_train.py                                 # CPU anchor: 6x384, V 50304, T 256, B 8
    python tools/bench_train.py --suite --layers 12 --d-model 768 --heads 12 --seq 1024 --batch 16 \\
        --steps 20 --warmup 5                                   # 124M on a GPU (tools/gpu_suite.sh)
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

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the pretrain package, from a clone
from pretrain.errors import cli_entry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
PLAIN = TOOLS / "plain_gpt.py"

# Runs a script or module in this interpreter and prints, at exit, its peak RSS (Linux VmHWM, via
# tools/procmem.py; not printed where unknown) and the process CPU time (user + sys, all threads) at
# the end of every training step: for the trainer at each metrics line (logging.interval=1), for the
# plain loop after each optimizer step. argv: tools dir, kind (module | path), target, its arguments.
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
    import pretrain.run.monitor as M
    _log = M.Monitor.log
    def log(self, step, scalars, **kw):
        stamps.append(time.process_time())
        return _log(self, step, scalars, **kw)
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
                                              "tokens for our side (the plain loop always draws random tokens)")
    add_shape_args(p, "micro-batch (one process, no accumulation)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--repeat", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage for ours (default: the config's, 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="ours: auto = fp32 on CPU, bf16 on GPU (the plain loop's autocast choice)")
    p.add_argument("--baseline-mode", choices=["eager", "compile"], default="eager", help="the plain loop's mode")
    p.add_argument("--suite", action="store_true",
                   help="four setups: plain eager, plain compiled, ours eager, ours compiled (vs plain compiled)")
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads for both (default: all cores)")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    p.add_argument("--only", choices=["ours", "plain"], help="run only that kind of setup (profiling)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps (seconds)")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides section.key=value")
    a = p.parse_intermixed_args()  # overrides may come before and after options (bench_guard adds its own)
    if a.smoke:
        fill_defaults(a, SMOKE)
        a.steps, a.warmup, a.repeat = min(a.steps, 3), min(a.warmup, 1), 1
        a.threads = a.threads or 1  # two OpenMP threads on a shared 2-core machine can be 10-40x slower
    return a


def _shape(a):
    """Trainer overrides for the shape, and the resolved (cfg, layout)."""
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.data.manifest import data_vocab_size

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
    # null: global = micro x data-parallel (1 process: 1), no gradient accumulation: the plain loop's batch
    ov += [f"train.precision={precision}", "model.dropout=0.0", "train.global_batch_size=null"]
    cfg = load_config(a.config, ov + a.overrides)
    layout = resolve(cfg, 1, data_vocab_size(cfg.data.paths) if not cfg.data.synthetic else None)
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
    if r.returncode != 0:  # the command as typed, the measuring wrapper named rather than printed
        shown = " ".join("<bench_train wrapper>" if c == _RSS_WRAPPER else c for c in cmd)
        sys.exit(f"bench_train: command failed (exit {r.returncode}): {shown}\n{r.stdout[-4000:]}")
    rss = [int(ln.split()[1]) for ln in r.stdout.splitlines() if ln.startswith("BENCH_PEAK_RSS")]
    cpu = [json.loads(ln.split(None, 1)[1]) for ln in r.stdout.splitlines() if ln.startswith("BENCH_CPU_STAMPS")]
    return r.stdout, (rss[-1] if rss else None), (cpu[-1] if cpu else [])


def _cpu_per_step(stamps, warmup, steps):
    """CPU seconds per timed step from the per-step stamps (None when they do not fit)."""
    if warmup < 1 or len(stamps) < warmup + steps:
        return None
    return round((stamps[warmup + steps - 1] - stamps[warmup - 1]) / steps, 4)


def run_plain(a, cfg, layout, env, compiled: bool):
    from pretrain.config.schema import to_dict

    cmd = [sys.executable, "-c", _RSS_WRAPPER, str(TOOLS), "path", str(PLAIN), "--model-json",
           json.dumps(to_dict(cfg.model)), "--vocab", str(layout.padded_vocab_size),
           "--batch", str(layout.micro_batch_size), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--mode", "compile" if compiled else "eager"]
    out, rss, cpu = _run(cmd, env)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    return {"step_ms": res["step_ms"], "tokens_per_sec": res["tokens_per_sec"], "peak_rss": rss,
            "cpu_s_per_step": _cpu_per_step(cpu, a.warmup, a.steps),
            "peak_gpu_gib": res.get("peak_mem_gib"), "loss": res.get("loss")}


def run_ours(a, ov, run_dir, env, tok, compiled: bool | None):
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = a.warmup + a.steps
    trainer_ov = ov + ([] if compiled is None else [f"train.compile={str(compiled).lower()}"]) + [f"train.max_steps={steps}", "train.eval_interval=0", "train.eval_steps=1",
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


def ab_setup(argv: list[str], label: str):
    """For an A/B of our trainer against itself (bench_guard, bench_documents): parse `argv` as
    this tool's arguments, resolve the shape and print it with the machine and versions under
    `label`. Returns (args, shape overrides, environment, tokens per step)."""
    sys.argv = [sys.argv[0], *argv]
    a = _parse()
    os.chdir(ROOT)
    ov, cfg, layout, _ = _shape(a)
    tok = layout.micro_batch_size * cfg.model.seq_len
    ver = _versions()
    print(f"{label}: {cfg.model.n_layer}x{cfg.model.d_model}, T {cfg.model.seq_len}, B {layout.micro_batch_size}; "
          f"{a.warmup} warm-up + {a.steps} timed steps, {a.repeat} round(s); {ver['device']}, torch {ver['torch']}, "
          f"deepspeed {ver['deepspeed']}", flush=True)
    return a, ov, _env(a.threads), tok


def alternate(a, ov, env, tok, sides: dict, tmp: Path, show) -> dict:
    """Run our trainer for `a.repeat` rounds, each side once per round (order alternating round by
    round, so drift hits both alike): `sides` maps a name to its extra overrides. `show(round,
    name, result)` prints as it goes. Returns {name: [run_ours result per round]}."""
    names = list(sides)
    runs: dict = {name: [] for name in names}
    for r in range(a.repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            saved = a.overrides
            a.overrides = saved + sides[name]
            res = run_ours(a, ov, str(tmp / f"{name}{r}"), env, tok, None)
            a.overrides = saved
            runs[name].append(res)
            show(r, name, res)
    return runs


def _versions() -> dict:
    from importlib.metadata import version

    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": dev, "torch": torch.__version__, "deepspeed": version("deepspeed"),
            "python": platform.python_version()}


def _peak(a, precision):
    """The device's peak FLOP/s for MFU: --peak-flops, else the GPU's known peak; None on CPU."""
    import torch

    from pretrain.run.monitor import peak_flops

    return peak_flops(torch.device("cuda" if torch.cuda.is_available() else "cpu"), precision, a.peak_flops)


def _setups(a, cfg, layout):
    """[(name, kind, compiled)]: the first plain one is the reference of the ratios."""
    ours = f"ours ZeRO-{layout.zero_stage}"
    if a.suite:
        setups = [("plain compiled", "plain", True), ("plain eager", "plain", False),
                  (f"{ours} eager", "ours", False), (f"{ours} compiled", "ours", True)]
    else:
        setups = [(f"plain {a.baseline_mode}", "plain", a.baseline_mode == "compile"),
                  (f"{ours}{' compiled' if cfg.train.compile else ''}", "ours", None)]
    return [x for x in setups if not a.only or x[1] == a.only]


def _summary(rs, fpt, peak):
    if not rs:
        return None
    tps = [x["tokens_per_sec"] for x in rs]
    med = statistics.median(tps)
    rss = max((x["peak_rss"] or 0) for x in rs) or None
    gpu = max((x["peak_gpu_gib"] or 0) for x in rs) or None
    cpus = [x["cpu_s_per_step"] for x in rs if x["cpu_s_per_step"]]
    return {"tokens_per_sec_median": round(med), "tokens_per_sec_best": max(tps),
            "cpu_s_per_step_median": statistics.median(cpus) if cpus else None,
            "step_ms_median": round(statistics.median(x["step_ms"] for x in rs), 2),
            "tflops_median": med * fpt / 1e12, "mfu_median": med * fpt / peak if peak else None,
            "peak_rss_gib": rss / 2**30 if rss else None, "peak_gpu_gib": gpu, "runs": rs}


def _ratio(runs, ref):
    """This setup's tokens/s over the reference's: per round, their median; also median/median."""
    if not runs or not ref:
        return None
    pairs = [o["tokens_per_sec"] / b["tokens_per_sec"] for o, b in zip(runs, ref)]
    med = statistics.median
    cpu_o = [x["cpu_s_per_step"] for x in runs if x["cpu_s_per_step"]]
    cpu_b = [x["cpu_s_per_step"] for x in ref if x["cpu_s_per_step"]]
    return {"pairs_median": med(pairs), "pairs": [round(x, 3) for x in pairs],
            "median_over_median": med(x["tokens_per_sec"] for x in runs) / med(x["tokens_per_sec"] for x in ref),
            "best_over_best": max(x["tokens_per_sec"] for x in runs) / max(x["tokens_per_sec"] for x in ref),
            "cpu_baseline_over_ours": med(cpu_b) / med(cpu_o) if cpu_o and cpu_b else None}


@cli_entry
def main() -> int:
    a = _parse()
    os.chdir(ROOT)
    ov, cfg, layout, precision = _shape(a)
    from pretrain.model.size import count_params, flops_per_token

    fpt = flops_per_token(cfg.model, layout.padded_vocab_size)
    peak = _peak(a, precision)
    env = _env(a.threads)
    ver = _versions()
    m = cfg.model
    setups = _setups(a, cfg, layout)
    shape = (f"{m.n_layer}x{m.d_model} ({m.n_head} heads), vocab {layout.padded_vocab_size}, T {m.seq_len}, "
             f"B {layout.micro_batch_size}, {count_params(m, layout.padded_vocab_size)['total']:,} parameters")
    print(f"bench_train: {shape}; {precision} ({'real data for ours' if a.data else 'synthetic tokens'}); setups: "
          f"{', '.join(x[0] for x in setups)}; {a.warmup} warm-up + {a.steps} timed steps, {a.repeat} alternating "
          "round(s)", flush=True)
    print(f"  {ver['device']}, torch {ver['torch']}, deepspeed {ver['deepspeed']}, python {ver['python']}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    runs = {name: [] for name, _, _ in setups}
    try:
        for r in range(a.repeat):
            for i, (name, kind, compiled) in enumerate(setups if r % 2 == 0 else setups[::-1]):
                res = run_plain(a, cfg, layout, env, compiled) if kind == "plain" else \
                    run_ours(a, ov, str(tmp / f"ours{r}_{i}"), env, layout.micro_batch_size * m.seq_len, compiled)
                res["load"] = round(os.getloadavg()[0], 2)
                runs[name].append(res)
                print(f"  round {r + 1} {name:24s}: {res['tokens_per_sec']:>10,} tok/s  {res['step_ms']:>10.1f} ms/step"
                      f"  {res['cpu_s_per_step'] or float('nan'):8.3f} CPU s/step  (load {res['load']})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ref = next((name for name, kind, _ in setups if kind == "plain"), None)
    s = {name: _summary(rs, fpt, peak) for name, rs in runs.items()}
    ratios = {name: _ratio(rs, runs[ref]) if ref and name != ref else None for name, rs in runs.items()}

    def fmt(x, f):
        return "-" if x is None else f.format(x)

    print()
    print(f"| setup | tokens/s median (best) | ms/step median | CPU s/step median | TFLOP/s | MFU | peak memory "
          f"| tokens/s vs {ref or '-'} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in setups:
        x, q = s[name], ratios[name]
        mem = (f"{x['peak_gpu_gib']:.2f} GiB GPU, " if x["peak_gpu_gib"] else "") + \
            fmt(x["peak_rss_gib"], "{:.2f} GiB RSS")
        print(f"| {name} | {x['tokens_per_sec_median']:,} ({x['tokens_per_sec_best']:,}) | {x['step_ms_median']:.1f} | "
              f"{fmt(x['cpu_s_per_step_median'], '{:.3f}')} | {x['tflops_median']:.3f} | "
              f"{fmt(x['mfu_median'] and 100 * x['mfu_median'], '{:.1f}%')} | {mem} | "
              f"{'1 (reference)' if name == ref else fmt(q and q['pairs_median'], '{:.3f}')} |")
    for name, q in ratios.items():
        if q:
            print(f"ratio {name} / {ref}: {q['pairs_median']:.3f} (median of per-round ratios {q['pairs']}); "
                  f"median/median {q['median_over_median']:.3f}; best/best {q['best_over_best']:.3f}; "
                  f"CPU time per step {ref}/{name} {fmt(q['cpu_baseline_over_ours'], '{:.3f}')}")
    print(f"FLOPs per token {fpt:,} (6N + 12*L*d*T); MFU {'vs peak ' + format(peak, '.4g') + ' FLOP/s' if peak else 'n/a (no known peak; --peak-flops)'}; "
          f"load average at end {os.getloadavg()[0]:.2f}")
    ours = next((name for name, kind, _ in setups if kind == "ours"), None)
    result = {"shape": shape, "zero_stage": layout.zero_stage, "precision": precision, "steps": a.steps,
              "warmup": a.warmup, "repeat": a.repeat, "flops_per_token": fpt, "peak_flops": peak, **ver,
              "setups": s, "ratios": ratios, "reference": ref,
              "ours": s.get(ours), "baseline": s.get(ref), "ratio": ratios.get(ours) or {},
              "overrides": ov + a.overrides}
    print("RESULT " + json.dumps(result), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
