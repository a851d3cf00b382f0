"""Initialisation time per rank at ZeRO-3 on 1, 2 and 4 CPU ranks (issue 20: every per-rank
cost is the rank's share).

For each world size, that many worker processes (torchrun, gloo, one thread each) run what the
trainer runs before DeepSpeed's initialize -- config -> layout -> process group -> topology ->
`torch.manual_seed` -> `build_model` -- at ZeRO-3, fp32, and report the seconds `build_model`
took (wall and the process's CPU time: on a box with fewer cores than ranks the CPU time is the
rank's own work), the random values it drew (`params.values_drawn`, where the code has it) and
the peak RSS. One rank does not partition (DP=1): it builds and draws the whole model. Target:
the time per rank falls roughly as 1/N.

    python tools/bench_init.py                                   # gpt2-1.5b on 1, 2, 4 ranks (minutes)
    python tools/bench_init.py --smoke                           # seconds: a tiny model on 1 and 2 ranks
    PYTHONPATH=/path/to/other/checkout python tools/bench_init.py   # the same for other code ("before")
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/procmem.py, also in the workers
from procmem import status_bytes  # noqa: E402
from rankbench import launch, report, worker_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
COMMON = ["data.synthetic=true", "train.device=cpu", "train.precision=fp32", "train.micro_batch_size=1",
          "train.global_batch_size=4", "train.max_steps=1", "schedule.warmup_steps=0", "logging.tensorboard=false",
          "parallel.zero_stage=3"]
SMOKE = ["model.n_layer=2", "model.d_model=256", "model.n_head=4", "model.n_kv_head=null", "model.d_ff=null",
         "model.vocab_size=4096"]


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    import pretrain
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.model import params
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology
    from pretrain.run.engine import init_distributed

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    lay = resolve(cfg, int(os.environ["WORLD_SIZE"]), None, cuda_available=False)
    rank, _ = init_distributed(cfg, torch.device("cpu"))
    topo = Topology(lay)
    drawn = getattr(params, "values_drawn", None)  # (not in the code before issue 20)
    torch.nn.Embedding(2, 2, device="meta")  # not timed: the first meta-device init imports torch._refs (~1 s)
    dist.barrier()
    torch.manual_seed(cfg.train.seed)
    d0, c0, t0 = drawn() if drawn else None, time.process_time(), time.perf_counter()
    build_model(cfg, lay, topo, torch.device("cpu"))
    out = {"rank": rank, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
           "drawn": drawn() - d0 if drawn else None, "rss_peak": status_bytes("VmHWM"),
           "code": str(Path(pretrain.__file__).parent.parent)}
    report(out, args.result)


def _launch(config: str, overrides: list[str], world: int) -> list[dict]:
    return launch(__file__, config, overrides, world)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-1.5b", help="configs/<name>.yaml")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], help="numbers of ranks")
    p.add_argument("--smoke", action="store_true", help="a tiny model on 1 and 2 ranks (seconds)")
    p.add_argument("--json", help="also write the results here")
    worker_arguments(p)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    import deepspeed
    import torch

    worlds = [1, 2] if args.smoke else args.worlds
    over = COMMON + (SMOKE if args.smoke else [])
    config = str(ROOT / "configs" / f"{'gpt2-124m' if args.smoke else args.preset}.yaml")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}; preset {Path(config).stem}, ZeRO-3, fp32")
    print("| ranks | rank | build_model wall | build_model CPU | values drawn | peak RSS |")
    print("|---|---|---|---|---|---|")
    rows = []
    for world in worlds:
        res = _launch(config, over, world)
        for r in res:
            drawn = "-" if r["drawn"] is None else f"{r['drawn'] / 1e6:.1f}M"
            print(f"| {world} | {r['rank']} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s | {drawn} "
                  f"| {r['rss_peak'] / GiB:.2f} GiB |", flush=True)
        rows.append({"world": world, "ranks": res})
    base = max(r["cpu_s"] for r in rows[0]["ranks"])
    for row in rows:
        worst = max(r["cpu_s"] for r in row["ranks"])
        print(f"ranks {row['world']}: slowest rank's CPU {worst:.2f} s = {worst / base:.2f} x {rows[0]['world']} "
              f"rank(s) (1/N: {rows[0]['world'] / row['world']:.2f})")
    print(f"code: {rows[0]['ranks'][0]['code']}")
    print("RESULT " + json.dumps(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
