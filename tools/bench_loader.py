"""Benchmark the training data loader: time per batch against the model step, and the index at scale.

1. Loader time per micro-batch: `pretrain.data.loader.open_dataset` + `micro_batches` (the path
   the trainer takes) over a real Megatron `.bin/.idx` written here (random uint16 tokens in
   documents of ~`--doc-tokens` tokens), micro-batch `--batch` x (`--seq` + 1) tokens, the median
   over `--batches` batches after 3 warm-up ones. It is compared with the 124M model's step time,
   which the loader's synchronous fetch adds to: measured on a GPU when one is present (not
   here), else REFERENCE.md's H100 figures for 124M, B=16, T=1024: plain torch.compile
   16*1024/458k tok/s = 35.8 ms/step, DeepSpeed ZeRO-1 eager 16*1024/243k = 67.4 ms/step.
2. Index at scale: an `.idx` with `--docs` documents holding `--tokens` tokens in total
   (seeded log-normal sizes, scaled to the exact total) over a sparse `.bin` (`truncate`, no
   real tokens), opened by `open_dataset` as a bare Megatron prefix in a fresh process:
   structure check (+ sha256 of the .idx for the cache key), the sample index of epoch 0
   (`SampleIndex._build`) and its cache write; then a second fresh process that opens it again
   (cache hit, what other ranks and resumed runs do). Reported: wall time and peak RSS of each
   open (Linux VmHWM, reset at its start), per phase its wall time, against the target (< 15 s, < 4 GB). Also the loader's
   time per batch over that index (the tokens read are the sparse file's zeros), at first touch
   of their pages and again (warm).

    python tools/bench_loader.py --smoke         # seconds (CI)
    python tools/bench_loader.py                 # 10B tokens in 5M documents, T=1024, B=16
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/procmem.py, also in worker processes
from procmem import reset_peak_rss, status_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REF_STEP_MS = {"H100 plain torch.compile (REFERENCE.md)": 16 * 1024 / 458e3 * 1e3,
               "H100 DeepSpeed ZeRO-1 eager (REFERENCE.md)": 16 * 1024 / 243e3 * 1e3}
TARGET_S, TARGET_BYTES = 15.0, 4e9


def _sizes(docs: int, tokens: int, seed: int):
    """`docs` document sizes >= 1 summing to exactly `tokens` (log-normal, sigma 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, 1.0, docs)
    sizes = np.maximum(1, np.floor(w / w.sum() * tokens)).astype(np.int64)
    diff = tokens - int(sizes.sum())
    while diff:  # spread the rounding remainder (or excess) one token at a time over the largest documents
        k = min(abs(diff), docs)
        idx = np.argpartition(sizes, -k)[-k:]
        sizes[idx] += 1 if diff > 0 else -1
        diff = tokens - int(sizes.sum())
    if sizes.max() >= 2**31:
        raise SystemExit("bench_loader: a document exceeds int32 tokens; use more documents")
    return sizes


def write_sparse(prefix: str, docs: int, tokens: int, seed: int) -> float:
    """Write prefix.idx for `docs` documents of `tokens` tokens, and a sparse prefix.bin (uint16)."""
    import numpy as np

    from pretrain.data.indexed import encode_index

    t = time.perf_counter()
    with open(prefix + ".idx", "wb") as f:
        f.write(encode_index(_sizes(docs, tokens, seed), np.uint16))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(tokens * 2)
    return time.perf_counter() - t


def write_real(prefix: str, docs: int, doc_tokens: int, vocab: int, seed: int) -> int:
    import numpy as np

    from pretrain.data.indexed import write_pair

    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, rng.lognormal(np.log(doc_tokens) - 0.5, 1.0, docs).astype(np.int64))
    write_pair(prefix, (rng.integers(0, vocab, n, dtype=np.uint16) for n in sizes), np.uint16)
    return int(sizes.sum())


