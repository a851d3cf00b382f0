"""Perplexity of text files: each document scored whole in rolling windows of seq_len tokens.

A `.jsonl` / `.json` file holds one document per line (its `text` field, or another `text_key`);
any other file is one document. Per file: token perplexity exp(-sum log p / tokens) and bits per
byte (-sum log2 p / UTF-8 bytes, comparable across tokenizers).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pretrain.errors import UserError
from pretrain.eval.requests import score_texts


def read_documents(path: str, text_key: str = "text") -> list[str]:
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--perplexity {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--perplexity {path}: cannot read it as UTF-8 text ({e})") from None
    if p.suffix not in (".jsonl", ".json"):
        return [raw] if raw else []
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            text = doc[text_key] if isinstance(doc, dict) else None
        except (ValueError, KeyError):
            text = None
        if not isinstance(text, str):
            raise UserError(f"--perplexity {path}:{n}: not a JSON object with a string {text_key!r} field")
        docs.append(text)
    return docs


def file_perplexity(scorer, tok, prefix_id: int, path: str, batch_tokens: int = 4096) -> dict:
    """{'file', 'documents', 'tokens', 'bytes', 'loglikelihood', 'perplexity', 'bits_per_byte'}.
    Collective (every rank, the same file)."""
    docs = read_documents(path)
    scored = score_texts(scorer, tok, prefix_id, docs, batch_tokens)
    ll, tokens = sum(lp for lp, _ in scored), sum(n for _, n in scored)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"file": path, "documents": len(docs), "tokens": tokens, "bytes": nbytes, "loglikelihood": ll,
            "perplexity": math.exp(-ll / tokens) if tokens else float("nan"),
            "bits_per_byte": -ll / math.log(2) / nbytes if nbytes else float("nan")}


def line(r: dict) -> str:
    return (f"{r['file']}: {r['documents']} document(s), {r['tokens']:,} tokens | perplexity {r['perplexity']:.4f} "
            f"| bits/byte {r['bits_per_byte']:.4f}")
