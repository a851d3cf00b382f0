"""Benchmark checkpoint saves: the training stall per save (async vs sync) and the commit overhead.

Run under torchrun (2 CPU ranks by default), fp32, ZeRO-1:

    torchrun --standalone --nproc_per_node=2 tools/bench_ckpt.py                 # ~350M (24 x 1024)
    torchrun --standalone --nproc_per_node=2 tools/bench_ckpt.py --smoke         # seconds (CI)
    torchrun ... tools/bench_ckpt.py --dir /fast/disk --repeat 3

Builds the model and DeepSpeed engine the trainer builds, takes one optimizer step (so Adam's
moments exist), then, `--repeat` times in rotating order, saves the same state three ways, then
`--repeat` times the fourth (async: its writer keeps its snapshot buffers for the run, as in
training, and that memory would otherwise be taken from the page cache the others write through):

  bare     DeepSpeed's own `save_checkpoint` (torch.save per file), nothing else
  before   the previous commit: bare, then rank 0 sha256-hashes every file serially between two
           barriers and writes the manifest (what `checkpoint.save` did before the writer)
  sync     `CheckpointWriter(async_save=False)`: every rank writes its own files (two at a time,
           without torch.save's zip CRC32s unless --zip-crc), hashing them as they are written,
           rank 0 commits from the gathered digests; the trainer waits for all
  async    `CheckpointWriter(async_save=True)`: the trainer waits only for the snapshot; the
           write/hash/commit time is measured up to the commit. One writer serves every repeat,
           as in training: the first save allocates the snapshot buffers, later ones reuse them

Before each save every rank runs `sync` (untimed), so that no save pays for writing back the
previous one's dirty pages (in training, minutes of steps separate two saves).
Times are the slowest rank's (between barriers). Printed: the median of each, the stall of
async as a fraction of sync, and the commit overhead (sync / bare - 1, before / bare - 1), both
from the medians and as the median of the per-round ratios (each round saves bare and sync back
to back, so a round's ratio sees the same state of the machine), and the bytes of the .pt files
each kind wrote (the writer writes the storages DeepSpeed's own save writes).
Each save's directory is deleted before the next (a ~350M fp32 checkpoint with Adam is ~5.6 GB).

`--kinds load` times resume instead: one checkpoint is written (the sync writer), then `--repeat`
rounds of the trainer's resume path (`store.choose_resume` with `store.load`: the file
checks split over the ranks, DeepSpeed's load_checkpoint, RNG and state), each round six ways:

  full_warm / sizes_warm   checkpoint.verify full (digests + structure) / sizes (structure only),
                           the files in the page cache (as right after a save, or a re-run)
  bare_warm                DeepSpeed's own load_checkpoint with its own checkpoint engine (plain
                           torch.load), nothing checked: the reference
  full_cold / sizes_cold / the same after `sync` and posix_fadvise(DONTNEED) of every file of the
  bare_cold                checkpoint: read from the disk (as after a reboot or on another host)

Each resume is followed by one timed training step (a resume whose cost moved into the first step
would show there). Printed: the median of each, and the cost of verification, full / sizes - 1 and full / bare - 1,
warm and cold. (full maps each file and hashes the mapped pages, so DeepSpeed copies from the
page cache with no intermediate copy; sizes and bare read with plain torch.load.)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to save (default: a temporary directory)")
    p.add_argument("--smoke", action="store_true", help="a tiny model, one repeat")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--zip-crc", action="store_true",
                   help="let torch.save compute its zip CRC32s in our writer too (as in the bare save): "
                        "the digest's cost alone")
    p.add_argument("--kinds", nargs="+", default=["bare", "before", "sync", "async"],
                   choices=["bare", "before", "sync", "async", "load"],
                   help="which saves to time (default: all four); 'load': resume times instead (see above)")
    a = p.parse_args()
    if a.smoke:
        a.layers, a.d_model, a.heads, a.vocab, a.repeat = 2, 64, 2, 512, 1
    return a


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    worst = [0.0] * dist.get_world_size()
    dist.all_gather_object(worst, t)
    dist.barrier()
    return max(worst)


def main() -> int:
    a = _parse()
    import torch
    import torch.distributed as dist

    from pretrain.checkpoint import store
    from pretrain.checkpoint.writer import CheckpointWriter
    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.run.engine import build_engine, init_distributed
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology
    from pretrain.model.size import count_params

    overrides = [f"model.n_layer={a.layers}", f"model.d_model={a.d_model}", f"model.n_head={a.heads}",
                 f"model.vocab_size={a.vocab}", "model.seq_len=32", "model.dropout=0", "data.synthetic=true",
                 "train.precision=fp32", "train.device=cpu", "train.micro_batch_size=1", "parallel.zero_stage=1",
                 "train.max_steps=1"]
    CheckpointWriter.ZIP_CRC32 = a.zip_crc
    cfg = load_config(None, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lay = resolve(cfg, world, None)
    rank, _ = init_distributed(cfg, torch.device("cpu"))
    topo = Topology(lay)
    torch.manual_seed(0)
    engine, opt = build_engine(cfg, lay, build_model(cfg, lay, topo), topo)
    x = torch.randint(0, a.vocab, (1, 33))

    def train_step():
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()

    train_step()
    state = {"step": 1, "note": "bench_ckpt"}

    base = Path(a.dir or tempfile.mkdtemp(prefix="bench_ckpt_")) if rank == 0 else None
    base = store.broadcast_from_rank0(base)

    def fresh(name):
        d = base / name
        if rank == 0:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        os.sync()  # the previous save's writeback is not this one's cost
        dist.barrier()
        return d

    def bare(d):
        engine.save_checkpoint(str(d), tag="step_00000001", save_latest=False)

    def before(d):
        bare(d)
        dist.barrier()
        if rank == 0:
            tag = d / "step_00000001"
            files = {}
            for p in sorted(tag.rglob("*")):
                if p.is_file():
                    h = hashlib.sha256()
                    with open(p, "rb") as f:
                        while block := f.read(1 << 22):
                            h.update(block)
                    files[str(p.relative_to(tag))] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
            store.write_atomic(tag / store.MANIFEST, json.dumps({"files": files}))
            store.write_atomic(d / "latest", "step_00000001\n")

    writers = {}

    def ours(d, async_save):  # one writer per mode for the whole run, as in training (it keeps its buffers)
        w = writers.setdefault(async_save, CheckpointWriter(d.parent, 3, async_save, 600.0))
        w.ckpt_dir, w._kept = d, None
        stall = _timed(lambda: w.save(engine, 1, state))
        total = stall + _timed(w.wait)
        return stall, total

    if "load" in a.kinds:
        return _finish(a, rank, base, _bench_load(a, rank, engine, fresh("load"), state, cfg, lay, world,
                                                     train_step))
    times = {k: [] for k in ("bare", "before", "sync", "async_stall", "async_total")}
    pt_bytes = {}  # kind: bytes of DeepSpeed's .pt files in its last save
    rotating = [k for k in a.kinds if k != "async"]
    rounds = [rotating[i % len(rotating):] + rotating[:i % len(rotating)] for i in range(a.repeat)] if rotating else []
    rounds += [["async"]] * a.repeat if "async" in a.kinds else []
    for order in rounds:
        for kind in order:
            d = fresh(kind)
            if kind == "bare":
                times["bare"].append(_timed(lambda: bare(d)))
            elif kind == "before":
                times["before"].append(_timed(lambda: before(d)))
            elif kind == "sync":
                times["sync"].append(ours(d, False)[1])
            else:
                stall, total = ours(d, True)
                times["async_stall"].append(stall)
                times["async_total"].append(total)
            if rank == 0:
                pt_bytes[kind] = sum(f.stat().st_size for f in d.rglob("*.pt"))
                shutil.rmtree(d, ignore_errors=True)
            dist.barrier()
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    if rank == 0:
        import deepspeed

        n = count_params(cfg.model, lay.padded_vocab_size)["total"]
        print(f"model {n / 1e6:.0f}M parameters, fp32, ZeRO-1, {world} CPU rank(s); torch {torch.__version__}, "
              f"deepspeed {deepspeed.__version__}; median of {a.repeat}, slowest rank, seconds")
        for k, v in med.items():
            print(f"  {k:12s} {v:8.2f}   ({', '.join(f'{t:.2f}' for t in times[k])})")
        print(f"stall per save: async {med['async_stall']:.2f} s = {med['async_stall'] / med['sync']:.1%} of sync "
              f"{med['sync']:.2f} s (before: {med['before']:.2f} s)")
        paired = [s / b - 1 for s, b in zip(times["sync"], times["bare"])]
        paired_med = statistics.median(paired) if paired else float("nan")
        print(f"commit overhead vs bare save_checkpoint: ours (sync) {med['sync'] / med['bare'] - 1:+.1%} "
              f"(median of per-round ratios {paired_med:+.1%}: {', '.join(f'{r:+.0%}' for r in paired)}), "
              f"before {med['before'] / med['bare'] - 1:+.1%}")
        print("bytes of .pt files per save: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in pt_bytes.items()))
        result = {"params": n, "world": world, "times": times, "median": med,
                  "stall_fraction": med["async_stall"] / med["sync"], "overhead": med["sync"] / med["bare"] - 1,
                  "overhead_before": med["before"] / med["bare"] - 1, "overhead_paired": paired_med,
                  "pt_bytes": pt_bytes}
    else:
        result = None
    return _finish(a, rank, base, result)


def _finish(a, rank: int, base: Path, result: dict | None) -> int:
    import torch.distributed as dist

    if rank == 0:
        print("RESULT " + json.dumps(result))
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _evict(tag: Path) -> None:
    """Write back, then drop every file of `tag` from the page cache (clean pages go at once)."""
    os.sync()
    for p in tag.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _bench_load(a, rank: int, engine, d: Path, state: dict, cfg, lay, world: int, train_step) -> dict | None:
    """Resume times (see the module docstring), the slowest rank's; the figures, on rank 0."""
    import torch
    import torch.distributed as dist

    from pretrain.checkpoint import store
    from pretrain.checkpoint.writer import CheckpointWriter
    from pretrain.model.size import count_params

    w = CheckpointWriter(d, 3, False, 600.0)
    w.save(engine, 1, state)
    w.wait()
    tag = d / store.tag_for(1)
    kinds = ("full_warm", "sizes_warm", "bare_warm", "full_cold", "sizes_cold", "bare_cold")

    def resume(mode):
        if mode == "bare":
            engine.load_checkpoint(str(d), tag=tag.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            store.choose_resume("auto", d, print, mode, load=lambda t: store.load(engine, t))

    times = {k: [] for k in kinds}
    steps = {k: [] for k in kinds}  # the first training step after the resume
    for i in range(a.repeat):
        for kind in kinds[i % 3:] + kinds[:i % 3]:  # each kind takes its turn going first
            mode, cache = kind.split("_")
            if cache == "cold" and rank == 0:
                _evict(tag)
            if cache == "warm" and rank == 0:  # read once: every file in the page cache
                store.verify(tag, "full")
            dist.barrier()
            times[kind].append(_timed(lambda: resume(mode)))
            steps[kind].append(_timed(train_step))
    if rank != 0:
        return None
    import deepspeed

    med = {k: statistics.median(v) for k, v in times.items()}
    gb = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file()) / 1e9
    n = count_params(cfg.model, lay.padded_vocab_size)["total"]
    print(f"model {n / 1e6:.0f}M parameters, fp32, ZeRO-1, {world} CPU rank(s), checkpoint {gb:.2f} GB; torch "
          f"{torch.__version__}, deepspeed {deepspeed.__version__}; resume, median of {a.repeat}, slowest rank, s")
    first = {k: statistics.median(v) for k, v in steps.items()}
    for k in kinds:
        print(f"  {k:12s} {med[k]:8.2f}   ({', '.join(f'{t:.2f}' for t in times[k])}); "
              f"first step after it {first[k]:.2f}")
    cost = {c: med[f"full_{c}"] / med[f"sizes_{c}"] - 1 for c in ("warm", "cold")}
    vs_bare = {c: med[f"full_{c}"] / med[f"bare_{c}"] - 1 for c in ("warm", "cold")}
    print(f"verification cost (full / sizes - 1): warm {cost['warm']:+.1%}, cold {cost['cold']:+.1%}; "
          f"verified resume vs DeepSpeed's bare load (full / bare - 1): warm {vs_bare['warm']:+.1%}, "
          f"cold {vs_bare['cold']:+.1%}")
    return {"params": n, "world": world, "checkpoint_gb": gb, "times": times, "median": med, "cost": cost,
            "vs_bare": vs_bare, "first_step": first}


if __name__ == "__main__":
    sys.exit(main())
