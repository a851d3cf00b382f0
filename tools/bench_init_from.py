"""checkpoint.init_from: peak host memory per rank at ZeRO-3 DP=2 (issue 20: every per-rank cost is
the rank's share).

Makes, once, an import-hf init directory (`model.safetensors` + `init.json`) of random fp32
weights for a preset (default llama-1b: 1.1B parameters, a 4.4 GB file) under --work (default
/work/bench_tmp/init_from; never in the repository), then launches 2 CPU ranks (torchrun, gloo,
one thread each) that run what the trainer runs for `checkpoint.init_from` before DeepSpeed's
initialize -- config, layout, process group, topology, `run.init_from.weights` (the checks of
init.json and the weights file, the source), `torch.manual_seed`, `build_model(source=...)` at
ZeRO-3, fp32 -- and reports per rank the peak RSS (VmHWM) and its rise over the rank's RSS before
init_from, the seconds, and the bytes of stored tensors read (`interop.stored.bytes_read`, where
the code has it). Target: peak RSS <= 0.6 x the fp32 model + 1 GiB per rank.

    python tools/bench_init_from.py                                       # llama-1b (a minute)
    python tools/bench_init_from.py --smoke                               # seconds: a tiny model
    PYTHONPATH=/work/wt_initfrom_before python tools/bench_init_from.py   # the code before

`--source checkpoint` starts from one of our checkpoints instead (continued pretraining): made
once by training the preset 1 step at TP=2, ZeRO-0 (2 ranks; its Adam state must fit: e.g.
`--preset gpt2-350m`). `checkpoint.verify` stays `full`: the ranks hash the checkpoint's files,
split over them, before reading (`--verify sizes` leaves that out). `--consolidate` times
`interop.consolidate.consolidate` of that checkpoint instead (one process: `pretrain-convert
reshard`'s consolidated copy, removed first), with its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/procmem.py, also in the workers
from procmem import status_bytes  # noqa: E402
from rankbench import launch, report, worker_arguments  # noqa: E402
import bench_init  # noqa: E402  (the same ZeRO-3 build settings)

ROOT, GiB = bench_init.ROOT, bench_init.GiB
COMMON = [*bench_init.COMMON, "train.global_batch_size=2"]  # later overrides win
SMOKE = [*bench_init.SMOKE, "model.n_kv_head=2"]


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    import pretrain
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology
    from pretrain.run import init_from
    from pretrain.run.engine import init_distributed

    try:
        from pretrain.interop.stored import bytes_read
    except ImportError:  # the code before issue 20's init_from work
        bytes_read = None
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    lay = resolve(cfg, int(os.environ["WORLD_SIZE"]), None, cuda_available=False)
    rank, _ = init_distributed(cfg, torch.device("cpu"))
    topo = Topology(lay)
    torch.nn.Embedding(2, 2, device="meta")  # not timed: the first meta-device init imports torch._refs
    dist.barrier()
    rss0, t0, c0 = status_bytes("VmRSS"), time.perf_counter(), time.process_time()
    source, _ = init_from.weights(cfg, lay, _model_shape(cfg, lay), lambda s: None)
    torch.manual_seed(cfg.train.seed)
    build_model(cfg, lay, topo, torch.device("cpu"), source)
    out = {"rank": rank, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
           "rss_before": rss0, "rss_peak": status_bytes("VmHWM"),
           "read": bytes_read() if bytes_read else None, "code": str(Path(pretrain.__file__).parent.parent)}
    report(out, args.result)


def _model_shape(cfg, lay) -> dict:
    """What the trainer compares with a checkpoint's model_shape (`Trainer._model_shape`)."""
    from pretrain.config.load import to_dict
    from pretrain.config.schema import SHAPE_KEYS

    m = to_dict(cfg.model)
    shape = {k: m[k] for k in SHAPE_KEYS}
    shape["padded_vocab_size"] = lay.padded_vocab_size
    if m["position"] == "learned":
        shape["seq_len"] = m["seq_len"]
    return shape


