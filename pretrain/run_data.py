"""The data side of a training run: which samples each rank reads, for training and validation.

Wraps `pretrain.data.loader` (shards) or random tokens (`data.synthetic`), opens the
data before the first step so a missing or corrupt shard fails fast, and builds the
sample index on rank 0 first so other ranks reuse its cache instead of racing on it.
Rank 0 keeps the run's own copy of the tokenizer in `<train.out_dir>/tokenizer/` (checked
by digest), so checkpoints work after the data or the run directory moved.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config.schema import Config
from pretrain.config.validate import Layout
from pretrain.errors import UserError


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
        elif not Path(p).is_dir() and not Path(str(p) + ".idx").is_file():
            raise UserError(f"data.paths: {p} is neither a directory written by pretrain-prep "
                            "nor a Megatron prefix with a .idx file; fix the path or run pretrain-prep")
    return max(sizes) if sizes else None


TOKENIZER_DIR = "tokenizer"
MANIFEST_KEYS = ("format", "format_version", "tokenizer", "vocab_size", "token_dtype", "eos_id", "bos_id")


def copy_tokenizer(src: str, dest: Path) -> dict:
    """Copy the tokenizer of the data directory `src` into `dest`: its file and a manifest of the
    tokenizer alone (readable by `tokenizer_from_manifest`). Returns {"files": {name: sha256}, ...}."""
    from pretrain.checkpoint import write_atomic
    from pretrain.data.manifest import read_manifest

    m = read_manifest(src)
    tok = m["tokenizer"]
    texts = {"manifest.json": json.dumps({**{k: m[k] for k in MANIFEST_KEYS if k in m}, "splits": {}}, indent=1)}
    files = {}
    dest.mkdir(parents=True, exist_ok=True)
    if tok.get("file"):
        data = (Path(src) / tok["file"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if tok.get("sha256") and tok["sha256"] != digest:
            raise UserError(f"{Path(src) / tok['file']}: fails the sha256 recorded in {src}/manifest.json; "
                            "re-run pretrain-prep")
        if not (dest / tok["file"]).is_file() or (dest / tok["file"]).read_bytes() != data:
            tmp = dest / f".{tok['file']}.tmp"
            tmp.write_bytes(data)
            tmp.replace(dest / tok["file"])
        files[tok["file"]] = digest
    for name, text in texts.items():
        write_atomic(dest / name, text)
        files[name] = hashlib.sha256(text.encode()).hexdigest()
    return {"files": files, "type": tok.get("type"), "spec": tok.get("spec"), "vocab_size": int(m["vocab_size"])}


class SyntheticData:
    """Seeded random tokens: sample i is a pure function of (seed, i), like a real index."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, num_samples: int):
        self.vocab_size, self.seq_len, self.seed, self.num_samples = vocab_size, seq_len, seed, num_samples
        self.fingerprint = f"synthetic-v{vocab_size}-t{seq_len}-s{seed}"
        self.tokenizer_dir = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Sample i, into `out` when given (the loader's micro_batches fills a batch in place)."""
        rng = np.random.default_rng([self.seed, i])
        sample = rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)
        if out is None:
            return sample
        out[:] = sample
        return out


class RunData:
    def __init__(self, cfg: Config, layout: Layout, rank: int, dp_rank: int, out_dir: Path,
                 log: Callable[[str], None]):
        from pretrain.data.loader import open_dataset

        self.cfg, self.layout, self.dp_rank, self.log = cfg, layout, dp_rank, log
        d = cfg.data
        train_samples = cfg.train.max_steps * layout.global_batch_size
        self.valid_samples = cfg.train.eval_steps * layout.micro_batch_size * layout.dp
        cache = d.cache_dir or str(out_dir / "index_cache")
        if d.synthetic:
            self.train = SyntheticData(cfg.model.vocab_size, cfg.model.seq_len, d.seed, train_samples)
            self.valid = SyntheticData(cfg.model.vocab_size, cfg.model.seq_len, d.seed + 1, self.valid_samples)
        else:
            # Rank 0 builds (and caches) the index first; the others then read the cache.
            for turn in (0, 1):
                if (rank == 0) == (turn == 0):
                    self.train = open_dataset(d.paths, d.weights or None, d.train_split, cfg.model.seq_len,
                                              d.seed, train_samples, cache)
                    self.valid = self._open_valid(cache)
                dist.barrier()
        self.fingerprint = self.train.fingerprint
        self.tokenizer_dir = self.train.tokenizer_dir
        # the real vocabulary (rows token ids reach); the embedding is padded beyond it
        self.vocab_size = max(v for v in (None if d.synthetic else self.train.vocab_size, cfg.model.vocab_size, 0) if v is not None)
        self.tokenizer, self.tokenizer_copy = None, None  # the run's copy (rank 0 made it)
        if self.tokenizer_dir:
            self.tokenizer_copy = out_dir / TOKENIZER_DIR
            if rank == 0:
                self.tokenizer = copy_tokenizer(self.tokenizer_dir, self.tokenizer_copy)

    def sources(self) -> dict:
        """What identifies the data, source by source (for messages naming what changed on resume)."""
        d = self.cfg.data
        if d.synthetic:
            return {"synthetic": True, "seed": d.seed}
        ids = {str(Path(s.path).resolve()): hashlib.sha256(json.dumps(s.identity, sort_keys=True).encode())
               .hexdigest()[:16] for s in self.train.sources}
        return {"sources": ids, "weights": [round(float(w), 6) for w in self.train.weights],
                "train_split": d.train_split, "seed": d.seed}

    def _open_valid(self, cache: str):
        from pretrain.data.loader import MissingSplit, open_dataset

        d = self.cfg.data
        try:
            return open_dataset(d.paths, d.weights or None, d.valid_split, self.cfg.model.seq_len,
                                d.seed, self.valid_samples, cache)
        except MissingSplit as e:  # a corrupt validation shard is still an error
            self.log(f"warning: no validation data ({e}); validation is skipped")
            return None

    def train_batches(self, consumed_samples: int) -> Iterator[torch.Tensor]:
        from pretrain.data.loader import micro_batches

        lay = self.layout
        return micro_batches(self.train, lay.micro_batch_size, self.dp_rank, lay.dp, consumed_samples)

    def valid_batches(self) -> Iterator[torch.Tensor] | None:
        """The same first `train.eval_steps` validation micro-batches every time."""
        if self.valid is None:
            return None
        from pretrain.data.loader import micro_batches

        lay = self.layout
        it = micro_batches(self.valid, lay.micro_batch_size, self.dp_rank, lay.dp, 0)
        return (next(it) for _ in range(self.cfg.train.eval_steps))
