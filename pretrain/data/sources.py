"""Input discovery and streaming reading for pretrain-prep.

`expand_inputs` turns files, globs and directories into an ordered list of sources.
`iter_chunks` reads them one after another, in bounded memory, and yields chunks of raw
records (bytes or Python objects, not parsed yet: parsing runs in the workers). Chunk
boundaries depend only on the data and the chunk limits, never on the worker count, so a
chunk's ordinal is a resumable position in the input.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from pretrain.errors import UserError

FIRST, LAST = 1, 2
WHOLE = FIRST | LAST
EXTS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".json.gz", ".json.zst", ".json", ".txt", ".parquet")
# `.json` is read as JSON lines, one object per line (Megatron's and NeoX's habit)
_FORMAT_OF_EXT = {".json.gz": "jsonl.gz", ".json.zst": "jsonl.zst", ".json": "jsonl"}


@dataclass
class Source:
    path: str
    fmt: str  # txt | jsonl | jsonl.gz | jsonl.zst | parquet | hf

    @property
    def payload(self) -> str:
        """How records are passed to workers: json (raw line), bytes (raw text) or obj (a value)."""
        return {"txt": "bytes", "parquet": "obj", "hf": "obj"}.get(self.fmt, "json")


def _fmt_of(path: str) -> Optional[str]:
    low = path.lower()
    for e in EXTS:
        if low.endswith(e):
            return _FORMAT_OF_EXT.get(e, e[1:])
    return None


def is_hf_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))
    )


def _walk(d: str) -> list[Source]:
    out = []
    for root, dirs, files in os.walk(d):
        dirs.sort()
        keep = []
        for sub in dirs:
            p = os.path.join(root, sub)
            if sub.startswith("."):
                continue
            if is_hf_dataset_dir(p):
                out.append(Source(p, "hf"))
            else:
                keep.append(sub)
        dirs[:] = keep
        for f in sorted(files):
            fmt = _fmt_of(f)
            if fmt and not f.startswith("."):
                p = os.path.join(root, f)
                if f.lower().endswith(".json") and not _looks_like_json_lines(p):
                    print(f"pretrain-prep: skipping {p}: a .json file whose first line is not a JSON object "
                          "(not JSON lines; name it to read it anyway)", file=sys.stderr)
                    continue
                out.append(Source(p, fmt))
    return out


def _looks_like_json_lines(path: str) -> bool:
    """A directory's `.json` file is input when its first line is a whole JSON object (JSON lines,
    Megatron's habit), not e.g. a pretty-printed tokenizer.json or config.json."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20).strip()
        return isinstance(json.loads(first), dict)
    except (OSError, ValueError):
        return False


def expand_inputs(inputs: list[str]) -> list[Source]:
    """Ordered, de-duplicated sources; UserError for a missing path, empty glob or unknown type."""
    out: list[Source] = []
    for inp in inputs:
        if os.path.isdir(inp):
            found = [Source(inp, "hf")] if is_hf_dataset_dir(inp) else _walk(inp)
            if not found:
                raise UserError(f"{inp}: directory holds no input files ({', '.join(EXTS)}) or HF dataset")
            out += found
        elif os.path.isfile(inp):
            fmt = _fmt_of(inp)
            if fmt is None:
                raise UserError(f"{inp}: unsupported input type; expected one of {', '.join(EXTS)}, "
                                f"a directory, or a Hugging Face dataset saved with save_to_disk")
            out.append(Source(inp, fmt))
        elif any(c in inp for c in "*?["):
            matches = sorted(glob.glob(inp, recursive=True))
            if not matches:
                raise UserError(f"{inp}: glob matches no files")
            for m in matches:
                if os.path.isdir(m):
                    out += [Source(m, "hf")] if is_hf_dataset_dir(m) else _walk(m)
                elif _fmt_of(m):
                    out.append(Source(m, _fmt_of(m)))
        else:
            raise UserError(f"{inp}: no such file or directory")
    seen, uniq = set(), []
    for s in out:
        key = os.path.realpath(s.path)
        if key not in seen:
            seen.add(key)
            uniq.append(Source(os.path.abspath(s.path), s.fmt))
    if not uniq:
        raise UserError("no input files found")
    return uniq


def check_extras(sources: list[Source]) -> None:
    """Fail early, naming the optional extra, when a source needs a package that is missing."""
    need = {s.fmt for s in sources}
    table = [("parquet", "pyarrow", "parquet"), ("jsonl.zst", "zstandard", "zstd"), ("hf", "datasets", "hf-datasets")]
    for fmt, mod, extra in table:
        if fmt in need:
            try:
                __import__(mod)
            except ImportError:
                first = next(s.path for s in sources if s.fmt == fmt)
                raise UserError(f"{first}: reading {fmt} input needs {mod}, an optional extra: "
                                f"pip install 'pretrain[{extra}]'") from None