# ------------------------------------------------------------------ measured in a fresh process
def _time_batches(ds, args) -> tuple[list[float], object]:
    """ms per micro-batch for `args.batches` batches as the trainer draws them (rank 0 of 1, from
    sample 0), after 3 untimed ones; and the last batch."""
    import pretrain.data.loader as L

    it = L.micro_batches(ds, args.batch, 0, 1, 0)
    for _ in range(3):
        next(it)
    times = []
    for _ in range(args.batches):
        t = time.perf_counter()
        b = next(it)
        times.append((time.perf_counter() - t) * 1e3)
    return times, b


def child(args) -> int:
    """Open the dataset (phases timed, peak RSS per phase) and time batches; print one JSON line."""
    import numpy as np

    import pretrain.data.loader as L
    import pretrain.data.sample_index as S

    phases: dict[str, dict] = {}
    out = {"rss_after_imports": status_bytes("VmRSS"), "phases": phases}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                ph = phases.setdefault(name, {"seconds": 0.0, "calls": 0})
                ph["seconds"] += time.perf_counter() - t
                ph["calls"] += 1
        return wrapper

    L.TokenSource.open = timed("structure check + sizes (TokenSource.open)", L.TokenSource.open)
    L.sha256_file = timed("sha256 of the .idx (cache identity)", L.sha256_file)
    S.SampleIndex._build = timed("sample index epoch 0 (SampleIndex._build)", S.SampleIndex._build)
    np.savez = timed("index cache write (np.savez)", np.savez)  # as sample_index calls them (this process only)
    np.load = timed("index cache read (np.load)", np.load)

    reset_peak_rss()
    t0 = time.perf_counter()
    ds = L.open_dataset([args.prefix], None, "train", args.seq, 1234, 0, cache_dir=args.cache, verify="structure")
    out["open_seconds"] = time.perf_counter() - t0
    out["open_peak_rss"] = status_bytes("VmHWM")
    out["samples_per_epoch"] = int(ds.index[0].per_epoch)
    out["documents"] = int(len(ds.sources[0]))
    out["tokens"] = int(ds.sources[0].tokens)
    if not args.batches:
        print("CHILD " + json.dumps(out), flush=True)
        return 0
    # the loader: batches as the trainer draws them
    times, b = _time_batches(ds, args)
    assert tuple(b.shape) == (args.batch, args.seq + 1)
    out["batch_ms_median"] = statistics.median(times)
    out["batch_ms_min"] = min(times)
    out["batch_ms_max"] = max(times)
    # the same batches again: their pages are now in the page cache (warm)
    warm, _ = _time_batches(ds, args)
    out["warm_batch_ms_median"] = statistics.median(warm)
    print("CHILD " + json.dumps(out), flush=True)
    return 0


