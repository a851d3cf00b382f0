"""pretrain-shards: verify and show token shards (pretrain-prep output or bare Megatron prefixes).

    pretrain-shards verify DIR|PREFIX ...   exit 0 when everything checks, 1 when problems were found
    pretrain-shards show DIR|PREFIX         statistics and a decoded sample document
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

from pretrain.data.indexed import IndexedReader, check_prefix, sha256_file
from pretrain.data.manifest import MANIFEST, is_manifest_dir, read_manifest
from pretrain.data.prep import JOURNAL
from pretrain.data.shards import OUR_FILES
from pretrain.errors import HelpFormatter, UserError, cli_entry

UNFINISHED = "unfinished: re-run pretrain-prep with the same arguments to resume"


def unfinished(path: str) -> str | None:
    """Why `path` is an unfinished pretrain-prep output (killed, disk full), or None: its journal
    is there, or it has no manifest.json but prep's files (temporary or final shards, lock)."""
    if not os.path.isdir(path):
        return None
    names = os.listdir(path)
    tmps = [n for n in names if OUR_FILES.match(n) and n.endswith(".tmp")]
    signs = ([JOURNAL] if JOURNAL in names else []) + ([f"{len(tmps)} .tmp shard file(s)"] if tmps else [])
    ours = tmps or ".prep.lock" in names or any(OUR_FILES.match(n) for n in names)
    if MANIFEST not in names and ours:
        signs.insert(0, f"no {MANIFEST}")
    if not signs or (signs == [f"{len(tmps)} .tmp shard file(s)"] and MANIFEST in names):
        return None  # a finished dataset with a stray temporary file: reported as such below
    return f"{path}: {UNFINISHED} ({', '.join(signs)})"


def _targets(path: str) -> tuple[dict | None, list[tuple[str, str, dict | None]]]:
    """(manifest or None, [(split, prefix, manifest entry)]) for a directory or prefix."""
    if is_manifest_dir(path):
        m = read_manifest(path)
        return m, [(split, os.path.join(path, sh["name"]), sh)
                   for split, s in m["splits"].items() for sh in s["shards"]]
    if os.path.isdir(path):
        idx = sorted(glob.glob(os.path.join(path, "*.idx")))
        if not idx:
            raise UserError(f"{path}: no manifest.json and no .idx files")
        return None, [("-", p[:-4], None) for p in idx]
    if os.path.isfile(path + ".idx") or os.path.isfile(path + ".bin"):
        return None, [("-", path, None)]
    raise UserError(f"{path}: no such directory or Megatron prefix (PREFIX.bin/.idx)")


def verify(path: str, checksums: bool, vocab_size: int | None, quiet: bool) -> list[str]:
    why = unfinished(path)
    if why:
        return [why]
    m, targets = _targets(path)
    problems = []
    vocab = int(m["vocab_size"]) if m else vocab_size
    if m:
        t = m["tokenizer"]
        if t.get("file"):
            tp = os.path.join(path, t["file"])
            if not os.path.isfile(tp):
                problems.append(f"{tp}: tokenizer file missing")
            elif checksums and t.get("sha256") and sha256_file(tp) != t["sha256"]:
                problems.append(f"{tp}: sha256 mismatch")
        names = {os.path.basename(p) for _, p, _ in targets}
        for f in os.listdir(path):
            if f.endswith(".tmp") and f.rsplit(".", 2)[0] in names:
                problems.append(f"{os.path.join(path, f)}: leftover temporary file")
    for split, prefix, entry in targets:
        probs = check_prefix(prefix, expected=entry, vocab_size=vocab, checksums=checksums,
                             dtype=m["token_dtype"] if m else None)
        if not quiet:
            print(f"{'ok  ' if not probs else 'FAIL'} {prefix}")
        problems += probs
    return problems


