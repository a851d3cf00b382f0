"""Deterministic weighted blending of several sources, O(1) per sample.

Samples are assigned in periodic blocks of B = 2**18 global samples. Within a block, source j
gets c_j = round(w_j * B) samples (largest remainder, sum B), spread evenly: its m-th sample of
the block sits at "time" (m + 0.5) / c_j and the block is the merge of all sources by time
(ties by source order). So every prefix of the sample stream is within about one sample per
source of the target ratio, and sample i maps to (source, that source's sample number) by
arithmetic on i, without a per-sample table.
"""
from __future__ import annotations

import numpy as np

from pretrain.errors import UserError

BLOCK = 1 << 18


def normalise_weights(weights, n: int, default) -> np.ndarray:
    if weights is None or len(weights) == 0:
        w = np.asarray(default, dtype=np.float64)
    else:
        if len(weights) != n:
            raise UserError(f"data weights: {len(weights)} weights for {n} paths; give one per path (or none)")
        try:
            w = np.asarray([float(x) for x in weights], dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"data weights must be numbers, got {list(weights)!r}") from None
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError(f"data weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


class Blend:
    def __init__(self, weights: np.ndarray, block: int = BLOCK):
        w = np.asarray(weights, dtype=np.float64)
        self.n = w.size
        if self.n == 1:
            self.counts = np.array([block], dtype=np.int64)
        else:
            raw = w * block
            c = np.floor(raw).astype(np.int64)
            rem = block - int(c.sum())
            order = np.lexsort((np.arange(self.n), -(raw - c)))
            c[order[:rem]] += 1
            for j in np.flatnonzero((w > 0) & (c == 0)):  # a tiny positive weight still gets a sample
                c[j] += 1
                c[int(np.argmax(c))] -= 1
            self.counts = c
        self.block = int(self.counts.sum())
        src = np.repeat(np.arange(self.n), self.counts)
        local = np.concatenate([np.arange(c) for c in self.counts]) if self.n else np.zeros(0, np.int64)
        times = (local + 0.5) / np.maximum(self.counts[src], 1)
        order = np.lexsort((src, times))
        self.src = src[order].astype(np.int32)
        self.local = local[order].astype(np.int64)

    def map(self, i) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number within that source) of global samples i (array or int)."""
        if isinstance(i, int):  # the loader's per-sample call: plain ints, no array round trip
            b, p = divmod(i, self.block)
            s = int(self.src[p])
            return s, b * int(self.counts[s]) + int(self.local[p])
        i = np.asarray(i, dtype=np.int64)
        b, p = np.divmod(i, self.block)
        s = self.src[p]
        return s, b * self.counts[s] + self.local[p]

    def taken(self, n: int) -> np.ndarray:
        """How many samples of each source the first n global samples hold."""
        b, r = divmod(int(n), self.block)
        return b * self.counts + np.bincount(self.src[:r], minlength=self.n)
