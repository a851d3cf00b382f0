"""`manifest.json` of a pretrain-prep output directory: read, validate, write atomically.

The manifest is written last (temp file + fsync + rename): a directory with a manifest is
complete. Fields are documented in docs/DATA.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pretrain.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "pretrain-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
BAD_KINDS = (
    "invalid_json",      # a JSONL line that is not valid JSON
    "not_an_object",     # a JSONL line that is valid JSON but not an object
    "missing_text",      # the text field is absent (or null)
    "non_string_text",   # the text field is not a string
    "invalid_utf8",      # bytes that are not UTF-8: replaced by U+FFFD and kept (counted)
    "empty",             # an empty or whitespace-only document
    "binary",            # text holding NUL bytes: a binary file, not text (e.g. an executable named .txt)
    "unreadable_file",   # a whole file unreadable, truncated or corrupt (records read before stay)
)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temporary file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def is_manifest_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(directory: str) -> dict:
    """The parsed manifest of `directory`; UserError when missing, unreadable or malformed."""
    p = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no such directory")
    if not os.path.isfile(p):
        raise UserError(f"{p}: missing; is {directory} a pretrain-prep output directory (or an unfinished one)?")
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{p}: not a pretrain-shards manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p}: format_version {m.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    for key in ("tokenizer", "vocab_size", "token_dtype", "splits"):
        if key not in m:
            raise UserError(f"{p}: field {key!r} missing")
    if not isinstance(m["splits"], dict):
        raise UserError(f"{p}: 'splits' must be an object")
    for name, s in m["splits"].items():
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            raise UserError(f"{p}: split {name!r} has no shard list")
        for sh in s["shards"]:
            if not isinstance(sh, dict) or not isinstance(sh.get("name"), str) or "/" in sh["name"]:
                raise UserError(f"{p}: split {name!r} has a malformed shard entry")
    return m


class MissingSplit(UserError):
    """The requested split does not exist in a data source."""


def split_shards(m: dict, directory: str, split: str) -> list[dict]:
    """Shard entries of `split`; UserError naming the split when the manifest has none of it."""
    s = m["splits"].get(split)
    if not s or not s["shards"]:
        have = sorted(k for k, v in m["splits"].items() if v.get("shards"))
        raise MissingSplit(f"{directory}: no {split!r} split in the manifest (has: {', '.join(have) or 'none'})")
    return s["shards"]


def data_vocab_size(paths: list[str]) -> int | None:
    """The vocabulary recorded in the sources' manifests (largest), before any process starts.

    Cheap: reads only `manifest.json` files; bare Megatron prefixes have none (None).
    """
    sizes = []
    for p in paths:
        manifest = Path(p) / "manifest.json"
        if manifest.is_file():
            try:
                sizes.append(int(json.loads(manifest.read_text())["vocab_size"]))
            except (ValueError, KeyError, OSError) as e:
                raise UserError(f"{manifest}: unreadable manifest ({e}); re-run pretrain-prep") from None
        elif Path(p).is_dir():  # the loader reads no directory without a manifest: say so, naming it
            raise UserError(f"data.paths: {p} has no manifest.json (not a pretrain-prep output, or an unfinished "
                            "run: re-run pretrain-prep with the same arguments to complete it)")
        elif not Path(str(p) + ".idx").is_file():
            raise UserError(f"data.paths: {p} is neither a directory written by pretrain-prep "
                            "nor a Megatron prefix with a .idx file; fix the path or run pretrain-prep")
    return max(sizes) if sizes else None
