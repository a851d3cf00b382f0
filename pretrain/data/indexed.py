"""Megatron indexed dataset (MMIDIDX v1): `.bin` (tokens, no header) + `.idx` (index).

`.idx`, little-endian, no padding (see docs/DATA.md):
    magic b"MMIDIDX\\x00\\x00" | uint64 version=1 | uint8 dtype code | uint64 N | uint64 D+1
    | int32 sizes[N] | int64 pointers[N] | int64 doc_idx[D+1]

`IndexedReader` opens a pair read-only with np.memmap; `check_prefix` validates the
structure (and optionally checksums) and returns a list of problems instead of raising,
so `pretrain-shards verify` can report all of them and the loader can raise one UserError.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Optional

import numpy as np

from pretrain import digest
from pretrain.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 + 8 + 1 + 8 + 8

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v).name: k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the vocabulary is under 65500 (Megatron's rule), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def encode_index(sizes: np.ndarray, dtype: np.dtype, doc_idx: Optional[np.ndarray] = None) -> bytes:
    """The bytes of an `.idx` for sequences of `sizes` tokens (one document per sequence by default)."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence sizes must fit in int32")
    n = int(sizes.size)
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    if doc_idx is None:
        doc_idx = np.arange(n + 1, dtype=np.int64)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    header = MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF[dtype.name], n, int(doc_idx.size))
    return b"".join(
        [header, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(), doc_idx.astype("<i8").tobytes()]
    )


def write_pair(prefix: str, docs: Iterable[np.ndarray], dtype: np.dtype) -> None:
    """Write `prefix.bin/.idx` with one document per sequence (small data, tests and tools)."""
    dtype = np.dtype(dtype)
    sizes = []
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            a = np.asarray(d).astype(dtype.newbyteorder("<"), copy=False)
            f.write(a.tobytes())
            sizes.append(a.size)
    with open(prefix + ".idx", "wb") as f:
        f.write(encode_index(np.asarray(sizes, dtype=np.int64), dtype))


def sha256_file(path: str) -> str:
    return digest.file_digest(path, "sha256")  # shard manifests record sha256


