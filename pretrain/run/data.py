"""The data side of a training run: which samples each rank reads, for training and validation.

Wraps `pretrain.data.loader` (shards) or random tokens (`data.synthetic`), opens the
data before the first step so a missing or corrupt shard fails fast (checked once, on rank 0,
the verdict shared), and builds the sample index once, into `data.cache_dir` (default
`<train.out_dir>/index_cache`), which every rank then memory-maps.
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

from pretrain.config.schema import Config
from pretrain.config.validate import Layout
from pretrain.errors import UserError


TOKENIZER_DIR = "tokenizer"
MANIFEST_KEYS = ("format", "format_version", "tokenizer", "vocab_size", "token_dtype", "eos_id", "bos_id")


def copy_tokenizer(src: str, dest: Path) -> dict:
    """Copy the tokenizer of the data directory `src` into `dest`: its file and a manifest of the
    tokenizer alone (readable by `tokenizer_from_manifest`). Returns {"files": {name: sha256}, ...}."""
    from pretrain.checkpoint.store import write_atomic
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


def eval_sources(paths: list) -> tuple[list[str], list[str]]:
    """Separate evaluation data is read whole: a pretrain-prep output contributes every split it
    has (one source per split), a Megatron prefix all of it. Returns (paths, one split per path)
    for `open_dataset`."""
    from pretrain.data.manifest import is_manifest_dir, read_manifest

    out_paths, out_splits = [], []
    for p in map(str, paths):
        have = ([k for k, v in read_manifest(p)["splits"].items() if v.get("shards")] if is_manifest_dir(p)
                else ["train"])  # a bare prefix: TokenSource's name for all of it
        out_paths += [p] * len(have)
        out_splits += have
    return out_paths, out_splits


def epoch_report(ds, train_samples: int) -> list[str]:
    """How many epochs of each source the run reads, and a warning when it repeats data."""
    lines = []
    for j, (src, ix) in enumerate(zip(ds.sources, ds.index)):
        if ix is None:  # weight 0
            continue
        reads = train_samples * int(ds.blend.counts[j]) / ds.blend.block
        epochs = reads / ix.per_epoch
        lines.append(f"data: {src.path} ({src.split}): {ix.per_epoch:,} samples of {ds.seq_len} tokens per epoch; "
                     f"this run reads {epochs:.2f} epochs of it")
        if epochs > 1:
            lines.append(f"warning: the run repeats data: {epochs:.1f} epochs of {src.path} (each epoch reshuffled); "
                         f"add data or lower train.max_steps to see each sample at most once")
    return lines


def to_device(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Each batch moved to `device` without the host waiting: on a GPU it is first copied to
    page-locked (pinned) host memory, since a copy from pageable memory (or one without
    non_blocking) blocks the host until the device has drained its queue. The trainer takes the
    batches as they are, and DeepSpeed's pipeline copy (`clone().to(device)`, blocking) finds them
    there. The caching host allocator keeps a pinned block until the copy out of it has
    run, so a batch's buffer can be dropped at once. On CPU the move returns the batch itself."""
    if device.type == "cuda":
        return (b.pin_memory().to(device, non_blocking=True) for b in batches)
    return (b.to(device, non_blocking=True) for b in batches)


