"""Benchmark pretrain-prep against the raw tokenizer on the same text and cores.

Builds a JSONL corpus from the Python stdlib sources (*.py, one file per document), trains a
byte-level BPE on it, then at 1x and 10x corpus size measures:
  - the tool: `python -m pretrain.data.prep CORPUS --tokenizer hf:TOK --workers W` end to end
    (MB/s of UTF-8 text, tokens/s, peak RSS of the main process and of main + workers);
  - the raw tokenizer: HF tokenizers `encode_batch` (and `encode_batch_fast`, which the tool
    uses) over batches of 256 documents, RAYON_NUM_THREADS=W, timing the encode calls only.
The ratio is tool MB/s / raw MB/s. Peak memory of the tool should not grow from 1x to 10x.
With --profile, also where the tool's time goes besides the tokenizer, in a separate process on
one core: the per-chunk work of the largest corpus under cProfile (tokenizer, ids to lists, lists
to numpy, parsing, the rest), and the start of a worker pool, spawned and forked.

    python tools/bench_prepare.py --smoke          # seconds (CI)
    python tools/bench_prepare.py --mb 4           # 4 MB and 40 MB corpora
    python tools/bench_prepare.py --mb 2 --repeat 2 --profile
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time

RAW = r"""
import json, os, sys, time, resource
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
fn = getattr(tok, sys.argv[3])
n_tok = n_bytes = 0
t_enc = 0.0
cpu = 0.0
def run(batch):
    global n_tok, t_enc, cpu
    t, c = time.perf_counter(), time.process_time()
    out = fn(batch, add_special_tokens=False)
    t_enc += time.perf_counter() - t
    cpu += time.process_time() - c
    n_tok += sum(len(e.ids) for e in out)
batch = []
with open(sys.argv[2], "rb") as f:
    for line in f:
        text = json.loads(line)["text"]
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == 256:
            run(batch); batch = []
if batch:
    run(batch)