def show(path: str, split: str | None, doc: int, max_chars: int, tokenizer: str | None) -> None:
    m, targets = _targets(path)
    if m:
        t = m["tokenizer"]
        print(f"dataset   {path}")
        print(f"tokenizer {t['spec']} ({t['type']}), vocab {m['vocab_size']}, eos {m.get('eos_id')}, "
              f"bos {m.get('bos_id')}, tokens {m['token_dtype']}")
        bad = {k: v for k, v in m.get("bad_records", {}).items() if v}
        print(f"sources   {len(m.get('sources', []))} files; bad records: "
              + (", ".join(f"{k} {v}" for k, v in bad.items()) or "none"))
    by_split: dict[str, list] = {}
    for s, prefix, _ in targets:
        by_split.setdefault(s, []).append(prefix)
    for s, prefixes in by_split.items():
        readers = [IndexedReader(p) for p in prefixes]
        sizes = np.concatenate([np.asarray(r.sizes, dtype=np.int64) for r in readers]) if readers else np.zeros(0)
        nbytes = sum(r.bin_bytes for r in readers)
        print(f"split {s}: {len(readers)} shards, {sizes.size:,} documents, {int(sizes.sum()):,} tokens, "
              f"{nbytes / 1e6:,.1f} MB")
        if sizes.size:
            q = np.percentile(sizes, [50, 99])
            print(f"  tokens/document: min {sizes.min()}, mean {sizes.mean():.1f}, median {q[0]:.0f}, "
                  f"p99 {q[1]:.0f}, max {sizes.max()}")
    want = split or ("train" if "train" in by_split else next(iter(by_split)))
    if want not in by_split:
        raise UserError(f"{path}: no split {want!r} (has: {', '.join(by_split)})")
    tok = None
    if tokenizer:
        from pretrain.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tokenizer)
    elif m:
        from pretrain.data.tokenizer import tokenizer_from_manifest
        tok = tokenizer_from_manifest(path)
    readers = [IndexedReader(p) for p in by_split[want]]
    d = doc
    for r in readers:
        if d < r.n:
            ids = np.array(r.get(d), dtype=np.int64)
            print(f"document {doc} of split {want} ({ids.size} tokens): first ids {ids[:16].tolist()}")
            if tok is not None:
                text = tok.decode(ids)
                cut = text[:max_chars] + (" [...]" if len(text) > max_chars else "")
                print("-" * 60 + "\n" + cut + "\n" + "-" * 60)
            else:
                print("(pass --tokenizer SPEC to decode a bare prefix)")
            return
        d -= r.n
    raise UserError(f"split {want!r} has fewer than {doc + 1} documents")


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pretrain-shards", description="Verify or show token shards.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", formatter_class=HelpFormatter,
                       help="check magic, version, dtype, sizes, pointers, doc_idx, checksums, token ids")
    v.add_argument("paths", nargs="+", help="pretrain-prep output directories or Megatron prefixes")
    v.add_argument("--no-checksums", action="store_true", help="skip sha256 and the token-id scan (fast)")
    v.add_argument("--vocab-size", type=int, default=None, help="token id bound for prefixes without a manifest")
    v.add_argument("--quiet", action="store_true", help="print problems only")
    s = sub.add_parser("show", formatter_class=HelpFormatter,
                       help="statistics and a decoded sample document")
    s.add_argument("path")
    s.add_argument("--split", default=None, help="split to sample from (default train)")
    s.add_argument("--doc", type=int, default=0, help="document number to decode (default 0)")
    s.add_argument("--max-chars", type=int, default=500, help="characters of the document to print")
    s.add_argument("--tokenizer", default=None, help="tokenizer spec (for prefixes without a manifest)")
    a = p.parse_args(argv)
    if a.cmd == "show":
        show(a.path, a.split, a.doc, a.max_chars, a.tokenizer)
        return 0
    problems = []
    for path in a.paths:
        problems += verify(path, not a.no_checksums, a.vocab_size, a.quiet)
    for pr in problems:
        print(f"problem: {pr}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    if not a.quiet:
        print("verify: all shards ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
