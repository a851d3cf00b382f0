"""pretrain-prep's command line: the parser, its size and split syntax, and the checked options."""
from __future__ import annotations

import argparse
import os

from pretrain.errors import HelpFormatter, UserError


def parse_size(s: str, what: str) -> int:
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}
    t = s.strip().upper().rstrip("B")
    num = t.rstrip("KMGTI")
    try:
        v = int(float(num) * mult[t[len(num):]])
    except (KeyError, ValueError):
        raise UserError(f"{what} {s!r}: expected a number with an optional K/M/G (or Ki/Mi/Gi) suffix") from None
    if v < 1:
        raise UserError(f"{what} must be positive, got {s!r}")
    return v


def parse_split(s: str) -> list[float]:
    try:
        fr = [float(x) for x in s.split(",")]
    except ValueError:
        raise UserError(f"--split {s!r}: expected 1-3 comma-separated fractions, e.g. 0.98,0.02") from None
    if not 1 <= len(fr) <= 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise UserError(f"--split {s!r}: 1-3 non-negative fractions (train,valid,test) summing to 1, train > 0")
    return fr


def split_warnings(splits: dict, documents: int) -> list[str]:
    """A split asked for (fraction > 0) that received no document: documents are assigned by a
    hash, so a small corpus can leave a 2% validation split empty, and validation would be off."""
    out = []
    for name, s in splits.items():
        if s["fraction"] > 0 and not s["source_documents"]:
            out.append(f"warning: the {name!r} split got 0 of {documents:,} documents (--split gives it "
                       f"{s['fraction']:g}; documents are assigned by hash). Raise its fraction (e.g. --split "
                       f"0.9,0.1) or give the trainer separate data (data.{name}_paths)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain-prep", description="Tokenize raw text into Megatron shards.",
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="files, globs or directories: .txt .jsonl .jsonl.gz .jsonl.zst "
                   ".parquet, or a Hugging Face dataset directory (save_to_disk)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--tokenizer", required=True, help="byte | hf:PATH | tiktoken:PATH | bpe:VOCAB_SIZE")
    p.add_argument("--text-key", default="text", help="JSON/parquet/dataset field holding the text (default text)")
    p.add_argument("--txt-mode", choices=["doc", "line"], default="doc",
                   help="a .txt file is one document (doc) or each non-blank line is one (line)")
    p.add_argument("--no-eos", dest="eos", action="store_false", help="do not append EOS after each document")
    p.add_argument("--bos", action="store_true", help="prepend BOS to each document")
    p.add_argument("--split", default="0.98,0.02", help="train,valid[,test] fractions of documents (default 0.98,0.02)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the split hash (default 1234)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-size", default="256M",
                   help="maximum tokens per shard, e.g. 50M (default 256M; a single larger document gets its own)")
    p.add_argument("--max-doc-bytes", default="16Mi",
                   help="documents longer than this (UTF-8 bytes) are split into consecutive sequences "
                        "(EOS only after the last); default 16Mi")
    p.add_argument("--chunk-bytes", default="256Ki", help="input bytes per work unit (default 256Ki)")
    p.add_argument("--on-bad-record", choices=["skip", "fail"], default="skip",
                   help="skip (count in the manifest) or fail at the first bad record (default skip)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail when more than this fraction of the records were skipped as malformed or "
                        "unreadable (empty documents and invalid UTF-8, which is kept, do not count); "
                        "default 0.05")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished dataset in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def options(args) -> tuple:
    """(split fractions, shard size, max document bytes, chunk bytes, workers), checked."""
    fractions = parse_split(args.split)
    shard_size = parse_size(args.shard_size, "--shard-size")
    max_doc = parse_size(args.max_doc_bytes, "--max-doc-bytes")
    chunk_bytes = parse_size(args.chunk_bytes, "--chunk-bytes")
    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if not 0 <= args.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction {args.max_bad_fraction}: expected a fraction from 0 to 1")
    return fractions, shard_size, max_doc, chunk_bytes, workers