def source_info(s: Source) -> dict:
    if os.path.isdir(s.path):
        size, mtime = 0, 0
        for root, _, files in os.walk(s.path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                size += st.st_size
                mtime = max(mtime, st.st_mtime_ns)
    else:
        st = os.stat(s.path)
        size, mtime = st.st_size, st.st_mtime_ns
    return {"path": s.path, "format": s.fmt, "size": size, "mtime_ns": mtime}


def cut_utf8(b: bytes, limit: int) -> list[bytes]:
    """Split bytes into pieces of at most `limit` bytes, never inside a UTF-8 character."""
    out, start = [], 0
    while len(b) - start > limit:
        cut = start + limit
        back = 0
        while back < 3 and (b[cut - back] & 0xC0) == 0x80:
            back += 1
        if (b[cut - back] & 0xC0) == 0x80:
            back = 0  # not UTF-8 anyway: cut anywhere
        out.append(b[start:cut - back])
        start = cut - back
    out.append(b[start:])
    return out


# ---- record generators: yield ("r", line, payload, piece, pos) or ("b", kind, line, reason, count, pos)

def _open_raw(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise _Unreadable(0, f"cannot open: {e.strerror or e}") from None


class _Unreadable(Exception):
    def __init__(self, line, reason):
        self.line, self.reason = line, reason


def _zstd_blocks(raw) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    while True:
        block = raw.read(1 << 20)
        if not block:
            break
        while block:
            fed = True
            out = dobj.decompress(block)
            block = b""
            if dobj.eof:
                block, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
            if out:
                yield out
    if fed:
        raise EOFError("zstd stream ended before the end of its frame (truncated file)")


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for b in blocks:
        parts = (rest + b).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _jsonl_records(src: Source):
    raw = _open_raw(src.path)
    line = 0
    try:
        if src.fmt == "jsonl.gz":
            lines = gzip.GzipFile(fileobj=raw, mode="rb")
        elif src.fmt == "jsonl.zst":
            lines = _split_lines(_zstd_blocks(raw))
        else:
            lines = raw
        for ln in lines:
            line += 1
            if ln.strip():
                yield ("r", line, ln.rstrip(b"\r\n"), WHOLE, raw.tell())
    except (EOFError, OSError, zlib.error) as e:
        raise _Unreadable(line + 1, f"unreadable or truncated {src.fmt} file ({e})") from None
    except Exception as e:  # zstandard.ZstdError
        if type(e).__name__ == "ZstdError":
            raise _Unreadable(line + 1, f"corrupt zstd file ({e})") from None
        raise
    finally:
        raw.close()


def _txt_records(src: Source, txt_mode: str, max_doc_bytes: int):
    raw = _open_raw(src.path)
    try:
        if txt_mode == "line":
            for i, ln in enumerate(raw, 1):
                ln = ln.rstrip(b"\r\n")
                if ln.strip():
                    yield ("r", i, ln, WHOLE, raw.tell())
            return
        size = os.fstat(raw.fileno()).st_size
        if size <= max_doc_bytes:
            yield ("r", 1, raw.read(), WHOLE, raw.tell())
            return
        carry, first = b"", True
        while True:
            block = raw.read(max_doc_bytes)
            data = carry + block
            if not block:
                if data or first:
                    yield ("r", 1, data, (FIRST if first else 0) | LAST, raw.tell())
                return
            pieces = cut_utf8(data, max_doc_bytes)
            carry = pieces.pop()
            for p in pieces:
                yield ("r", 1, p, FIRST if first else 0, raw.tell())
                first = False
    except OSError as e:
        raise _Unreadable(0, f"read error ({e})") from None
    finally:
        raw.close()


def _parquet_records(src: Source, key: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
        n = pf.metadata.num_rows
        if key not in pf.schema_arrow.names:
            if n:
                yield ("b", "missing_text", 1, f"no column {key!r} (columns: {pf.schema_arrow.names})", n, 0)
            return
        size, row = os.path.getsize(src.path), 0
        for batch in pf.iter_batches(batch_size=1024, columns=[key]):
            for v in batch.column(0).to_pylist():
                row += 1
                yield ("r", row, v, WHOLE, size * row // max(n, 1))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on corrupt or truncated files
        raise _Unreadable(0, f"unreadable parquet file ({type(e).__name__}: {e})") from None


def _hf_records(src: Source, key: str):
    import datasets

    try:
        obj = datasets.load_from_disk(src.path)
    except Exception as e:
        raise _Unreadable(0, f"cannot load Hugging Face dataset ({e})") from None
    parts = [obj[k] for k in sorted(obj.keys())] if isinstance(obj, dict) else [obj]
    row = 0
    for d in parts:
        if key not in d.column_names:
            yield ("b", "missing_text", row + 1, f"no column {key!r} (columns: {d.column_names})", len(d), 0)
            row += len(d)
            continue
        for batch in d.iter(batch_size=1024):
            for v in batch[key]:
                row += 1
                yield ("r", row, v, WHOLE, 0)


def records(src: Source, txt_mode: str, text_key: str, max_doc_bytes: int):
    """Events of one source; an unreadable or truncated file becomes one `unreadable_file` event."""
    if src.fmt == "txt":
        gen = _txt_records(src, txt_mode, max_doc_bytes)
    elif src.fmt == "parquet":
        gen = _parquet_records(src, text_key)
    elif src.fmt == "hf":
        gen = _hf_records(src, text_key)
    else:
        gen = _jsonl_records(src)
    try:
        yield from gen
    except _Unreadable as e:
        yield ("b", "unreadable_file", e.line, e.reason, 1, None)


def iter_chunks(sources: list[Source], txt_mode: str, text_key: str, max_doc_bytes: int,
                chunk_bytes: int, chunk_docs: int):
    """Yield (src_id, payload_kind, items, bad, progress_bytes); items = [(line, payload, piece)]."""
    for sid, src in enumerate(sources):
        size = source_info(src)["size"] if src.fmt == "hf" else os.path.getsize(src.path)
        items, bad, nbytes, done = [], [], 0, 0
        pos = 0
        for ev in records(src, txt_mode, text_key, max_doc_bytes):
            if ev[0] == "r":
                items.append(ev[1:4])
                p = ev[2]
                nbytes += len(p) if isinstance(p, (bytes, str)) else 16
            else:
                bad.append(ev[1:5])
            if ev[-1] is not None:
                pos = ev[-1]
            if len(items) >= chunk_docs or nbytes >= chunk_bytes:
                yield sid, src.payload, items, bad, max(0, pos - done)
                done = max(done, pos)
                items, bad, nbytes = [], [], 0
        yield sid, src.payload, items, bad, max(0, size - done)
