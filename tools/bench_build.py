"""Per-rank peak host memory and time of building the model, from process start, on CPU ranks.

For each preset and layout, `world` (2) worker processes (gloo, one thread each) run what
the trainer runs up to its first step: config -> layout -> process group -> topology ->
`torch.manual_seed` -> `build_model` -> `build_engine` (DeepSpeed's initialize). Each rank
reports its peak RSS (Linux VmHWM, from process start) at the end of `build_model` and at
the end of `build_engine`, and the seconds from the launch of the ranks to each point;
"engine ready" is the moment the first step would start. `--first-step` instead times the
real trainer from launch to its step-1 log line; that needs memory for the Adam state too
(on a 2-core, 24 GiB box, 1-1.5B models at ZeRO-3 or PP=2 needed swap).

Target (issue 11): peak RSS at the end of model construction <= 0.6 x the full fp32 model
+ 1 GiB per rank. The `--plan` estimate (`pretrain.plan.estimate.host_memory`, build) is printed
beside each measurement.

    python tools/bench_build.py --smoke                       # seconds: a tiny model
    python tools/bench_build.py --presets llama-1b gpt2-1.5b  # the issue's runs (~10 GB, minutes)
    python tools/bench_build.py --presets llama-1b --first-step  # launch -> step 1 of the real trainer
    PYTHONPATH=/path/to/other/checkout python tools/bench_build.py ...   # the same for other code

The worker imports `build_model` from `pretrain.parallel.build`, or from
`pretrain.parallel.apply` where an older checkout has it there (to measure "before").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/procmem.py, also in the workers
from procmem import status_bytes  # noqa: E402
from rankbench import launch, report, worker_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
LAYOUTS = {"zero3": ("ZeRO-3, DP=2", ["parallel.zero_stage=3"]),
           "tp2": ("TP=2, ZeRO-0", ["parallel.tensor=2", "parallel.zero_stage=0"]),
           "pp2": ("PP=2, ZeRO-0", ["parallel.pipeline=2", "parallel.zero_stage=0"])}
COMMON = ["data.synthetic=true", "train.device=cpu", "train.precision=fp32", "train.micro_batch_size=1",
          "train.global_batch_size=2", "train.max_steps=1", "schedule.warmup_steps=0", "logging.tensorboard=false"]
SMOKE = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=null", "model.d_ff=null",
         "model.vocab_size=512"]


def _worker(args) -> None:
    import torch

    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.run.engine import build_engine, init_distributed
    from pretrain.parallel.topology import Topology
    from pretrain.model.size import count_params

    try:
        from pretrain.parallel.build import build_model
        from pretrain.plan.estimate import host_memory
    except ImportError:  # an older checkout (before issue 11): no host estimate
        from pretrain.parallel.apply import build_model
        host_memory = None

    torch.set_num_threads(1)
    launched = float(os.environ["BENCH_LAUNCH"])
    cfg = load_config(args.config, args.overrides)
    lay = resolve(cfg, int(os.environ["WORLD_SIZE"]), None, cuda_available=False)
    rank, _ = init_distributed(cfg, torch.device("cpu"))

    topo = Topology(lay)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, lay, topo)
    built = {"rss_peak": status_bytes("VmHWM"), "rss": status_bytes("VmRSS"), "s": time.time() - launched}
    out = {"rank": rank, "build": built}
    if args.engine:
        build_engine(cfg, lay, model, topo)
        out["engine"] = {"rss_peak": status_bytes("VmHWM"), "rss": status_bytes("VmRSS"), "s": time.time() - launched}
    out["params"] = count_params(cfg.model, lay.padded_vocab_size)["total"]
    out["plan_build"] = host_memory(cfg, lay)["build"] if host_memory else None
    report(out, args.result)


def _gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _launch(config: str, overrides: list[str], engine: bool, world: int) -> list[dict]:
    return launch(__file__, config, overrides, world, args=("--engine",) if engine else (),
                  env={"BENCH_LAUNCH": repr(time.time())}, what=" ".join(overrides))


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _first_step(config: str, overrides: list[str], world: int) -> float:
    """Seconds from launching the real trainer (torchrun, `world` ranks) to its step-1 log line;
    the run is then stopped (its final save of a 1-1.5B model would take minutes)."""
    with tempfile.TemporaryDirectory(prefix="bench_build_") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "pretrain.train", "--config", config, *overrides, f"train.out_dir={tmp}/run"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        try:
            for line in proc.stdout:
                tail = (tail + [line])[-40:]
                if re.search(r"\bstep 1/1\b", line):
                    return time.time() - t0
        finally:
            if proc.poll() is None:
                _kill_tree(proc.pid)  # torchrun puts its ranks in sessions of their own
            proc.wait()
        raise SystemExit(f"run failed before step 1 ({' '.join(overrides)}):\n{''.join(tail)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["llama-1b", "gpt2-1.5b"], help="configs/<name>.yaml")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--seq-len", type=int, default=128, help="model.seq_len (short: the build does not depend on it "
                   "beyond learned positions)")
    p.add_argument("--no-engine", action="store_true", help="stop after build_model (skip deepspeed.initialize)")
    p.add_argument("--first-step", action="store_true", help="instead: launch the real trainer and time launch -> "
                   "step 1 logged (needs the Adam state in memory: ~16 bytes x parameters / ranks, or swap)")
    p.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    worker_arguments(p)
    p.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    import deepspeed
    import torch

    import pretrain

    presets = ["gpt2-124m"] if args.smoke else args.presets
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}; code: {Path(pretrain.__file__).parent.parent}")
    if args.first_step:
        print("| preset | layout | launch -> step 1 logged |\n|---|---|---|")
    else:
        print("| preset | layout | full fp32 model | target / rank | rank | peak RSS at build | at engine ready "
              "| --plan build | launch -> built | launch -> engine ready |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in presets:
        for key in args.layouts:
            name, layout = LAYOUTS[key]
            over = COMMON + layout + [f"model.seq_len={args.seq_len}"] + (SMOKE if args.smoke else [])
            if preset.startswith("gpt2") and key == "tp2" and not args.smoke:
                print(f"| {preset} | {name} | n/a: 25 heads do not divide by tp 2 |" if args.first_step else
                      f"| {preset} | {name} | - | - | - | n/a: 25 heads do not divide by tp 2 | | | | |")
                continue
            if args.first_step:
                s = _first_step(str(ROOT / "configs" / f"{preset}.yaml"), over, args.world)
                print(f"| {preset} | {name} | {s:.1f} s |", flush=True)
                rows.append({"preset": preset, "layout": key, "first_step_s": s})
                continue
            res = _launch(str(ROOT / "configs" / f"{preset}.yaml"), over, not args.no_engine, args.world)
            full = 4 * res[0]["params"]
            target = 0.6 * full + GiB
            for r in res:
                eng = r.get("engine") or {}
                peak_e = f"{eng['rss_peak'] / GiB:.2f} GiB" if eng else "-"
                t_e = f"{eng['s']:.1f} s" if eng else "-"
                print(f"| {preset} | {name} | {full / GiB:.2f} GiB | {target / GiB:.2f} GiB | {r['rank']} "
                      f"| {r['build']['rss_peak'] / GiB:.2f} GiB | {peak_e} | {_gib(r['plan_build'])} "
                      f"| {r['build']['s']:.1f} s | {t_e} |", flush=True)
            rows.append({"preset": preset, "layout": key, "full_fp32": full, "target": target, "ranks": res})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