print(json.dumps({"seconds": t_enc, "cpu": cpu, "tokens": n_tok, "bytes": n_bytes,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


PROFILE = r"""
import cProfile, multiprocessing as mp, sys, time
from pretrain.data import encode
from pretrain.data.pool import start_pool
from pretrain.data.prep import CHUNK_DOCS
from pretrain.data.sources import expand_inputs, iter_chunks
from pretrain.data.tokenizer import load_tokenizer
tok_spec, corpus, workers = f"hf:{sys.argv[1]}", sys.argv[2], int(sys.argv[3])
max_doc = 16 * 2**20
def settings():
    return encode.Settings(tok_spec, "text", True, False, encode.split_thresholds([0.98, 0.02]), 1234, max_doc, "uint16")
chunks = list(iter_chunks(expand_inputs([corpus]), "doc", "text", max_doc, 256 * 1024, CHUNK_DOCS))
encode.init_worker(settings())
prof = cProfile.Profile()
prof.enable()
for c in chunks:
    encode.process_chunk(c)
prof.disable()
import pstats
st = pstats.Stats(prof).stats  # {(file, line, function): (calls, primitive calls, own s, cumulative s, callers)}
def ct(pred):
    return sum(v[3] for k, v in st.items() if pred(k))
total = ct(lambda k: k[2] == "process_chunk")
fast = ct(lambda k: "encode_batch_fast" in k[2])
batch = ct(lambda k: k[2] == "encode_batch" and k[0].endswith("tokenizer.py"))
arrays = ct(lambda k: k[2] == "encode_arrays")
parse = ct(lambda k: k[2] == "texts_of_chunk")
rows = [("tokenizer encode_batch_fast", fast), ("Encoding.ids -> Python lists", batch - fast),
        ("lists -> one int64 array", arrays - batch), ("parse: UTF-8, JSON, split hash", parse),
        ("the rest of process_chunk (EOS, per-chunk arrays)", total - arrays - parse)]
print(f"per-chunk work, {len(chunks)} chunks, one core, under cProfile (its overhead inflates the many small calls):")
print("| step | CPU s | share |")
print("|---|---|---|")
for name, sec in rows:
    print(f"| {name} | {sec:.3f} | {100 * sec / total:.1f}% |")
for method in ("spawn", "fork"):
    t = time.perf_counter()
    s = settings()
    if method == "spawn":
        pool = mp.get_context("spawn").Pool(workers, initializer=encode.init_worker, initargs=(s,))
    else:
        lock = open(corpus)  # stands in for the output lock a forked worker closes
        pool = start_pool(s, workers, tok_spec, load_tokenizer(tok_spec), lock)
    pool.map(abs, range(4 * workers), chunksize=1)  # every worker started and initialised
    print(f"pool of {workers} worker(s), {method}: ready in {time.perf_counter() - t:.3f} s")
    pool.terminate()
    pool.join()
"""


def repeat_corpus(base: str, path: str, times: int) -> None:
    """`times` copies of the 1x corpus (each document prefixed by its copy number): same documents, N x size."""
    with open(path, "w", encoding="utf-8") as out:
        for k in range(times):
            with open(base, encoding="utf-8") as f:
                for ln in f:
                    text = json.loads(ln)["text"]
                    out.write(json.dumps({"text": f"# copy {k}\n{text}" if k else text}) + "\n")


def build_corpus(path: str, target_bytes: int) -> tuple[int, int]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    n_docs = n_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        rep = 0
        while n_bytes < target_bytes:
            for p in files:
                try:
                    with open(p, encoding="utf-8") as g:
                        text = g.read()
                except (OSError, UnicodeDecodeError):
                    continue
                if not text.strip():
                    continue
                if rep:
                    text = f"# copy {rep}\n" + text
                text = text[:max(1000, target_bytes - n_bytes)]  # hit the target size closely
                f.write(json.dumps({"text": text}) + "\n")
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
                if n_bytes >= target_bytes:
                    break
            rep += 1
    return n_docs, n_bytes


def run_measured(cmd: list[str], env=None) -> tuple[float, int, int, str, float]:
    """(wall s, peak RSS of the process, peak RSS summed over it and its children, stdout, CPU s incl. children)."""
    import resource

    import psutil

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc = psutil.Process(p.pid)
    peak_main = peak_tree = 0
    while p.poll() is None:
        try:
            main = proc.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{err}")
    return wall, peak_main, peak_tree, out, cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny corpus (0.05 MB and 10x), runs in seconds")
    ap.add_argument("--mb", type=float, default=4.0, help="1x corpus size in MB (default 4)")
    ap.add_argument("--scales", default="1,10", help="corpus multiples to run (default 1,10)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--vocab", type=int, default=None, help="BPE vocabulary trained for the benchmark "
                    "(default 8192, 1024 with --smoke)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the fastest is reported "
                    "(use 2-3 on a shared machine)")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true", help="also profile the tool's per-chunk work and its pool "
                    "start (one core, a separate process)")
    a = ap.parse_args(argv)
    base_mb = 0.05 if a.smoke else a.mb
    a.vocab = a.vocab or (1024 if a.smoke else 8192)
    scales = [int(s) for s in a.scales.split(",")]
    import numpy
    import tokenizers

    from pretrain.data.tokenizer import train_bpe

    tmp = tempfile.TemporaryDirectory() if a.workdir is None else None
    work = a.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}, {os.cpu_count()} cores visible, workers {a.workers}; python {platform.python_version()}, "
          f"tokenizers {tokenizers.__version__}, numpy {numpy.__version__}")
    tok_path = os.path.join(work, "tokenizer.json")
    base = os.path.join(work, "corpus_1x.jsonl")
    n_docs, n_bytes = build_corpus(base, int(base_mb * 1e6))
    with open(base, encoding="utf-8") as f:
        sample = [json.loads(ln)["text"] for _, ln in zip(range(2000), f)]
    t = time.perf_counter()
    train_bpe(iter(sample), a.vocab, tok_path)
    print(f"corpus: stdlib *.py as JSONL, 1x = {n_bytes / 1e6:.2f} MB in {n_docs} documents; "
          f"BPE {a.vocab} trained in {time.perf_counter() - t:.1f} s")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.workers), TOKENIZERS_PARALLELISM="true")
    rows = []
    for s in scales:
        corpus = base if s == 1 else os.path.join(work, f"corpus_{s}x.jsonl")
        if s != 1:
            repeat_corpus(base, corpus, s)
        out = os.path.join(work, f"out_{s}x")
        cmd = [sys.executable, "-m", "pretrain.data.prep", corpus, "-o", out, "--tokenizer", f"hf:{tok_path}",
               "--workers", str(a.workers), "--quiet", "--overwrite", "--shard-size", "10M"]
        best, peak = None, (0, 0)
        raw: dict = {}
        for _ in range(a.repeat):  # interleave tool and raw runs so that both see the same machine load
            got = run_measured(cmd)
            best = got if best is None or got[0] < best[0] else best
            peak = (max(peak[0], got[1]), max(peak[1], got[2]))  # memory: the worst run
            for fn in ("encode_batch", "encode_batch_fast"):
                _, _, _, o, _ = run_measured([sys.executable, "-c", RAW, tok_path, corpus, fn], env=env)
                r = json.loads(o)
                cand = (r["bytes"] / r["seconds"] / 1e6, r["tokens"] / r["seconds"], r["rss"],
                        r["cpu"] / r["bytes"] * 1e6)
                raw[fn] = cand if fn not in raw or cand[0] > raw[fn][0] else raw[fn]
        wall, _, _, _, cpu = best
        rss_main, rss_tree = peak
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        tb, tt = m["totals"]["text_bytes"], m["totals"]["tokens"]
        rows.append((s, tb / 1e6, tb / wall / 1e6, tt / wall, rss_main, rss_tree, raw, wall, cpu / tb * 1e6))
    print()
    print("| corpus | text MB | tool MB/s | tool tokens/s | tool CPU s/MB | tool peak RSS main / all | "
          "raw encode_batch MB/s, tokens/s, CPU s/MB, RSS | raw encode_batch_fast MB/s, tokens/s, CPU s/MB, RSS "
          "| ratio tool/raw MB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, mb, mbs, tps, rm, rt, raw, wall, cpu in rows:
        e, fst = raw["encode_batch"], raw["encode_batch_fast"]
        print(f"| {s}x | {mb:.1f} | {mbs:.2f} | {tps:,.0f} | {cpu:.2f} | {rm / 2**20:.0f} / {rt / 2**20:.0f} MiB | "
              f"{e[0]:.2f}, {e[1]:,.0f}, {e[3]:.2f}, {e[2] / 2**20:.0f} MiB | "
              f"{fst[0]:.2f}, {fst[1]:,.0f}, {fst[3]:.2f}, {fst[2] / 2**20:.0f} MiB | "
              f"{mbs / e[0]:.2f} (vs fast {mbs / fst[0]:.2f}) |")
    if len(rows) > 1:
        print(f"\npeak RSS main+workers {rows[0][5] / 2**20:.0f} MiB at {rows[0][0]}x -> {rows[-1][5] / 2**20:.0f} MiB "
              f"at {rows[-1][0]}x (tool wall {rows[0][7]:.1f} s -> {rows[-1][7]:.1f} s)")
    if a.profile:
        print()
        prof_env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        subprocess.run([sys.executable, "-c", PROFILE, tok_path, corpus, str(a.workers)], env=prof_env, check=True)
    print(f"load average after the runs: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(other processes share these cores when above 0)")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