def _child(prefix, cache, seq, batch, batches) -> dict:
    cmd = [sys.executable, __file__, "--child", "--prefix", prefix, "--cache", cache, "--seq", str(seq),
           "--batch", str(batch), "--batches", str(batches)]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        raise SystemExit(f"bench_loader: child failed (exit {r.returncode}):\n{r.stdout[-4000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("CHILD "))
    return json.loads(line[len("CHILD "):])


def _gpu_step_ms() -> tuple[str, float] | None:
    """The 124M plain eager step measured here when a GPU is present (bf16 autocast, B=16, T=1024)."""
    if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: skip importing torch
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    sys.path.insert(0, str(ROOT.parent / "shared" / "baseline"))
    from plain_gpt import GPT

    dev = "cuda"
    model = GPT(12, 768, 12, 50304, 1024).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    x = torch.randint(0, 50304, (16, 1025), device=dev)
    for i in range(13):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return f"{torch.cuda.get_device_name()} plain eager (measured)", (time.perf_counter() - t) / 10 * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--docs", type=int, default=5_000_000, help="documents in the large index")
    p.add_argument("--tokens", type=float, default=10e9, help="tokens in the large index")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=50, help="timed batches")
    p.add_argument("--real-docs", type=int, default=5000, help="documents of the real-token corpus")
    p.add_argument("--doc-tokens", type=int, default=2000, help="mean document length of the real corpus")
    p.add_argument("--dir", help="work directory (default: a temporary one, deleted)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--smoke", action="store_true", help="small sizes (seconds)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.child:
        return child(a)
    if a.smoke:
        a.docs, a.tokens, a.batches, a.real_docs = 50_000, 1e8, 10, 500
    tokens = int(a.tokens)
    work = Path(a.dir or tempfile.mkdtemp(prefix="bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench_loader: python {platform.python_version()}, numpy {__import__('numpy').__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; T={a.seq}, micro-batch {a.batch}", flush=True)
    result = {}
    try:
        # 1. loader time per batch on real tokens
        real = str(work / "real")
        n_real = write_real(real, a.real_docs, a.doc_tokens, 50257, 7)
        r1 = _child(real, str(work / "cache_real"), a.seq, a.batch, a.batches)
        step = _gpu_step_ms()
        steps = dict([step]) if step else dict(REF_STEP_MS)
        print(f"\n1. loader, real tokens ({a.real_docs:,} documents, {n_real:,} tokens, uint16): "
              f"{r1['batch_ms_median']:.3f} ms per micro-batch of {a.batch} x {a.seq + 1} "
              f"(median of {a.batches}; min {r1['batch_ms_min']:.3f}, max {r1['batch_ms_max']:.3f}; "
              f"the same batches again: {r1['warm_batch_ms_median']:.3f})")
        print("| 124M step (B=16, T=1024) | step ms | loader ms | loader / step |")
        print("|---|---|---|---|")
        for name, ms in steps.items():
            print(f"| {name} | {ms:.1f} | {r1['batch_ms_median']:.3f} | {100 * r1['batch_ms_median'] / ms:.2f}% |")
        result["loader_real"] = {**r1, "step_ms": steps}

        # 2. the index at scale
        big = str(work / "big")
        t_write = write_sparse(big, a.docs, tokens, 11)
        cache = str(work / "cache_big")
        r2 = _child(big, cache, a.seq, a.batch, a.batches)
        r3 = _child(big, cache, a.seq, a.batch, 0)  # cache hit
        print(f"\n2. index: {a.docs:,} documents, {tokens:,} tokens (sparse .bin {tokens * 2 / 1e9:.1f} GB, "
              f".idx {os.path.getsize(big + '.idx') / 1e6:.0f} MB written in {t_write:.1f} s), T={a.seq}: "
              f"{r2['samples_per_epoch']:,} samples per epoch")
        print("| open_dataset | wall s | peak RSS GiB (after imports) | target |")
        print("|---|---|---|---|")
        ok = r2["open_seconds"] < TARGET_S and r2["open_peak_rss"] < TARGET_BYTES
        for label, r in (("first open: builds + caches the index", r2), ("second open: cache hit", r3)):
            print(f"| {label} | {r['open_seconds']:.2f} | {r['open_peak_rss'] / 2**30:.2f} "
                  f"({r['rss_after_imports'] / 2**30:.2f}) | < {TARGET_S:.0f} s, < {TARGET_BYTES / 1e9:.0f} GB |")
        print("phases of the first open (s): " + "; ".join(f"{k} {v['seconds']:.2f}" for k, v in r2["phases"].items()))
        print("phases of the second open (s): " + "; ".join(f"{k} {v['seconds']:.2f}" for k, v in r3["phases"].items()))
        print(f"loader over this index: {r2['batch_ms_median']:.3f} ms per micro-batch at first touch of its pages "
              f"(median; a sparse file's zero pages, no disk), {r2['warm_batch_ms_median']:.3f} ms the same batches again")
        print(f"target met: {ok} (first open {r2['open_seconds']:.2f} s, peak RSS {r2['open_peak_rss'] / 1e9:.2f} GB); "
              f"load average {os.getloadavg()[0]:.2f}")
        result["index"] = {"docs": a.docs, "tokens": tokens, "seq": a.seq, "first": r2, "cached": r3,
                           "target_met": ok}
        print("RESULT " + json.dumps(result), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
