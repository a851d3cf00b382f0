"""Initial weights from an `import-hf` directory: written here, loaded by the trainer.

    <run>/init/model.safetensors   our parameter names (plain GPT), fp32; embedding rows =
                                   the imported model's vocabulary (unpadded)
    <run>/init/init.json           what it is: architecture, model section, vocabulary rows,
                                   bos/eos ids, the source and its config, checksums of the
                                   weights (of the file and of each 64 MiB of it)
    <run>/init/tokenizer*.json     the imported model's tokenizer files, if it had any

`checkpoint.init_from: <run>/init` makes the trainer build its model (plain, tensor-parallel,
a pipeline stage, ZeRO-3 partitions) from `init_source`'s tensors instead of random initial
values: each rank reads only the blocks of each that its piece holds (`WeightsSource.read_block`,
`pretrain.parallel.spec`), and checks its share of the file's chunks against init.json. The
vocabulary rows are zero-padded to the run's padded vocabulary. A checkpoint being resumed is
loaded afterwards and wins. Only JSON and safetensors are read: nothing is unpickled.
(`checkpoint_source`: the same for one of our checkpoints, continued pretraining.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.config.schema import SHAPE_KEYS
from pretrain.errors import UserError
from pretrain.interop import names
from pretrain.interop.stored import Files, Loaded, SafetensorsEntry, Stored, fill_piece, layer_key
from pretrain.model.params import matrix_shape

META = "init.json"
WEIGHTS = "model.safetensors"
FORMAT = "pretrain-init"


def init_dir_of(path) -> Path:
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if (p / "init" / META).is_file() and not (p / META).is_file():
        p = p / "init"  # the run directory import-hf wrote
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise UserError(f"{path}: not an init directory written by `pretrain-convert import-hf` "
                        f"(expected {META} and {WEIGHTS})")
    return p


def _read_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d / META}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{d / META}: not a pretrain init record (format {meta.get('format')!r})")
    return meta


def read_init(path, verify: bool = True) -> tuple[dict, dict]:
    """(init.json, our state dict) of an init directory (or its model.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = init_dir_of(path)
    meta = _read_meta(d)
    if verify and (problem := digest.mismatch(d / WEIGHTS, meta)):
        raise UserError(f"{d / WEIGHTS} {problem} (init.json); re-run pretrain-convert import-hf")
    try:
        sd = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{d / WEIGHTS}: not a readable safetensors file ({e})") from None
    return meta, sd


def write_init(out: Path, sd: dict, meta: dict) -> Path:
    """Write `<out>/model.safetensors` then `<out>/init.json` (last: it is the commit record)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    return commit_init(out, meta)


def commit_init(out: Path, meta: dict) -> Path:
    """Write `<out>/init.json`: `meta` and the checksums of `<out>/model.safetensors` (written before)."""
    meta = {k: v for k, v in meta.items() if k not in (*digest.ALGORITHMS, "size", "chunks")}
    whole, chunks = _digests(out / WEIGHTS)
    meta = {**meta, "format": FORMAT, **whole, "chunks": chunks}
    store.write_atomic(out / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------- checking the weights
# init.json records the digest of model.safetensors and of each CHUNK bytes of it, so that the
# ranks of a run check a chunk each (`verify_weights`) instead of every rank hashing the whole
# file. Read into a buffer, not mapped: a mapped file's pages count in the process's memory.
CHUNK = 64 << 20
_BUFFER = 8 << 20


def _feed(f, n: int, hashers) -> None:
    """Read up to `n` bytes of `f` into every hasher."""
    buf = bytearray(_BUFFER)
    while n > 0 and (k := f.readinto(memoryview(buf)[:min(_BUFFER, n)])):
        for h in hashers:
            h.update(memoryview(buf)[:k])
        n -= k


def _digests(path: Path, algo: str = digest.CHECKPOINT) -> tuple[dict, dict]:
    """({'size', algo: digest of the file}, {'bytes': CHUNK, algo: [digest of each chunk]}), one read."""
    whole, chunks = digest.new(algo), []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for _ in range(0, max(size, 1), CHUNK):
            part = digest.new(algo)
            _feed(f, CHUNK, (whole, part))
            chunks.append(part.hexdigest())
    return {"size": size, algo: whole.hexdigest()}, {"bytes": CHUNK, algo: chunks}


def _range_digest(path: Path, start: int, stop: int, algo: str) -> str:
    h = digest.new(algo)
    with open(path, "rb") as f:
        f.seek(start)
        _feed(f, stop - start, (h,))
    return h.hexdigest()


def verify_weights(d: Path, meta: dict) -> None:
    """model.safetensors of init directory `d` against init.json: with a process group of W ranks
    rank r checks chunks r, r + W, ... and every rank learns every verdict (collective); an
    init.json without chunk digests (older) is checked whole by rank 0. UserError on a mismatch."""
    import torch.distributed as dist

    path = d / WEIGHTS
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    size, chunks = path.stat().st_size, meta.get("chunks") or {}
    algo = digest.algorithm_of(chunks)
    problem = None
    if size != meta.get("size", size):
        problem = f"has {size} bytes, not {meta['size']}"
    elif algo is not None:
        step = int(chunks["bytes"])
        for i in range(rank, len(chunks[algo]), world):
            a, b = i * step, min(size, (i + 1) * step)
            if _range_digest(path, a, b, algo) != chunks[algo][i]:
                problem = f"fails its {algo} check (bytes {a} to {b})"
                break
    elif rank == 0 and (algo := digest.algorithm_of(meta)):
        if _range_digest(path, 0, size, algo) != meta[algo]:
            problem = f"fails its {algo} check"
    if world > 1:
        from pretrain.checkpoint.store import agree

        problem = agree(problem)
    if problem:
        raise UserError(f"{path} {problem} (init.json); re-run pretrain-convert import-hf")


def mismatches(model_cfg: dict, want: dict) -> list[str]:
    """Human lines for each architecture field of the config's model section that differs from `want`
    (a model section derived from the imported model)."""
    out = []
    m = dict(model_cfg)
    for key in (k for k in SHAPE_KEYS if k not in ("n_kv_head", "d_ff")):  # those two: by value below
        if m.get(key) != want.get(key):
            out.append(f"model.{key} is {m.get(key)!r}, the imported model has {want.get(key)!r}")
    if names.n_kv_of(m) != names.n_kv_of(want):
        out.append(f"model.n_kv_head is {m.get('n_kv_head')!r} (= {names.n_kv_of(m)} kv heads), the imported "
                   f"model has {names.n_kv_of(want)}")
    if m.get("mlp") == want.get("mlp") and names.d_ff_of(m) != names.d_ff_of(want):
        out.append(f"model.d_ff is {m.get('d_ff')!r} (= {names.d_ff_of(m)}), the imported model has "
                   f"{names.d_ff_of(want)}")
    if not names.same_float(m.get("norm_eps"), want.get("norm_eps")):
        out.append(f"model.norm_eps is {m.get('norm_eps')!r}, the imported model has {want.get('norm_eps')!r}")
    if want.get("position") == "rope" and m.get("position") == "rope" and \
            not names.same_float(m.get("rope_theta"), want.get("rope_theta")):
        out.append(f"model.rope_theta is {m.get('rope_theta')!r}, the imported model has {want.get('rope_theta')!r}")
    if want.get("position") == "learned" and m.get("position") == "learned" and \
            int(m.get("seq_len")) > int(want.get("seq_len")):
        out.append(f"model.seq_len is {m.get('seq_len')}, the imported model has only {want.get('seq_len')} "
                   "learned positions")
    return out


# ----------------------------------------------------------------------------- loading
def init_source(path, cfg, layout, log=print) -> "WeightsSource":
    """The tensors of an init directory as a model-building source (`WeightsSource`), read from
    its model.safetensors on demand. Checks the weights file against init.json (split over the
    ranks: collective when a process group is up) and the config's model section against it
    (UserError naming each mismatching field)."""
    from dataclasses import asdict

    d = init_dir_of(path)
    meta = _read_meta(d)
    verify_weights(d, meta)
    bad = mismatches(asdict(cfg.model), meta["model"])
    if bad:
        raise UserError(f"checkpoint.init_from={path}: the config does not match the imported model: "
                        + "; ".join(bad))
    padded = layout.padded_vocab_size
    if int(meta["vocab_rows"]) > padded:
        raise UserError(f"checkpoint.init_from={path}: the imported model has {meta['vocab_rows']} vocabulary "
                        f"rows, this run's embedding only {padded}; set model.vocab_size: {meta['vocab_rows']}")
    pad = padded - int(meta["vocab_rows"])
    log(f"initialised from {d} ({meta.get('architecture')}, {meta.get('source')})"
        + (f"; {pad} padding rows of the embedding are zero" if pad else ""))
    files = Files()
    try:
        handle = files.safetensors(d / WEIGHTS)  # the header only
        tensors = {k: SafetensorsEntry(files, d / WEIGHTS, k, handle.get_slice(k).get_shape()) for k in handle.keys()}
    finally:
        files.release()
    return WeightsSource(tensors, padded, f"checkpoint.init_from={path}", files)


def checkpoint_source(tag_dir: Path, padded: int, where: str) -> "WeightsSource":
    """The weights of one of our checkpoints (any layout) as a model-building source, read from
    its files on demand (`ds_reader.stored_weights`): a rank reads only its blocks."""
    from pretrain.interop.ds_reader import stored_weights

    files = Files()
    return WeightsSource(stored_weights(tag_dir, files), padded, where, files)


def weights_source(sd: dict, padded: int, where: str) -> "WeightsSource":
    """A full plain-GPT state dict in memory as a model-building source."""
    return WeightsSource({k: Loaded(v) for k, v in sd.items()}, padded, where)


class WeightsSource:
    """Plain-GPT tensors by name as a model-building source (`spec.Source`): called with
    (plain name, full shape) it returns the full fp32 tensor; `read_piece` (which
    `spec.initialize` calls when a source has it) fills a rank's piece, or a range of it,
    reading only the blocks that hold it (`stored.fill_piece`). Vocabulary rows are cut to, or
    zero-padded to, the run's padded vocabulary; learned positions cut to model.seq_len.

    The files a layer's tensors are read from stay open until a tensor of another layer is
    asked for (a block handed out keeps its own file mapped until it is freed)."""

    def __init__(self, tensors: Mapping[str, Stored], padded: int, where: str, files: Optional[Files] = None):
        self.tensors, self.padded, self.where, self.files = tensors, padded, where, files
        self._layer = None

    def __call__(self, name: str, shape: tuple) -> torch.Tensor:
        rows, cols = matrix_shape(shape)
        return self.read_block(name, shape, (0, rows), (0, cols)).reshape(shape)

    def read_piece(self, name: str, shape: tuple, m, tp: int, tp_rank: int, start: int, out: torch.Tensor) -> None:
        fill_piece(lambda rows, cols: self.read_block(name, shape, rows, cols), name, shape, m, tp, tp_rank,
                   start, out)

    def read_block(self, name: str, shape: tuple, rows: tuple, cols: tuple) -> torch.Tensor:
        """Rows [r0, r1) x columns [c0, c1) of the full tensor `name` seen as a matrix (fp32)."""
        t = self._stored(name, tuple(shape))
        layer = layer_key(name)
        if self.files is not None and layer != self._layer:
            self.files.release()
            self._layer = layer
        (r0, r1), (c0, c1) = rows, cols
        have = min(r1, t.shape[0])  # vocabulary rows beyond the stored ones are zero
        block = t.block((r0, have), cols).float() if have > r0 else torch.zeros(0, c1 - c0)
        if have >= r1:
            return block
        return torch.cat([block, torch.zeros(r1 - max(r0, have), c1 - c0)])

    def _stored(self, name: str, shape: tuple) -> Stored:
        from pretrain.parallel import spec

        if name not in self.tensors:
            raise UserError(f"{self.where}: the init weights lack {name}")
        t = self.tensors[name]
        have = tuple(t.shape)
        if spec.rule_of(name).vocab:
            have = (self.padded, *have[1:])  # cut or zero-padded to the padded vocabulary
        elif name == "embed.wpe.weight" and have[0] > shape[0]:
            have = (shape[0], *have[1:])  # fewer learned positions than the source model has (model.seq_len)
        if have != shape:
            raise UserError(f"{self.where}: {name} has shape {have}, the model expects {shape}")
        return t


def load_init_weights(model: torch.nn.Module, path, cfg, layout, topo=None, log=print) -> None:
    """Copy the init weights into an already built `model` (this rank's plain GPT, ParallelGPT
    or pipeline stage; not ZeRO-3 partitions: the trainer builds from `init_source` instead)."""
    from pretrain.parallel import spec

    source = init_source(path, cfg, layout, log)
    tp_rank = getattr(topo, "tp_rank", 0) if topo is not None else 0
    spec.initialize(model, cfg.model, tp=layout.tp, tp_rank=tp_rank, source=source)
