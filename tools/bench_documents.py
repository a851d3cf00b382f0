"""The cost and effect of packed-document training (docs/DATA.md, "Packing and documents"):
data.reset_attention_mask + reset_position_ids + eod_mask_loss on against off, on the
quickstart shape at seq_len 1024 with short documents.

Data: the Python standard library's sources cut at blank lines into short documents (100 to
2000 bytes, tens to hundreds of tokens each, so a 1024-token window holds several), prepared
once with a byte-level BPE of 4096 tokens into --workdir.

1. Throughput: `tools/bench_train.py`'s runner (the real trainer, one process, fp32), options
   on and off alternating for --repeat rounds; the mean step time of the timed steps, tokens/s,
   and the median of the per-round ratios on/off. Target: on at most 15% slower.
2. Attention alone (--kernels): forward + backward of one attention at the same shape (4 heads of
   32, windows of the real data), in process: causal SDPA (options off), one SDPA over the whole
   block-causal mask, and the CPU path's query tiles that the trainer uses.
3. Quality A/B (--ab-steps, 0 to skip): the same data, seed and steps with the options on and
   off; each run's final validation loss, as that run computes it (with the options on, EOD
   inputs carry no loss and no token sees another document: not the same quantity).

    python tools/bench_documents.py                      # ~6 min on 2 CPU cores
    python tools/bench_documents.py --ab-steps 0 --repeat 2 --kernels
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the trainer runner and its shape handling)

ON = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]


def write_corpus(path: Path, mb: float) -> None:
    """The quickstart's corpus (the stdlib's sources, one document per file) cut at blank lines:
    the paragraphs of 100-2000 bytes, about `mb` MB of them."""
    from pretrain.quickstart import write_corpus as stdlib_corpus

    budget, size = mb * 2**20, 0
    with open(stdlib_corpus(path.parent / "stdlib", None), encoding="utf-8") as src, \
            open(path, "w", encoding="utf-8") as f:
        for line in src:
            for para in json.loads(line)["text"].split("\n\n"):
                if 100 <= len(para.encode()) <= 2000:
                    f.write(json.dumps({"text": para}) + "\n")
                    size += len(para)
            if size >= budget:
                return


def prepare(workdir: Path, mb: float) -> Path:
    data = workdir / "data"
    if (data / "manifest.json").is_file():
        return data
    workdir.mkdir(parents=True, exist_ok=True)
    write_corpus(workdir / "corpus.jsonl", mb)
    subprocess.run([sys.executable, "-m", "pretrain.data.prep", str(workdir / "corpus.jsonl"), "-o", str(data),
                    "--tokenizer", "bpe:4096", "--split", "0.95,0.05", "--quiet"], check=True)
    return data


def throughput(a, data: Path) -> None:
    argv = ["--config", str(bench_train.ROOT / "configs" / "quickstart.yaml"), "--data", str(data),
            "--steps", str(a.steps), "--warmup", str(a.warmup), "--repeat", str(a.repeat),
            f"model.seq_len={a.seq_len}", f"train.micro_batch_size={a.micro_batch}", "parallel.zero_stage=0"]
    b, ov, env, tok = bench_train.ab_setup(argv, "throughput")
    tmp = Path(tempfile.mkdtemp(prefix="bench_documents_"))

    def show(r, side, res):
        print(f"  round {r + 1} options {side:3s}: {res['step_ms']:8.1f} ms/step, {res['tokens_per_sec']:,} tok/s",
              flush=True)

    got = bench_train.alternate(b, ov, env, tok, {"on": ON, "off": []}, tmp, show)
    ms = {side: [r["step_ms"] for r in rs] for side, rs in got.items()}
    ratios = [on / off for on, off in zip(ms["on"], ms["off"])]
    on, off = statistics.median(ms["on"]), statistics.median(ms["off"])
    print(f"throughput: options on {tok / on * 1e3:,.0f} tok/s ({on:.1f} ms/step), off {tok / off * 1e3:,.0f} tok/s "
          f"({off:.1f} ms/step); on is {100 * (on / off - 1):+.1f}% step time; per-round on/off "
          f"{[round(x, 3) for x in ratios]}")


def kernels(a, data: Path) -> None:
    import torch
    import torch.nn.functional as F

    from pretrain.data.loader import open_dataset
    from pretrain.model import documents

    eod = json.loads((data / "manifest.json").read_text())["eos_id"]
    ds = open_dataset([str(data)], None, "train", a.seq_len, 1234, 0)
    windows = torch.stack([torch.from_numpy(ds[i]) for i in range(a.micro_batch)])[:, :-1]
    doc = documents.document_ids(windows, eod)
    B, T, h, hd = a.micro_batch, a.seq_len, 4, 32
    ways = {"causal (options off)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "whole block-causal mask": lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=documents.block_causal_mask(doc)),
            "query tiles (the trainer's CPU path)": lambda q, k, v: documents.attend(q, k, v, doc)}
    ms: dict = {name: [] for name in ways}
    q, k, v = (torch.randn(B, h, T, hd, requires_grad=True) for _ in range(3))
    for r in range(2 + a.repeat * 3):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn(q, k, v).sum().backward()
            if r >= 2:  # two warm-up rounds
                ms[name].append(1e3 * (time.perf_counter() - t))
    print(f"attention forward + backward, B {B}, {h} heads of {hd}, T {T}, {int(doc[:, -1].float().mean()) + 1} "
          f"documents per window on average, {torch.get_num_threads()} thread(s):")
    for name, xs in ms.items():
        print(f"  {name:38s} {statistics.median(xs):8.1f} ms (median of {len(xs)})")


def quality(a, data: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_documents_ab_"))
    common = ["--config", str(bench_train.ROOT / "configs" / "quickstart.yaml"), f"data.paths=[{data}]",
              f"model.seq_len={a.seq_len}", f"train.micro_batch_size={a.micro_batch}", f"train.max_steps={a.ab_steps}",
              "train.eval_interval=0", "train.eval_steps=20", "checkpoint.interval=0", "logging.interval=50",
              "logging.tensorboard=false", "parallel.zero_stage=0", f"schedule.warmup_steps={max(1, a.ab_steps // 10)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads or os.cpu_count())}
    finals = {}
    for side in ("off", "on"):
        out = tmp / side
        cmd = [sys.executable, "-m", "pretrain.train", *common, f"train.out_dir={out}", *(ON if side == "on" else [])]
        subprocess.run(cmd, env=env, cwd=bench_train.ROOT, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        finals[side] = next(r["val/loss"] for r in reversed(rows) if "val/loss" in r)
        train = [r["train/loss"] for r in rows if "train/loss" in r]
        print(f"quality: options {side:3s}: {a.ab_steps} steps, last train loss {train[-1]:.4f}, "
              f"final validation loss {finals[side]:.4f} (as this run computes it)", flush=True)
    print(f"quality: validation loss on - off = {finals['on'] - finals['off']:+.4f} "
          "(the 'on' loss leaves out EOD inputs and cross-document context: not the same quantity)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_documents"),
                   help="where the corpus and its shards are kept (reused)")
    p.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of text")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per throughput run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="throughput rounds, on/off alternating")
    p.add_argument("--ab-steps", type=int, default=150, help="steps of each quality run (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kernels", action="store_true", help="also time the attention alone, three ways")
    a = p.parse_args()
    data = prepare(Path(a.workdir), a.mb)
    m = json.loads((data / "manifest.json").read_text())
    docs, tokens = m["totals"]["documents"], m["totals"]["tokens"]
    print(f"data: {data}: {docs:,} documents, {tokens:,} tokens ({tokens / docs:.0f} per document, "
          f"EOD included); seq_len {a.seq_len}")
    throughput(a, data)
    if a.kernels:
        kernels(a, data)
    if a.ab_steps:
        quality(a, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
