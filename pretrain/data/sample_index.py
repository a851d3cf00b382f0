"""Deterministic sample index over one token source (Megatron style, vectorised numpy).

Epoch e of a source: its documents in a seeded random order form one token stream of T tokens;
sample windows are stream[k*L : k*L + L + 1] for k < (T-1)//L (L = seq_len; consecutive windows
share one token, windows cross document boundaries); the windows are then put in a seeded random
order. Global sample k of the source is window k mod S of epoch k div S (S windows per epoch),
so the index is infinite and does not depend on how many samples are asked for: asking for
more later (e.g. a longer run resumed) never changes the earlier samples.

An epoch's arrays are built in O(D log D + S) (D documents). With a cache_dir they are built
once (pretrain.data.shared: one builder among racing ranks), saved as .npy files keyed by a hash
of the inputs and memory-mapped read-only, so every rank shares one copy in the page cache;
without one they are built in memory. The last two epochs used are kept open.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import numpy as np

from pretrain.data.shared import Arrays, load_or_build
from pretrain.errors import UserError

INDEX_VERSION = 1
ARRAYS = ("order", "pos", "off", "win")


def total_tokens(sizes: np.ndarray) -> int:
    """Sum of `sizes` in int64 without an int64 copy of them (they may be a large memory map)."""
    return int(np.sum(sizes, dtype=np.int64))


class SampleIndex:
    def __init__(self, sizes: np.ndarray, seq_len: int, seed: int, identity: str, cache_dir: str | None = None,
                 name: str = "source", total: int | None = None, verify: bool = True):
        self.sizes = sizes  # document sizes, as given (a memory map is read, never copied, here)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.name = name
        self.verify = verify  # check cached files against their digests (rank 0; pretrain.data.shared)
        self.total = int(total) if total is not None else total_tokens(sizes)
        self.per_epoch = (self.total - 1) // self.seq_len if self.total > 0 else 0
        if self.per_epoch < 1:
            raise UserError(f"{name}: only {self.total} tokens, fewer than seq_len + 1 = {self.seq_len + 1}")
        self.key = hashlib.sha256(f"{INDEX_VERSION}|{identity}|{self.seq_len}|{self.seed}".encode()).hexdigest()
        self._salt = int(self.key[:8], 16)
        self.cache_dir = os.path.join(cache_dir, "sample_index", self.key[:24]) if cache_dir else None
        self._epochs: "OrderedDict[int, tuple]" = OrderedDict()  # e -> (arrays, plain ndarray views)

    def _build(self, e: int):
        sizes = np.asarray(self.sizes, dtype=np.int64)  # the builder's own copy: O(D), freed after
        rng = np.random.default_rng([self.seed, self._salt, e])
        n = sizes.size
        order = rng.permutation(n)
        ends = np.cumsum(sizes[order])
        starts = np.arange(self.per_epoch, dtype=np.int64) * self.seq_len
        pos = np.searchsorted(ends, starts, side="right")
        off = starts - (ends[pos] - sizes[order[pos]])
        perm = rng.permutation(self.per_epoch)
        idx_dtype = np.int32 if n < 2**31 else np.int64
        win_dtype = np.int32 if self.per_epoch < 2**31 else np.int64
        return (order.astype(idx_dtype), pos[perm].astype(idx_dtype), off[perm].astype(np.int64),
                perm.astype(win_dtype))

    def _valid(self, got: Arrays) -> bool:
        want = {"order": len(self.sizes), "pos": self.per_epoch, "off": self.per_epoch, "win": self.per_epoch}
        return all(got[k].ndim == 1 and got[k].size == n and got[k].dtype.kind == "i" for k, n in want.items())

    def _open(self, e: int) -> tuple:
        if self.cache_dir is None:
            return self._build(e)
        got, _ = load_or_build(os.path.join(self.cache_dir, f"epoch_{e:06d}"), ARRAYS,
                               lambda: dict(zip(ARRAYS, self._build(e))), self._valid,
                               f"{self.name} epoch {e}", self.verify)
        return tuple(got[k] for k in ARRAYS)

    def _entry(self, e: int) -> tuple:
        got = self._epochs.get(e)
        if got is None:
            arrays = self._open(e)
            # Plain-ndarray views of the maps for the per-sample path: indexing an np.memmap costs
            # microseconds of subclass bookkeeping each time.
            got = self._epochs[e] = (arrays, tuple(a.view(np.ndarray) for a in arrays))
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(e)
        return got

    def epoch(self, e: int):
        """(document order, window's first document position, offset in it, window number) of epoch e:
        np.memmap arrays of the cache files with a cache_dir, else arrays in memory."""
        return self._entry(e)[0]

    def views(self, e: int):
        """epoch(e) as plain ndarrays (the same memory): the loader's per-sample reads."""
        return self._entry(e)[1]

    def locate(self, k: int) -> tuple[int, int, int, int]:
        """(epoch, position in the epoch's document order, offset, window start in the epoch stream)."""
        e, j = divmod(int(k), self.per_epoch)
        order, pos, off, win = self.views(e)
        return e, int(pos[j]), int(off[j]), int(win[j]) * self.seq_len