def make_init(config: str, overrides: list[str], out: Path) -> int:
    """An init directory of random fp32 weights for the config's model (written a tensor at a time);
    returns the number of parameters."""
    import torch

    from pretrain.config.load import load_config
    from pretrain.model.gpt import GPT

    cfg = load_config(config, overrides)
    shapes = {n: tuple(p.shape) for n, p in GPT(cfg.model, cfg.model.vocab_size, device="meta").named_parameters()}
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    if (out / "init.json").is_file():
        return n_params  # made before (by this tree: the code before issue 20's change only reads it)
    from pretrain.interop.init_weights import WEIGHTS, commit_init

    out.mkdir(parents=True, exist_ok=True)
    head, at = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        head[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(0)
    with open(out / WEIGHTS, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            f.write((torch.randn(shape, generator=g) * 0.02).numpy().tobytes())
    from dataclasses import asdict

    commit_init(out, {"model": asdict(cfg.model), "vocab_rows": cfg.model.vocab_size, "architecture": "random",
                      "source": "tools/bench_init_from.py"})
    return n_params


def make_checkpoint(config: str, overrides: list[str], out: Path) -> None:
    """A checkpoint of the config's model trained 1 step at TP=2, ZeRO-0 (once)."""
    if (out / "checkpoints" / "latest").is_file():
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "pretrain.train", "--config", config, *overrides, "parallel.zero_stage=0", "parallel.tensor=2",
           "train.global_batch_size=1", "checkpoint.interval=1", "train.eval_interval=0", f"train.out_dir={out}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training the source checkpoint failed:\n{proc.stdout[-4000:]}")


def _consolidate(tag_dir: str) -> None:
    """--consolidate's worker: one consolidation of `tag_dir` (its earlier copy removed), timed."""
    import shutil

    import pretrain
    from pretrain.interop.consolidate import consolidate

    shutil.rmtree(Path(tag_dir) / "consolidated", ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    consolidate(Path(tag_dir), log=lambda s: None)
    print(f"consolidate {time.perf_counter() - t:.1f} s wall, {time.process_time() - c:.1f} s CPU, peak RSS "
          f"{status_bytes('VmHWM') / GiB:.2f} GiB; code: {Path(pretrain.__file__).parent.parent}")


def _launch(config: str, overrides: list[str], world: int) -> list[dict]:
    return launch(__file__, config, overrides, world)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-1b", help="configs/<name>.yaml")
    p.add_argument("--world", type=int, default=2, help="ranks (ZeRO-3 data parallel)")
    p.add_argument("--work", default="/work/bench_tmp/init_from", help="where the init directory is made")
    p.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
    p.add_argument("--source", choices=["import", "checkpoint"], default="import",
                   help="an import-hf directory (default) or one of our checkpoints, TP=2 ZeRO-0")
    p.add_argument("--verify", choices=["full", "sizes"], default="full",
                   help="checkpoint.verify (--source checkpoint)")
    p.add_argument("--consolidate", action="store_true", help="time the consolidation of the checkpoint source")
    p.add_argument("--json", help="also write the results here")
    worker_arguments(p)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.tag:
        _consolidate(args.tag)
        return 0

    import deepspeed
    import torch

    preset = "llama-1b" if args.smoke else args.preset
    config = str(ROOT / "configs" / f"{preset}.yaml")
    over = COMMON + (SMOKE if args.smoke else [])
    name = f"{preset}-smoke" if args.smoke else preset
    init = Path(args.work) / name
    n = make_init(config, over, init)
    if args.source == "checkpoint":
        init = Path(args.work) / f"{name}-tp2-run"
        make_checkpoint(config, [o for o in over if not o.startswith(("parallel.", "train.global"))], init)
        over = over + [f"checkpoint.verify={args.verify}"]
        if args.consolidate:
            from pretrain.checkpoint import store

            tag = store.resolve_tag_dir(str(init), "sizes")
            subprocess.run([sys.executable, __file__, "--tag", str(tag)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            return 0
    model = 4 * n
    target = 0.6 * model + GiB
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}; preset {preset}{' (smoke)' if args.smoke else ''}: {n / 1e6:.1f}M "
          f"parameters, fp32 model {model / GiB:.2f} GiB; ZeRO-3 DP={args.world}; init_from {init}"
          + (f" (checkpoint.verify={args.verify})" if args.source == "checkpoint" else ""))
    res = _launch(config, over + [f"checkpoint.init_from={init}"], args.world)
    print("| rank | peak RSS | above RSS before init_from | init_from + build wall | CPU | stored bytes read |")
    print("|---|---|---|---|---|---|")
    for r in res:
        read = "-" if r["read"] is None else f"{r['read'] / GiB:.2f} GiB"
        print(f"| {r['rank']} | {r['rss_peak'] / GiB:.2f} GiB | {(r['rss_peak'] - r['rss_before']) / GiB:.2f} GiB "
              f"| {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s | {read} |", flush=True)
    worst = max(r["rss_peak"] for r in res)
    print(f"target <= 0.6 x {model / GiB:.2f} + 1 = {target / GiB:.2f} GiB per rank: highest peak "
          f"{worst / GiB:.2f} GiB ({'met' if worst <= target else 'NOT met'})")
    print(f"code: {res[0]['code']}")
    print("RESULT " + json.dumps({"preset": preset, "source": args.source, "params": n, "target": target,
                                  "ranks": res}))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