class IndexedReader:
    """Read-only view of one `.bin/.idx` pair. Raises UserError if the header is unusable."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.idx_path = prefix + ".idx"
        self.bin_path = prefix + ".bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise UserError(f"{p}: missing (shard incomplete or deleted)")
        self.idx_bytes = os.path.getsize(self.idx_path)
        self.bin_bytes = os.path.getsize(self.bin_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise UserError(f"{self.idx_path}: truncated index ({len(head)} bytes, header needs {HEADER_SIZE})")
        if head[:9] != MAGIC:
            raise UserError(f"{self.idx_path}: bad magic {head[:9]!r}, not a Megatron MMIDIDX index")
        version, code, n, d1 = struct.unpack("<QBQQ", head[9:])
        if version != VERSION:
            raise UserError(f"{self.idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise UserError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.n = int(n)
        self.num_docs = int(d1) - 1
        want = HEADER_SIZE + 12 * self.n + 8 * int(d1)
        if self.idx_bytes != want:
            raise UserError(
                f"{self.idx_path}: index is {self.idx_bytes} bytes but its header (N={n}, D+1={d1}) needs {want}"
            )
        self.sizes = np.memmap(self.idx_path, dtype="<i4", mode="r", offset=HEADER_SIZE, shape=(self.n,)) \
            if self.n else np.zeros(0, dtype=np.int32)
        self.pointers = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=HEADER_SIZE + 4 * self.n,
                                  shape=(self.n,)) if self.n else np.zeros(0, dtype=np.int64)
        self.doc_idx = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=HEADER_SIZE + 12 * self.n,
                                 shape=(int(d1),)) if d1 else np.zeros(0, dtype=np.int64)
        self._tokens = None
        self._plain = None

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the `.bin` as a flat memmap."""
        if self._tokens is None:
            n_tok = self.bin_bytes // self.dtype.itemsize
            if n_tok == 0:
                self._tokens = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r",
                                         shape=(n_tok,))
        return self._tokens

    def __len__(self) -> int:
        return self.n

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence i, from `offset`, at most `length` of them (a view, not a copy)."""
        if self._plain is None:
            # Plain-ndarray views of the maps: indexing and slicing an np.memmap costs microseconds
            # each (subclass bookkeeping), which was a third of the loader's time per batch.
            self._plain = (self.tokens.view(np.ndarray), np.asarray(self.pointers).view(np.ndarray),
                           np.asarray(self.sizes).view(np.ndarray))
        toks, pointers, sizes = self._plain
        start = int(pointers[i]) // self.dtype.itemsize + offset
        size = int(sizes[i]) - offset
        if length is not None:
            size = min(size, length)
        return toks[start:start + size]

    def structure_problems(self, chunk: int = 1 << 22) -> list[str]:
        """Sizes vs `.bin` length, pointers, doc_idx; [] when consistent. Reads the index in chunks
        of `chunk` entries, so an index of a billion documents needs no int64 copy of it."""
        probs = []
        item = self.dtype.itemsize
        total, negative, bad = 0, False, None  # bad: (sequence, its pointer, expected) of the first wrong pointer
        for a in range(0, self.n, chunk):
            sizes = np.asarray(self.sizes[a:a + chunk], dtype=np.int64)
            negative = negative or bool(sizes.min() < 0)
            if bad is None:
                expect = (total + np.cumsum(sizes) - sizes) * item  # pointer i = bytes before sequence i
                got = np.asarray(self.pointers[a:a + chunk])
                if not np.array_equal(expect, got):
                    i = int(np.argmax(expect != got))
                    bad = (a + i, int(got[i]), int(expect[i]))
            total += int(sizes.sum())
        if negative:
            probs.append(f"{self.idx_path}: negative sequence size")
        if total * item != self.bin_bytes:
            probs.append(
                f"{self.bin_path}: is {self.bin_bytes} bytes but the index says {total * item} "
                f"({'truncated' if self.bin_bytes < total * item else 'trailing data'})"
            )
        if bad is not None:
            probs.append(f"{self.idx_path}: pointer of sequence {bad[0]} is {bad[1]}, expected {bad[2]}")
        di = self.doc_idx
        rising = di.size > 0 and di[0] == 0 and di[-1] == self.n
        for a in range(0, di.size - 1, chunk):
            if not rising:
                break
            rising = not np.any(np.diff(np.asarray(di[a:a + chunk + 1])) < 0)
        if not rising:
            probs.append(f"{self.idx_path}: doc_idx must rise monotonically from 0 to {self.n}")
        return probs

    def total_tokens(self, chunk: int = 1 << 22) -> int:
        """Sum of the sequence sizes, read in chunks."""
        return sum(int(np.sum(self.sizes[a:a + chunk], dtype=np.int64)) for a in range(0, self.n, chunk))

    def max_token(self) -> int:
        t = self.tokens
        if t.size == 0:
            return -1
        m = -1
        step = 1 << 24
        for a in range(0, t.size, step):
            m = max(m, int(np.max(t[a:a + step])))
        return m


def check_prefix(prefix: str, expected: Optional[dict] = None, vocab_size: Optional[int] = None,
                 checksums: bool = True, dtype: Optional[str] = None) -> list[str]:
    """All problems found with one shard ([] = fine).

    expected: the manifest's shard entry (bin_bytes, idx_bytes, bin_sha256, idx_sha256, documents,
    tokens); checksums: also compare sha256 (reads the whole files); vocab_size: every token id must be
    below it (reads the whole `.bin`, done together with checksums).
    """
    try:
        r = IndexedReader(prefix)
    except UserError as e:
        return [str(e)]
    probs = []
    if dtype is not None and r.dtype.name != dtype:
        probs.append(f"{r.idx_path}: token dtype {r.dtype.name}, manifest says {dtype}")
    if expected:
        for key, actual in (("idx_bytes", r.idx_bytes), ("bin_bytes", r.bin_bytes), ("documents", r.n)):
            if key in expected and int(expected[key]) != actual:
                probs.append(f"{prefix}: {key} is {actual}, manifest says {expected[key]}")
    probs += r.structure_problems()
    if probs:
        return probs
    if expected and "tokens" in expected and r.total_tokens() != int(expected["tokens"]):
        probs.append(f"{prefix}: token count differs from the manifest")
    if checksums:
        if expected:
            for key, path in (("idx_sha256", r.idx_path), ("bin_sha256", r.bin_path)):
                if key in expected and sha256_file(path) != expected[key]:
                    probs.append(f"{path}: sha256 mismatch (file modified or corrupt)")
        if vocab_size is not None:
            m = r.max_token()
            if m >= vocab_size:
                probs.append(f"{r.bin_path}: token id {m} >= vocabulary size {vocab_size}")
    return probs
