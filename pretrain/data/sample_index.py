"""Deterministic sample index over one token source (Megatron style, vectorised numpy).

Epoch e of a source: its documents in a seeded random order form one token stream of T tokens;
sample windows are stream[k*L : k*L + L + 1] for k < (T-1)//L (L = seq_len; consecutive windows
share one token, windows cross document boundaries); the windows are then put in a seeded random
order. Global sample k of the source is window k mod S of epoch k div S (S windows per epoch),
so the index is infinite and does not depend on how many samples are asked for: asking for
more later (e.g. a longer run resumed) never changes the earlier samples.

An epoch's arrays are built on first use in O(D log D + S) (D documents), kept in memory
(the last two epochs) and, with a cache_dir, saved as .npz keyed by a hash of the inputs.
"""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from collections import OrderedDict

import numpy as np

from pretrain.errors import UserError

INDEX_VERSION = 1


class SampleIndex:
    def __init__(self, sizes: np.ndarray, seq_len: int, seed: int, identity: str, cache_dir: str | None = None,
                 name: str = "source"):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.total = int(self.sizes.sum())
        self.per_epoch = (self.total - 1) // self.seq_len if self.total > 0 else 0
        if self.per_epoch < 1:
            raise UserError(f"{name}: only {self.total} tokens, fewer than seq_len + 1 = {self.seq_len + 1}")
        self.key = hashlib.sha256(f"{INDEX_VERSION}|{identity}|{self.seq_len}|{self.seed}".encode()).hexdigest()
        self._salt = int(self.key[:8], 16)
        self.cache_dir = os.path.join(cache_dir, "sample_index", self.key[:24]) if cache_dir else None
        self._epochs: "OrderedDict[int, tuple]" = OrderedDict()

    def _build(self, e: int):
        rng = np.random.default_rng([self.seed, self._salt, e])
        n = self.sizes.size
        order = rng.permutation(n)
        ends = np.cumsum(self.sizes[order])
        starts = np.arange(self.per_epoch, dtype=np.int64) * self.seq_len
        pos = np.searchsorted(ends, starts, side="right")
        off = starts - (ends[pos] - self.sizes[order[pos]])
        perm = rng.permutation(self.per_epoch)
        idx_dtype = np.int32 if n < 2**31 else np.int64
        win_dtype = np.int32 if self.per_epoch < 2**31 else np.int64
        return (order.astype(idx_dtype), pos[perm].astype(idx_dtype), off[perm].astype(np.int64),
                perm.astype(win_dtype))

    def epoch(self, e: int):
        """(document order, window's first document position, offset in it, window number) of epoch e."""
        got = self._epochs.get(e)
        if got is not None:
            self._epochs.move_to_end(e)
            return got
        got = None
        path = os.path.join(self.cache_dir, f"epoch_{e:06d}.npz") if self.cache_dir else None
        if path and os.path.isfile(path):
            try:
                with np.load(path) as z:
                    got = (z["order"], z["pos"], z["off"], z["win"])
                if got[1].size != self.per_epoch or got[0].size != self.sizes.size:
                    got = None
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                print(f"warning: damaged sample-index cache {path} ({type(err).__name__}: {err}); rebuilding it",
                      file=sys.stderr, flush=True)
                got = None
        if got is None:
            got = self._build(e)
            if path:
                try:
                    os.makedirs(self.cache_dir, exist_ok=True)
                    tmp = f"{path}.{os.getpid()}.tmp.npz"
                    np.savez(tmp, order=got[0], pos=got[1], off=got[2], win=got[3])
                    os.replace(tmp, path)
                except OSError:
                    pass  # caching is an optimisation only
        self._epochs[e] = got
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return got

    def locate(self, k: int) -> tuple[int, int, int, int]:
        """(epoch, position in the epoch's document order, offset, window start in the epoch stream)."""
        e, j = divmod(int(k), self.per_epoch)
        order, pos, off, win = self.epoch(e)
        return e, int(pos[j]), int(off[j]), int(win[j]) * self.seq_len
