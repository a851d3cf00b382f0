"""Training data: open shards, blend sources, draw fixed-length samples, slice per data-parallel rank.

    ds = open_dataset(paths, weights, split, seq_len, seed, num_samples, cache_dir)
    it = micro_batches(ds, micro_batch_size, dp_rank, dp_size, consumed_samples)

Sample i of `ds` is a deterministic function of (data, weights, split, seq_len, seed, i) only.
Each micro-step takes the next micro_batch_size * dp_size global samples from consumed_samples,
rank r getting [r*mb, (r+1)*mb) of them; so the consumed-sample count is the whole loader
state, and resuming (also with another data-parallel size) continues exactly. See docs/DATA.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterator, Optional

import numpy as np

from pretrain.data.blend import Blend, normalise_weights
from pretrain.data.indexed import IndexedReader, check_prefix, sha256_file
from pretrain.data.manifest import MissingSplit, is_manifest_dir, read_manifest, split_shards
from pretrain.data.sample_index import SampleIndex
from pretrain.data.shared import Peers, load_or_build
from pretrain.errors import UserError

VERIFY_ENV = "PRETRAIN_DATA_VERIFY"
VERIFY_AUTO_MAX_BYTES = 1 << 30  # 'auto' hashes the shards in full up to this many bytes per dataset


class TokenSource:
    """One source: a split of a manifest directory (its shards in order) or one bare Megatron prefix."""

    def __init__(self, path: str, split: str):
        self.path = path
        self.split = split
        self.vocab_size: Optional[int] = None
        self.tokenizer_dir: Optional[str] = None
        self.tokenizer_sha: Optional[str] = None
        if is_manifest_dir(path):
            m = read_manifest(path)
            shards = split_shards(m, path, split)
            self.vocab_size = int(m["vocab_size"])
            self.tokenizer_sha = m["tokenizer"].get("sha256") or m["tokenizer"].get("spec")
            self.tokenizer_dir = path
            self.entries = shards
            self.prefixes = [os.path.join(path, sh["name"]) for sh in shards]
            self.dtype = m["token_dtype"]
            self.identity = {"manifest": [(sh["name"], sh.get("bin_sha256"), sh.get("idx_sha256")) for sh in shards],
                             "vocab_size": self.vocab_size, "tokenizer": self.tokenizer_sha}
        elif os.path.isfile(path + ".idx") or os.path.isfile(path + ".bin"):
            if split != "train":
                raise MissingSplit(f"{path}: a bare Megatron prefix (no manifest) has no {split!r} split; "
                                f"it is used as training data only")
            self.entries = [None]
            self.prefixes = [path]
            self.dtype = None
            self.identity = None
        elif os.path.isdir(path):
            raise UserError(f"{path}: no manifest.json (not a pretrain-prep output, or an unfinished run: "
                            f"re-run pretrain-prep with the same arguments to complete it)")
        else:
            raise UserError(f"{path}: no such data directory or Megatron prefix (PREFIX.bin/.idx)")

    def check(self, checksums: bool) -> tuple[list[str], Optional[dict]]:
        """Rank 0's part of opening: the problems of every shard (structure always; sha256 and
        token range when `checksums`), and the identity (a bare prefix's is the sha256 of its .idx)."""
        problems = []
        for prefix, entry in zip(self.prefixes, self.entries):
            problems += check_prefix(prefix, expected=entry, vocab_size=self.vocab_size,
                                     checksums=checksums, dtype=self.dtype)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            return ["corrupt or incomplete data: " + "; ".join(problems[:3]) + more +
                    ". Re-run pretrain-prep (or `pretrain-shards verify` to list every problem)"], None
        if self.identity is not None:
            return [], self.identity
        r = IndexedReader(self.prefixes[0])
        return [], {"prefix_idx_sha256": sha256_file(r.idx_path), "bin_bytes": r.bin_bytes}

    def open(self, identity: dict, cache_dir: Optional[str], verify: bool = True) -> None:
        """Every rank's part, after `check` passed on rank 0: the readers (memory maps) and the
        document sizes. One shard's sizes are its `.idx` map; several shards' are concatenated
        once into the cache (pretrain.data.shared) and mapped, or held in memory without a cache."""
        self.identity = identity
        self.readers = [IndexedReader(p) for p in self.prefixes]
        counts = np.array([r.n for r in self.readers], dtype=np.int64)
        self.doc_start = np.concatenate([[0], np.cumsum(counts)])  # per shard: O(shards)
        self.tokens = sum(r.bin_bytes // r.dtype.itemsize for r in self.readers)  # checked: = sum of sizes
        if len(self.readers) == 1:
            self.sizes = self.readers[0].sizes
            return

        def build() -> dict:
            return {"sizes": np.concatenate([r.sizes for r in self.readers])}  # int32, as in the .idx

        if cache_dir is None:
            self.sizes = build()["sizes"]
            return
        key = hashlib.sha256(f"sizes|{json.dumps(identity, sort_keys=True)}".encode()).hexdigest()[:24]
        n = int(self.doc_start[-1])
        got, _ = load_or_build(os.path.join(cache_dir, "documents", key), ("sizes",), build,
                               lambda a: a["sizes"].shape == (n,) and a["sizes"].dtype.kind == "i",
                               f"{self.path} ({self.split}) document sizes", verify)
        self.sizes = got["sizes"]

    def nbytes(self) -> int:
        return sum(os.path.getsize(p + ext) for p in self.prefixes for ext in (".bin", ".idx")
                   if os.path.isfile(p + ext))

    def read(self, d: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of document d (over all shards), from offset, at most length."""
        if len(self.readers) == 1:
            return self.readers[0].get(d, offset, length)
        s = int(np.searchsorted(self.doc_start, d, side="right")) - 1
        return self.readers[s].get(d - int(self.doc_start[s]), offset, length)

    def window(self, order: np.ndarray, p: int, o: int, out: np.ndarray) -> None:
        """Fill `out` with the token stream of documents order[p], order[p+1], ... from offset o in the first."""
        need, filled = out.size, 0
        while filled < need:
            seg = self.read(int(order[p]), o, need - filled)
            out[filled:filled + seg.size] = seg
            filled += seg.size
            p, o = p + 1, 0

    def document(self, d: int) -> np.ndarray:
        return np.array(self.read(d), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.sizes.size)


class BlendedDataset:
    """Samples of seq_len + 1 tokens (int64), blended from several sources; see module docstring."""

    def __init__(self, sources: list[TokenSource], weights: np.ndarray, split: str, seq_len: int, seed: int,
                 num_samples: int, cache_dir: Optional[str], verify: bool = True):
        self.sources = sources
        self.weights = weights
        self.split = split
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.blend = Blend(weights)
        self.index = [SampleIndex(s.sizes, seq_len, seed, json.dumps(s.identity, sort_keys=True), cache_dir,
                                  name=f"{s.path} ({split})", total=s.tokens, verify=verify) if w > 0 else None
                      for s, w in zip(sources, weights)]
        one_epoch = sum(ix.per_epoch for ix in self.index if ix is not None)
        self.num_samples = int(num_samples) if num_samples and num_samples > 0 else one_epoch
        # Build (and cache) now every epoch the num_samples read, at least the first: fail fast,
        # and the other ranks map rank 0's files instead of building an epoch mid-run. Without a
        # cache only the first (epochs are then built on use, the last two kept in memory).
        for ix, n in zip(self.index, self.blend.taken(self.num_samples)):
            if ix is not None:
                for e in range(max(1, -(-int(n) // ix.per_epoch)) if cache_dir else 1):
                    ix.epoch(e)
        vocabs = {s.vocab_size for s in sources if s.vocab_size is not None}
        self.vocab_size: Optional[int] = vocabs.pop() if vocabs else None
        self.tokenizer_dir = next((s.tokenizer_dir for s in sources if s.tokenizer_dir), None)
        ident = {"v": 1, "sources": [s.identity for s in sources], "weights": [round(float(w), 12) for w in weights],
                 "split": split, "seq_len": self.seq_len, "seed": self.seed}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.get(i)

    def locate(self, i: int) -> tuple[int, int, int]:
        """(source number, epoch, window start in that epoch's token stream) of global sample i."""
        s, k = self.blend.map(int(i))
        e, _, _, start = self.index[int(s)].locate(int(k))
        return int(s), e, start

    def get(self, i: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Global sample i (any i >= 0: the data repeats in freshly shuffled epochs), into `out` if given."""
        s, k = self.blend.map(int(i))
        src, ix = self.sources[int(s)], self.index[int(s)]
        e, j = divmod(int(k), ix.per_epoch)
        order, pos, off, _ = ix.views(e)
        if out is None:
            out = np.empty(self.seq_len + 1, dtype=np.int64)
        src.window(order, int(pos[j]), int(off[j]), out)
        return out


def _verify_mode(verify: Optional[str]) -> str:
    mode = (verify or os.environ.get(VERIFY_ENV) or "auto").lower()
    if mode not in ("auto", "full", "structure"):
        raise UserError(f"data verification mode {mode!r} ({VERIFY_ENV}): use auto, full or structure")
    return mode


def open_dataset(paths: list[str], weights: Optional[list[float]], split: str, seq_len: int, seed: int,
                 num_samples: int, cache_dir: Optional[str] = None, verify: Optional[str] = None,
                 missing_split: str = "error", peers: Optional[Peers] = None) -> BlendedDataset:
    """Open, validate and index the data; UserError on any problem (before any training step).

    verify: 'structure' (headers, sizes vs .bin length, pointers, doc_idx), 'full' (also sha256 of
    every file against the manifest and token ids < vocabulary) or 'auto' (default; full when the
    shards total at most 1 GiB, else structure). Env PRETRAIN_DATA_VERIFY sets the default.
    split: one split name for every path, or a list with one per path.
    missing_split: 'error' (a source without `split` is a UserError naming it) or 'skip' (drop such
    sources; UserError only if none has it).
    num_samples <= 0 means one epoch of every source.
    peers: the ranks opening the same data together (collective; pretrain.data.shared.torch_peers()
    for torch.distributed): rank 0 checks the shards and builds the cached index first, the
    others get its verdict and map its files. Default: this process alone.
    """
    peers = peers or Peers()
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("data.paths is empty: give manifest directories (pretrain-prep output) or Megatron prefixes")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
    mode = _verify_mode(verify)
    sources, kept_w = [], []
    for j, p in enumerate(paths):
        try:
            sources.append(TokenSource(str(p), split[j] if isinstance(split, (list, tuple)) else split))
            kept_w.append(j)
        except MissingSplit:
            if missing_split != "skip":
                raise
    if not sources:
        raise MissingSplit(f"no data source has a {split!r} split")
    if weights is not None and len(weights) and len(weights) != len(paths):
        normalise_weights(weights, len(paths), None)  # raises the count mismatch
    w_in = [weights[j] for j in kept_w] if weights is not None and len(weights) else None
    total_bytes = sum(s.nbytes() for s in sources)
    checksums = mode == "full" or (mode == "auto" and total_bytes <= VERIFY_AUTO_MAX_BYTES)
    # Rank 0 checks the shards; every rank gets its verdict (the same error everywhere).
    verdict = _check(sources, checksums) if peers.rank == 0 else None
    error, identities = peers.share(verdict)
    if error:
        raise UserError(error)

    def index() -> BlendedDataset:
        for s, ident in zip(sources, identities):
            s.open(ident, cache_dir, verify=peers.rank == 0)  # rank 0 checks the cache for all
        vocabs = {s.vocab_size for s in sources if s.vocab_size is not None}
        if len(vocabs) > 1:
            raise UserError(f"data sources have different vocabulary sizes {sorted(vocabs)}: "
                            f"blend only data made with the same tokenizer")
        toks = {s.tokenizer_sha for s in sources if s.tokenizer_sha is not None}
        if len(toks) > 1:
            raise UserError("data sources were made with different tokenizers: blend only data made with the same one")
        w = normalise_weights(w_in, len(sources), [max(s.tokens, 0) for s in sources])
        per_path = isinstance(split, (list, tuple))  # one split per path: separate eval data (pretrain.run.data)
        joined = "+".join(s.split for s in sources) if per_path else split
        return BlendedDataset(sources, w, joined, seq_len, seed, num_samples, cache_dir, verify=peers.rank == 0)

    # Rank 0 builds the cached arrays first; the others then map its files (pretrain.data.shared).
    ds, failed = None, None
    if peers.rank == 0:
        try:
            ds = index()
        except UserError as e:
            failed = e
    message = peers.share(str(failed) if failed else None)
    if message:
        raise failed if failed is not None else UserError(message)
    return ds if peers.rank == 0 else index()


def _check(sources: list[TokenSource], checksums: bool) -> tuple[Optional[str], list]:
    """(the first problem as one message, or None; each source's identity): rank 0's verdict."""
    identities = []
    for s in sources:
        try:
            problems, ident = s.check(checksums)
        except (UserError, OSError) as e:
            problems, ident = [f"{s.path}: {e}"], None
        if problems:
            return problems[0], []
        identities.append(ident)
    return None, identities


def micro_batches(ds: BlendedDataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                  consumed_samples: int, check: Optional[Callable[[np.ndarray, int], None]] = None) -> Iterator:
    """Endless micro-batches for one rank: LongTensor (micro_batch_size, seq_len + 1).

    Step t (from 0) covers global samples c + t*G .. c + (t+1)*G - 1 with G = micro_batch_size * dp_size
    and c = consumed_samples; this rank gets [c + t*G + r*mb, c + t*G + (r+1)*mb).
    `check(batch, k)` sees the k-th batch as a numpy array before it becomes a tensor (so a
    check of its ids reads no tensor: no device sync, nothing for the sync probe to count).
    """
    import torch

    for name, v, lo in (("micro_batch_size", micro_batch_size, 1), ("dp_size", dp_size, 1),
                        ("consumed_samples", consumed_samples, 0), ("dp_rank", dp_rank, 0)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")
    if dp_rank >= dp_size:
        raise UserError(f"dp_rank {dp_rank} must be below dp_size {dp_size}")
    mb, g = int(micro_batch_size), int(micro_batch_size) * int(dp_size)

    def gen(c: int):
        k = 0
        while True:
            first = c + int(dp_rank) * mb
            batch = np.empty((mb, ds.seq_len + 1), dtype=np.int64)
            for row, i in enumerate(range(first, first + mb)):
                ds.get(i, batch[row])
            if check is not None:
                check(batch, k)
            yield torch.from_numpy(batch)
            c += g
            k += 1

    return gen(int(consumed_samples))