class RunData:
    def __init__(self, cfg: Config, layout: Layout, rank: int, dp_rank: int, out_dir: Path,
                 log: Callable[[str], None]):
        from pretrain.data.loader import open_dataset
        from pretrain.data.shared import torch_peers

        self.cfg, self.layout, self.dp_rank, self.log = cfg, layout, dp_rank, log
        d = cfg.data
        train_samples = cfg.train.max_steps * layout.global_batch_size
        self.valid_samples = cfg.train.eval_steps * layout.micro_batch_size * layout.dp
        cache = d.cache_dir or str(out_dir / "index_cache")
        if d.synthetic:
            self.train = SyntheticData(cfg.model.vocab_size, cfg.model.seq_len, d.seed, train_samples)
            self.valid = SyntheticData(cfg.model.vocab_size, cfg.model.seq_len, d.seed + 1, self.valid_samples)
            self.test = None
        else:
            # Every rank opens the data together: rank 0 checks the shards and builds the index
            # into the cache, the others get its verdict and map its files (pretrain.data.shared).
            peers = torch_peers()
            self.train = open_dataset(d.paths, d.weights or None, d.train_split, cfg.model.seq_len,
                                      d.seed, train_samples, cache, peers=peers)
            self.valid = self._open_eval("validation", d.valid_paths, d.valid_split, cache, peers)
            self.test = self._open_eval("test", d.test_paths, d.test_split, cache, peers)
            if rank == 0:
                for line in epoch_report(self.train, train_samples):
                    log(line)
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

    def _open_eval(self, name: str, paths: list, split: str, cache: str, peers):
        """Validation or test data: `paths` when given (data.valid_paths / test_paths), else `split`
        of data.paths in the sources that have it (a warning names those that do not)."""
        from pretrain.data.loader import MissingSplit, open_dataset

        d = self.cfg.data
        common = (self.cfg.model.seq_len, d.seed, self.valid_samples, cache)
        if paths:
            src_paths, splits = eval_sources(paths)
            return open_dataset(src_paths, None, splits, *common, peers=peers)
        try:
            ds = open_dataset(d.paths, d.weights or None, split, *common, missing_split="skip", peers=peers)
        except MissingSplit as e:  # a corrupt shard is still an error
            if name == "validation":
                self.log(f"warning: no validation data ({e}); validation is skipped. Prepare the data with a "
                         f"valid split (pretrain-prep --split) or set data.valid_paths")
            return None
        have = {s.path for s in ds.sources}
        missing = [str(p) for p in d.paths if str(p) not in have]
        if missing:
            self.log(f"warning: {len(missing)} of {len(d.paths)} data sources have no {split!r} split "
                     f"({', '.join(missing)}); {name} uses the other {len(have)}")
        return ds

    def valid_batches(self) -> Iterator[torch.Tensor] | None:
        """The same first `train.eval_steps` validation micro-batches every time."""
        return self._eval_batches(self.valid)

    def test_batches(self) -> Iterator[torch.Tensor] | None:
        """Like valid_batches, from the test data (None without any)."""
        return self._eval_batches(self.test)

    def _eval_batches(self, ds) -> Iterator[torch.Tensor] | None:
        if ds is None:
            return None
        from pretrain.data.loader import micro_batches

        lay = self.layout
        it = micro_batches(ds, lay.micro_batch_size, self.dp_rank, lay.dp, 0, self._in_vocab(
            0, "validation" if ds is self.valid else "test"))
        return (next(it) for _ in range(self.cfg.train.eval_steps))

    def train_batches(self, consumed_samples: int) -> Iterator[torch.Tensor]:
        """This rank's training micro-batches from sample `consumed_samples` on, on this rank's
        device (`to_device`)."""
        from pretrain.data.loader import micro_batches

        lay = self.layout
        batches = micro_batches(self.train, lay.micro_batch_size, self.dp_rank, lay.dp, consumed_samples,
                                self._in_vocab(consumed_samples, "train"))
        return to_device(batches, torch.device("cuda", torch.cuda.current_device()) if lay.device == "cuda"
                         else torch.device("cpu"))

    def _in_vocab(self, consumed: int, split: str):
        """A micro_batches check: UserError at the first batch holding an id outside the vocabulary.
        Structure-only verification (big data, bare prefixes) reads no token ids: an id beyond the
        vocabulary is caught here, before it reaches the embedding (an IndexError, or a device
        assert on GPU). A max over one micro-batch of host memory: microseconds."""
        vocab = self.layout.vocab_size

        def check(batch: np.ndarray, k: int) -> None:
            hi, lo = int(batch.max()), int(batch.min())
            if hi >= vocab or lo < 0:
                bad = hi if hi >= vocab else lo
                raise UserError(f"data.paths: {split} micro-batch {k} of this rank (samples after {consumed}) holds "
                                f"token id {bad}, outside the vocabulary 0..{vocab - 1}; the shards do not fit "
                                "the tokenizer: run `pretrain-shards verify` on them (it checks every id), "
                                "re-run pretrain-prep, or set model.vocab_size for bare Megatron prefixes")

        return check
