"""File checksums: the one place that says how a file's digest is computed and checked.

A manifest entry is `{"size": n, ALGO: hexdigest}`: the key names the algorithm, so entries
written with an older default still verify.

- Checkpoints (and the converted copies of pretrain-convert) record xxh3_128 (the `xxhash`
  package): a 128-bit checksum made to detect corruption and truncation, not tampering, several
  times faster than sha256 on one core, so hashing ~100 GB of checkpoint costs little next to
  writing it (docs/PERFORMANCE.md, Checkpoint saves). Checkpoints from before record sha256.
- Data shards and tokenizer files record sha256 (their manifests and fingerprints name it).
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import xxhash

CHECKPOINT = "xxh3_128"
ALGORITHMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
CHUNK = 1 << 22


def new(algo: str = CHECKPOINT):
    """A hasher with `update(bytes)` and `hexdigest()`; xxhash and hashlib both release the GIL on
    large blocks, so a helper thread can hash while another writes."""
    return ALGORITHMS[algo]()


WINDOW = 1 << 26  # mapped at a time: a mapped page read counts in the process's memory until unmapped


def file_digest(path: str | Path, algo: str = CHECKPOINT) -> str:
    """The digest of a file's bytes, read through read-only mappings of WINDOW bytes at a time:
    the hasher reads the page cache itself, with no copy into a buffer first (docs/PERFORMANCE.md,
    Checkpoint loads), and the process holds one window of it, not the file."""
    h = new(algo)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, WINDOW):
            n = min(WINDOW, size - start)
            with mmap.mmap(f.fileno(), n, offset=start, access=mmap.ACCESS_READ) as m:
                m.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(m)
                try:
                    for i in range(0, n, CHUNK):
                        h.update(view[i:i + CHUNK])
                finally:
                    view.release()
    return h.hexdigest()


def bytes_entry(data: bytes, algo: str = CHECKPOINT) -> dict:
    """The manifest entry of a file whose bytes are `data`."""
    h = new(algo)
    h.update(data)
    return {"size": len(data), algo: h.hexdigest()}


def file_entry(path: Path, algo: str = CHECKPOINT) -> dict:
    return {"size": Path(path).stat().st_size, algo: file_digest(path, algo)}


def algorithm_of(entry: dict) -> str | None:
    """Which algorithm a manifest entry records (None: a size only)."""
    return next((a for a in ALGORITHMS if a in entry), None)


def mismatch(path: Path, entry: dict) -> str | None:
    """None when `path`'s digest equals the one `entry` records; else what failed, e.g.
    'fails its xxh3_128 check'. An entry without a digest has nothing to check."""
    algo = algorithm_of(entry)
    if algo is None or file_digest(path, algo) == entry[algo]:
        return None
    return f"fails its {algo} check"
