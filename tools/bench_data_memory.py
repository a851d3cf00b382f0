"""Benchmark the private memory per rank of the data side of a run (issue 20).

Two CPU ranks (gloo) each build `pretrain.run.data.RunData` as the trainer does (data.paths = one
bare Megatron prefix, the cache at its default `<train.out_dir>/index_cache`, fresh each run), then
draw 20 micro-batches. Each rank reports its RssAnon (/proc/self/status: private anonymous pages;
the memory-mapped index files are page cache, shared and reclaimable, and do not count) before
RunData, after it and the batches, the same after malloc_trim(0) (freed heap glibc had kept), and
the largest RssAnon a 10 ms sampler saw meanwhile (the builder's transient peak). Run on a big
prefix and on a tiny one; the figure is the big run's RssAnon after minus the tiny run's, per rank
(target: <= 32 MiB).

The prefixes are written once with pretrain's own writer (`pretrain.data.indexed.write_pair`,
random uint16 tokens, document sizes uniform in 1..2*avg-1) under --dir, outside the repository.

    python tools/bench_data_memory.py                        # 256M tokens / 8M documents vs 64K / 2K
    python tools/bench_data_memory.py --tree /work/wt_before # the same against another checkout
    python tools/bench_data_memory.py --smoke                # seconds
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("RssAnon:"):
                return int(ln.split()[1]) * 1024
    raise SystemExit("bench_data_memory: no RssAnon in /proc/self/status (Linux only)")


def write_prefix(prefix: str, tokens: int, docs: int, seed: int = 0) -> None:
    """PREFIX.bin/.idx of `docs` documents of about tokens/docs random uint16 tokens each."""
    import numpy as np

    from pretrain.data.indexed import write_pair

    if os.path.isfile(prefix + ".idx"):
        return
    rng = np.random.default_rng(seed)
    avg = max(1, tokens // docs)
    sizes = rng.integers(1, 2 * avg, docs)
    pool = rng.integers(0, 65000, 1 << 24, dtype=np.uint16)  # documents are slices of one random pool

    def documents():
        at = 0
        for n in sizes:
            if at + n > pool.size:
                at = int(rng.integers(0, 4096))
            yield pool[at:at + n]
            at += int(n)

    tmp = prefix + ".partial"
    write_pair(tmp, documents(), np.uint16)
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")  # last: a present .idx means a complete pair


def child(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    from pretrain.run.data import RunData

    mb, dp = 4, args.world
    cfg = SimpleNamespace(
        data=SimpleNamespace(paths=[args.prefix], weights=[], train_split="train", valid_split="valid",
                             test_split="test", valid_paths=[], test_paths=[], seed=1234, cache_dir=None,
                             synthetic=False),
        model=SimpleNamespace(seq_len=args.seq, vocab_size=65536),
        train=SimpleNamespace(max_steps=args.steps, eval_steps=0))
    layout = SimpleNamespace(micro_batch_size=mb, dp=dp, global_batch_size=mb * dp, vocab_size=65536, device="cpu")
    peak, stop = [rss_anon()], threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    before = rss_anon()
    sampler.start()
    t = time.perf_counter()
    data = RunData(cfg, layout, args.rank, args.rank, Path(args.out), lambda line: None)
    opened = time.perf_counter() - t
    it = data.train_batches(0)
    for _ in range(20):
        next(it)
    stop.set()
    sampler.join()
    after = rss_anon()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of `after` is freed heap glibc had kept
    trimmed = rss_anon()
    src = data.train.sources[0]
    import pretrain

    print("CHILD " + json.dumps({"rank": args.rank, "pretrain": os.path.dirname(pretrain.__file__),
                                 "before": before, "after": after, "trimmed": trimmed, "peak": max(peak[0], after),
                                 "open_s": opened, "documents": len(src), "tokens": int(src.tokens),
                                 "samples_per_epoch": int(data.train.index[0].per_epoch)}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(tree: str, prefix: str, seq: int, steps: int, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="run_", dir=os.path.dirname(prefix))
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--rank", str(r), "--world", str(world),
                               "--port", str(port), "--prefix", prefix, "--seq", str(seq), "--steps", str(steps),
                               "--out", out], cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    res = []
    for p in procs:
        text, _ = p.communicate(timeout=3600)
        line = next((ln for ln in text.splitlines() if ln.startswith("CHILD ")), None)
        if p.returncode or line is None:
            raise SystemExit(f"bench_data_memory: a rank failed:\n{text[-3000:]}")
        res.append(json.loads(line[6:]))
    shutil.rmtree(out)
    return sorted(res, key=lambda r: r["rank"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tokens", type=int, default=256 << 20)
    p.add_argument("--docs", type=int, default=8 << 20)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1000, help="train.max_steps (global batch 4 x ranks)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--dir", default="/work/bench_tmp/data_memory", help="where the prefixes are written")
    p.add_argument("--tree", default=str(ROOT), help="the checkout whose pretrain is measured")
    p.add_argument("--target-mib", type=float, default=32.0)
    p.add_argument("--smoke", action="store_true", help="small sizes (seconds)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--rank", "--port", "--out", "--prefix"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.rank, args.port, args.world = int(args.rank), int(args.port), int(args.world)
        child(args)
        return 0
    if args.smoke:
        args.tokens, args.docs, args.seq, args.steps = 4 << 20, 128 << 10, 256, 50
        args.dir = tempfile.mkdtemp(prefix="bench_data_memory_")
    os.makedirs(args.dir, exist_ok=True)
    sys.path.insert(0, args.tree)
    runs = {}
    for name, tokens, docs in (("tiny", 64 << 10, 2 << 10), ("big", args.tokens, args.docs)):
        prefix = os.path.join(args.dir, f"{name}_{tokens}_{docs}")
        t = time.perf_counter()
        write_prefix(prefix, tokens, docs)
        print(f"{name}: {prefix} ({time.perf_counter() - t:.1f} s to write or find)", flush=True)
        runs[name] = run_ranks(args.tree, prefix, args.seq, args.steps, args.world)
    big, tiny = runs["big"], runs["tiny"]
    print(f"\npretrain imported from {big[0]['pretrain']}; big prefix: {big[0]['tokens']:,} tokens, "
          f"{big[0]['documents']:,} documents, seq {args.seq}, {big[0]['samples_per_epoch']:,} samples per epoch; {args.world} ranks")
    print("| rank | RssAnon after, tiny MiB | RssAnon after, big MiB | big - tiny MiB | big peak while opening MiB "
          "| big, after malloc_trim MiB | big open s | target |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for b, s in zip(big, tiny):
        extra = (b["after"] - s["after"]) / MiB
        rows.append({"rank": b["rank"], "tiny_after": s["after"], "big_after": b["after"], "big_peak": b["peak"],
                     "big_trimmed": b["trimmed"], "extra_mib": extra, "open_s": b["open_s"]})
        print(f"| {b['rank']} | {s['after'] / MiB:.1f} | {b['after'] / MiB:.1f} | {extra:+.1f} | {b['peak'] / MiB:.1f} "
              f"| {b['trimmed'] / MiB:.1f} | {b['open_s']:.2f} | <= {args.target_mib:g}: {extra <= args.target_mib} |")
    if args.smoke:
        shutil.rmtree(args.dir)
    print("RESULT " + json.dumps({"tree": args.tree, "tokens": big[0]["tokens"], "documents": big[0]["documents"],
                                  "seq": args.seq, "ranks": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
