"""The per-chunk work of pretrain-prep, run in worker processes (or inline with --workers 1).

A chunk of raw records becomes: the tokens of every kept sequence (EOS/BOS added), their
lengths, the split each goes to, their UTF-8 byte counts, and the bad records found. The
split of a document is decided by a seeded hash of its text (its first --max-doc-bytes for
an enormous one), so it does not depend on the worker count or on the order of processing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pretrain.data.sources import FIRST, LAST, WHOLE, cut_utf8


@dataclass
class Settings:
    tokenizer: str            # a loadable spec (byte, hf:FILE, tiktoken:FILE)
    text_key: str
    eos: bool
    bos: bool
    thresholds: tuple         # cumulative split fractions scaled to 2**64, one per split
    seed: int
    max_doc_bytes: int
    dtype: str
    single_thread: bool = False


_S: Optional[Settings] = None
_TOK = None


def init_worker(settings: Settings, tok=None) -> None:
    """`tok`: the tokenizer already loaded (a forked worker inherits the main process's)."""
    global _S, _TOK
    if settings.single_thread:
        _die_with_parent()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    from pretrain.data.tokenizer import load_tokenizer

    _S = settings
    if tok is not None:
        _TOK = tok
    else:
        _TOK = load_tokenizer(settings.tokenizer) if settings.tokenizer else None


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the main process dies (e.g. is killed), instead of lingering."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def split_thresholds(fractions: list[float]) -> tuple:
    cum, out = 0.0, []
    for f in fractions:
        cum += f
        out.append(min(int(cum * 2**64), 2**64))
    out[-1] = 2**64
    return tuple(out)


def split_of(first_piece: bytes, seed: int, thresholds: tuple) -> int:
    h = int.from_bytes(hashlib.blake2b(first_piece, digest_size=8, key=str(seed).encode()).digest(), "little")
    for i, t in enumerate(thresholds):
        if h < t:
            return i
    return len(thresholds) - 1


def _decode(b: bytes) -> tuple[str, bool]:
    try:
        return b.decode("utf-8"), False
    except UnicodeDecodeError:
        return b.decode("utf-8", errors="replace"), True


def parse_record(kind: str, payload, key: str):
    """(text, invalid_utf8) or (None, (bad_kind, reason))."""
    if kind == "bytes":
        if b"\0" in payload:
            return None, ("binary", "NUL bytes: a binary file, not text")
        return _decode(payload)
    if kind == "json":
        s, bad_utf8 = _decode(payload)
        try:
            obj = json.loads(s.lstrip("\ufeff"))
        except (ValueError, RecursionError) as e:
            return None, ("invalid_json", f"invalid JSON ({e})")
        if not isinstance(obj, dict):
            return None, ("not_an_object", f"JSON value is a {type(obj).__name__}, not an object")
        v = obj.get(key)
        if v is None:
            has = f"{key!r} is null" if key in obj else "keys: " + (", ".join(map(str, list(obj)[:10])) or "none")
            return None, ("missing_text", f"no {key!r} field ({has})")
    else:
        bad_utf8 = False
        v = payload
    if v is None:
        return None, ("missing_text", f"no {key!r} field (or null)")
    if not isinstance(v, str):
        return None, ("non_string_text", f"{key!r} is a {type(v).__name__}, not a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        v, bad_utf8 = v.encode("utf-8", errors="replace").decode("utf-8"), True
    return v, bad_utf8


def texts_of_chunk(chunk, s: Settings):
    """Parse a chunk: (texts, first/last flags, split codes, utf-8 sizes, bad). Split -1 =
    the split of the previous sequence (continuation of an enormous document)."""
    _, kind, items, bad_in, _ = chunk
    bad = list(bad_in)
    texts, flags, splits, nbytes = [], [], [], []
    for line, payload, piece in items:
        text, extra = parse_record(kind, payload, s.text_key)
        if text is None:
            bad.append((extra[0], line, extra[1], 1))
            continue
        if extra:
            bad.append(("invalid_utf8", line, "invalid UTF-8 (replaced by U+FFFD, document kept)", 1))
        if piece == WHOLE and not text.strip():
            bad.append(("empty", line, "empty document", 1))
            continue
        b = text.encode("utf-8")
        pieces = cut_utf8(b, s.max_doc_bytes) if len(b) > s.max_doc_bytes else [b]
        code = split_of(pieces[0], s.seed, s.thresholds) if piece & FIRST else -1
        for j, p in enumerate(pieces):
            texts.append(text if len(pieces) == 1 else p.decode("utf-8"))
            f = 0
            if j == 0 and piece & FIRST:
                f |= FIRST
            if j == len(pieces) - 1 and piece & LAST:
                f |= LAST
            flags.append(f)
            splits.append(code)
            nbytes.append(len(p))
    return texts, flags, splits, nbytes, bad


def process_chunk(chunk):
    """Tokenize one chunk. Returns (tokens, lengths, splits, text_bytes, flags, bad)."""
    s = _S
    texts, flags, splits, nbytes, bad = texts_of_chunk(chunk, s)
    dtype = np.dtype(s.dtype).newbyteorder("<")
    if not texts:
        z = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=dtype), z, np.zeros(0, np.int8), z, np.zeros(0, np.uint8), bad
    flat, lengths = _TOK.encode_arrays(texts)
    fl = np.asarray(flags, dtype=np.uint8)
    add_b = ((fl & FIRST) != 0).astype(np.int64) if s.bos else np.zeros(len(fl), np.int64)
    add_e = ((fl & LAST) != 0).astype(np.int64) if s.eos else np.zeros(len(fl), np.int64)
    out_len = lengths + add_b + add_e
    starts = np.zeros(len(out_len), dtype=np.int64)
    np.cumsum(out_len[:-1], out=starts[1:])
    flat_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=flat_starts[1:])
    out = np.empty(int(out_len.sum()), dtype=dtype)
    shift = np.repeat(starts - flat_starts + add_b, lengths)
    out[np.arange(flat.size, dtype=np.int64) + shift] = flat
    if s.bos:
        out[starts[add_b == 1]] = _TOK.bos_id
    if s.eos:
        out[(starts + out_len - 1)[add_e == 1]] = _TOK.eos_id
    return (out, out_len, np.asarray(splits, dtype=np.int8), np.asarray(nbytes, dtype=np.int64), fl, bad)
