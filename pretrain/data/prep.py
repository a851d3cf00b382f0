"""pretrain-prep: raw text -> tokenized Megatron shards + manifest.json (see docs/DATA.md).

Reading is streamed in ordered chunks; workers parse and tokenize them, and the main process
writes the results in input order, so the output is byte-identical for any --workers.
Shards are written under temporary names and renamed when complete; a journal
(.prep_state.json) records the position after each completed shard, so a killed run
re-run with the same arguments resumes there. manifest.json is written last.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time

import numpy as np

from pretrain import __version__
from pretrain.data import encode
from pretrain.data.indexed import sha256_file as _sha
from pretrain.data.indexed import token_dtype
from pretrain.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, write_json_atomic
from pretrain.data.pool import NoBar, ordered_map, start_pool
from pretrain.data.shards import Outputs, RestoreFailed, clean_outputs
from pretrain.data.sources import check_extras, expand_inputs, iter_chunks, source_info
from pretrain.data.tokenizer import load_tokenizer, parse_bpe_spec, train_bpe
from pretrain.data.prep_args import build_parser, options, parse_size, split_warnings
from pretrain.errors import UserError, cli_entry, known_io_errors, os_error_line

JOURNAL = ".prep_state.json"
CHUNK_DOCS = 2048
CHECKPOINT_SECONDS = 60.0


def _fingerprint(cfg: dict, sources: list[dict], tok_sha: str | None) -> str:
    blob = json.dumps({"cfg": cfg, "sources": sources, "tokenizer_sha256": tok_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _lock(out: str):
    import fcntl

    fh = open(os.path.join(out, ".prep.lock"), "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"{out}: another pretrain-prep is writing to this directory") from None
    return fh


def _existing_manifest(out: str, fp: str, overwrite: bool) -> bool:
    """True when `out` already holds this exact dataset (nothing to do)."""
    p = os.path.join(out, MANIFEST)
    if not os.path.exists(p):
        return False
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        m = {}
    try:
        intact = m.get("prep_fingerprint") == fp and all(
            os.path.isfile(os.path.join(out, f"{sh['name']}.{e}")) and
            os.path.getsize(os.path.join(out, f"{sh['name']}.{e}")) == sh[f"{e}_bytes"]
            for s in m.get("splits", {}).values() for sh in s.get("shards", []) for e in ("bin", "idx"))
    except (KeyError, TypeError, AttributeError):
        intact = False
    if intact and not overwrite:
        return True
    if not overwrite:
        why = "was built from other inputs or options" if m.get("prep_fingerprint") != fp else "is damaged"
        raise UserError(f"{out} already holds a dataset that {why}; pass --overwrite to replace it "
                        f"or choose another --output")
    clean_outputs(out, also_manifest=True)
    return False


def _bpe_texts(sources, args, settings):
    """Texts of the train split (by the same hash as the shards), for BPE training."""
    chunks = iter_chunks(sources, args.txt_mode, args.text_key, settings.max_doc_bytes,
                         parse_size(args.chunk_bytes, "--chunk-bytes"), CHUNK_DOCS)
    last = 0
    for c in chunks:
        texts, _, splits, _, _ = encode.texts_of_chunk(c, settings)
        for t, s in zip(texts, splits):
            last = last if s < 0 else s
            if last == 0:
                yield t


def _load_journal(out: str, fp: str):
    try:
        with open(os.path.join(out, JOURNAL), encoding="utf-8") as f:
            j = json.load(f)
    except (OSError, ValueError):
        return None
    return j if isinstance(j, dict) and j.get("fingerprint") == fp else None


def _setup_tokenizer(args, out, journal, sources, tok, tok_bytes, fractions, max_doc):
    """(tokenizer, its file name in `out` or None, journal): trains bpe:N, copies other files beside the shards."""
    bpe_n = parse_bpe_spec(args.tokenizer)
    if bpe_n is None:
        if tok_bytes is None:
            return tok, None, journal
        name = "tokenizer.tiktoken" if tok.kind == "tiktoken" else "tokenizer.json"
        tp = os.path.join(out, name)
        if not os.path.isfile(tp) or _sha(tp) != hashlib.sha256(tok_bytes).hexdigest():
            with open(tp + ".tmp", "wb") as f:
                f.write(tok_bytes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tp + ".tmp", tp)
        return tok, name, journal
    from pretrain.data.tokenizer import HFTokenizer

    tp = os.path.join(out, "tokenizer.json")
    if journal and os.path.isfile(tp) and journal.get("tokenizer_sha256") == _sha(tp):
        return HFTokenizer(tp, args.tokenizer), "tokenizer.json", journal
    clean_outputs(out)
    thresholds = encode.split_thresholds(fractions)
    pre = encode.Settings("", args.text_key, args.eos, args.bos, thresholds, args.seed, max_doc, "int64")
    if not args.quiet:
        print(f"pretrain-prep: training a byte-level BPE of {bpe_n} tokens on the train split ...",
              file=sys.stderr, flush=True)
    tok = train_bpe(_bpe_texts(sources, args, pre), bpe_n, tp)
    tok.spec = args.tokenizer
    return tok, "tokenizer.json", None


_OUTPUT: dict = {}  # this run's output directory, for the message of a full or read-only disk


def _io_error(e: OSError) -> str:
    """One line for a full disk, a read-only file system or no permission while prep writes."""
    out = _OUTPUT.get("out")
    line = os_error_line(e, e.filename or out or "the output", "pretrain-prep: writing")
    if out and os.path.exists(os.path.join(out, JOURNAL)):
        return (f"{line}; the shards completed so far and the journal ({JOURNAL}) are kept, no manifest was "
                "written: free space (or fix the file system) and re-run pretrain-prep with the same arguments "
                "to resume")
    return f"{line}; no dataset was written: choose another --output or fix the file system"


@cli_entry
@known_io_errors(_io_error)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    fractions, shard_size, max_doc, chunk_bytes, workers = options(args)
    sources = expand_inputs(args.inputs)
    check_extras(sources)
    out = _OUTPUT["out"] = os.path.abspath(args.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output {out}: exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    lock = _lock(out)  # noqa: F841  (held until exit)

    tok, tok_bytes = None, None
    if parse_bpe_spec(args.tokenizer) is None:
        tok = load_tokenizer(args.tokenizer)
        if tok.file:
            with open(tok.file, "rb") as f:
                tok_bytes = f.read()
    src_info = [source_info(s) for s in sources]
    cfg = {"tokenizer": args.tokenizer, "text_key": args.text_key, "txt_mode": args.txt_mode, "eos": args.eos,
           "bos": args.bos, "split": fractions, "seed": args.seed, "shard_size": shard_size,
           "max_doc_bytes": max_doc, "chunk_bytes": chunk_bytes, "chunk_docs": CHUNK_DOCS,
           "on_bad_record": args.on_bad_record, "format_version": FORMAT_VERSION}
    fp = _fingerprint(cfg, src_info, hashlib.sha256(tok_bytes).hexdigest() if tok_bytes else None)
    jp = os.path.join(out, JOURNAL)
    if _existing_manifest(out, fp, args.overwrite):
        if os.path.exists(jp):
            os.remove(jp)
        if not args.quiet:
            print(f"pretrain-prep: {out} is up to date (same inputs and options); nothing to do")
        return 0
    journal = _load_journal(out, fp)
    if journal is None:
        clean_outputs(out)
    tok, tok_name, journal = _setup_tokenizer(args, out, journal, sources, tok, tok_bytes, fractions, max_doc)
    if args.eos and tok.eos_id is None:
        raise UserError(f"tokenizer {args.tokenizer!r} has no end-of-text token; pass --no-eos")
    if args.bos and tok.bos_id is None:
        raise UserError(f"tokenizer {args.tokenizer!r} has no beginning-of-text token; drop --bos")
    dtype = token_dtype(tok.vocab_size)
    worker_spec = f"hf:{os.path.join(out, tok_name)}" if args.tokenizer.startswith("bpe:") else args.tokenizer
    settings = encode.Settings(worker_spec, args.text_key, args.eos, args.bos, encode.split_thresholds(fractions),
                               args.seed, max_doc, dtype.name)
    outputs, start = _outputs(out, journal, fractions, dtype, shard_size, args.quiet)
    tok_sha = _sha(os.path.join(out, tok_name)) if tok_name else None

    def checkpoint(done_chunks):
        write_json_atomic(jp, {"fingerprint": fp, "chunks_done": done_chunks, "tokenizer_sha256": tok_sha,
                               **outputs.state()})

    checkpoint(start)
    examples = _run(args, sources, settings, outputs, start, workers, sum(s["size"] for s in src_info), checkpoint,
                    (max_doc, chunk_bytes), (tok, lock))
    _check_survivors(outputs, examples, args.max_bad_fraction, out)
    splits = outputs.finish()
    for warning in split_warnings(splits, outputs.stats["documents"]):
        print(warning, file=sys.stderr, flush=True)
    m = _manifest(args, argv, tok, tok_name, tok_sha, dtype, splits, outputs.stats, src_info, fp, cfg)
    write_json_atomic(os.path.join(out, MANIFEST), m)
    os.remove(jp)
    if not args.quiet:
        _summary(out, m, outputs.stats, time.time() - t0)
    return 0


def _outputs(out: str, journal, fractions, dtype, shard_size: int, quiet: bool):
    """(the shard writers, the input chunk to start from): restored from the journal of an
    interrupted run, else fresh (also when the journal cannot be restored)."""
    outputs = Outputs(out, fractions, dtype, shard_size)
    if journal is None:
        return outputs, 0
    try:
        outputs.restore(journal)
        start = int(journal["chunks_done"])
        if not quiet:
            print(f"pretrain-prep: resuming after {sum(len(w.done) for w in outputs.writers.values())} "
                  f"completed shards (input chunk {start})", file=sys.stderr, flush=True)
        return outputs, start
    except (RestoreFailed, KeyError, ValueError) as e:
        if not quiet:
            print(f"pretrain-prep: cannot resume ({e}); starting over", file=sys.stderr, flush=True)
        outputs.close_files()
        clean_outputs(out, keep_tokenizer=True)
        return Outputs(out, fractions, dtype, shard_size), 0


def _run(args, sources, settings, outputs, start, workers, total_in, checkpoint, sizes, parent):
    """Stream every chunk from `start` through the workers into `outputs`, with a progress bar.
    `parent`: (the loaded tokenizer, the output lock) for forked workers."""
    pool = start_pool(settings, workers, args.tokenizer, *parent)
    try:
        return _stream(args, sources, settings, outputs, start, workers, total_in, checkpoint, sizes, pool)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _stream(args, sources, settings, outputs, start, workers, total_in, checkpoint, sizes, pool):
    max_doc, chunk_bytes = sizes
    if args.quiet:
        bar = NoBar()
    else:
        from tqdm import tqdm

        bar = tqdm(total=total_in, unit="B", unit_scale=True, unit_divisor=1024, desc="pretrain-prep",
                   disable=None, file=sys.stderr, dynamic_ncols=True)  # None: off when not a terminal
    chunks = iter_chunks(sources, args.txt_mode, args.text_key, max_doc, chunk_bytes, CHUNK_DOCS)
    skipped = 0

    def todo():
        nonlocal skipped
        for i, c in enumerate(chunks):
            if i < start:
                skipped += c[4]
                continue
            if skipped:
                bar.update(skipped)
                skipped = 0
            yield c

    t_run, last_ck, last_bar = time.time(), time.time(), 0.0
    run_docs = run_tokens = 0
    chunk_i = start
    meta: dict = {}
    examples: dict = {}  # the first bad record of each kind, for the error when too few survive
    results = ordered_map(pool, settings, _tag(todo(), meta), workers)
    try:
        for res, (sid, progress) in _zip_with_meta(results, meta):
            tokens, lengths, splits, nbytes, flags, bad = res
            for kind, line, reason, count in bad:
                outputs.stats["bad"][kind] = outputs.stats["bad"].get(kind, 0) + count
                where = f"{sources[sid].path}:{line}" if line else sources[sid].path
                examples.setdefault(kind, f"{where}: {reason}")
                if args.on_bad_record == "fail":
                    raise UserError(f"{where}: {reason} (--on-bad-record fail)")
            closed = outputs.consume(tokens, lengths, splits, nbytes, flags, progress)
            run_docs += int(np.count_nonzero(flags & 1))
            run_tokens += int(tokens.size)
            chunk_i += 1
            if closed or time.time() - last_ck > CHECKPOINT_SECONDS:
                checkpoint(chunk_i)
                last_ck = time.time()
            bar.update(progress)
            now = time.time()
            if now - last_bar > 0.5:
                dt = max(now - t_run, 1e-9)
                bar.set_postfix_str(f"{run_docs / dt:,.0f} docs/s, {run_tokens / dt:,.0f} tok/s", refresh=False)
                last_bar = now
    finally:
        results.close()
        bar.close()
    return examples


# Skipped records that count against --max-bad-fraction: not empty documents (nothing to lose)
# and not invalid UTF-8 (kept, with replacement characters).
NOT_COUNTED = ("empty", "invalid_utf8")


def _check_survivors(outputs, examples: dict, max_fraction: float, out: str) -> None:
    """UserError, with the counts by kind and the first example of each, when no document
    survived or too many records were bad; the unfinished output is removed first."""
    st = outputs.stats
    bad = {k: v for k, v in st["bad"].items() if v and k not in NOT_COUNTED}
    skipped = sum(bad.values())
    records = st["documents"] + skipped + st["bad"].get("empty", 0)
    if st["documents"] and skipped <= max_fraction * records:
        return
    kinds = "; ".join(f"{k} {v} (first: {examples.get(k, '?')})" for k, v in st["bad"].items() if v)
    if not st["documents"]:
        what = (f"no document survived: {records} record(s) read" + (f", skipped: {kinds}" if kinds else
                ", the inputs hold no records (empty files or blank lines only)"))
        fix = "check the inputs and --text-key"
    else:
        what = (f"{skipped} of {records} records ({skipped / records:.1%}) were bad, more than "
                f"--max-bad-fraction {max_fraction:g}: {kinds}")
        fix = "check the inputs and --text-key, or raise --max-bad-fraction"
    outputs.close_files()
    clean_outputs(out)
    raise UserError(f"{what}; no dataset written to {out}; {fix}")


def _tag(chunks, meta):
    """Pass chunks through, remembering (source id, progress bytes) per chunk in order."""
    for c in chunks:
        meta.setdefault("q", collections.deque()).append((c[0], c[4]))
        yield c


def _zip_with_meta(results, meta):
    for r in results:
        yield r, meta["q"].popleft()


def _manifest(args, argv, tok, tok_name, tok_sha, dtype, splits, stats, src_info, fp, cfg) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pretrain_version": __version__,
        "tokenizer": {"spec": args.tokenizer, "type": tok.kind, "file": tok_name, "sha256": tok_sha,
                      "variant": getattr(tok, "variant", None),
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                      "special_tokens": tok.special_tokens()},
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "token_dtype": dtype.name,
        "eos_appended": args.eos,
        "bos_prepended": args.bos,
        "options": cfg,
        "totals": {k: stats[k] for k in ("documents", "sequences", "tokens", "text_bytes", "documents_split")},
        "splits": splits,
        "bad_records": {k: v for k, v in stats["bad"].items()},
        "sources": src_info,
        "command": ["pretrain-prep"] + list(sys.argv[1:] if argv is None else argv),
        "prep_fingerprint": fp,
    }


def _summary(out, m, stats, dt):
    mb = stats["text_bytes"] / 1e6
    n_sh = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"pretrain-prep: {stats['documents']:,} documents, {mb:,.1f} MB of text -> {stats['tokens']:,} tokens "
          f"in {n_sh} shards, {dt:.1f} s ({mb / dt:.2f} MB/s, {stats['tokens'] / dt:,.0f} tokens/s, "
          f"{stats['documents'] / dt:,.0f} docs/s)")
    for name, s in m["splits"].items():
        print(f"  {name}: {s['source_documents']:,} documents, {s['tokens']:,} tokens, {len(s['shards'])} shards")
    bad = {k: v for k, v in stats["bad"].items() if v}
    if bad:
        print("  bad records: " + ", ".join(f"{k} {v}" for k, v in bad.items()) +
              " (invalid_utf8 kept with replacement characters, the others skipped)")
    if stats["documents_split"]:
        print(f"  {stats['documents_split']} documents over --max-doc-bytes were split into consecutive sequences")
    print(f"  output: {out} (manifest.json, tokenizer {m['tokenizer']['spec']}, vocab {m['vocab_size']}, "
          f"{m['token_dtype']})")


if __name__ == "__main__":
    sys.exit(main())
