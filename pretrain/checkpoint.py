"""Crash-safe checkpoints: DeepSpeed's shards plus our own JSON state, committed atomically.

Layout of `<checkpoint dir>`:
    step_00000100/          DeepSpeed's files (model states, ZeRO optimizer shards)
        state.json          ours: step, consumed samples, config, data fingerprint, layout
        rng_00000.json      ours, one per rank: python/numpy/torch RNG states
        tokenizer/          ours: the run's copy of the tokenizer files (digests in state.json)
        manifest.json       the commit record: every file above with size and checksum (pretrain.digest)
    latest                  the tag of the newest committed checkpoint

A checkpoint counts only once its manifest exists. `pretrain.checkpoint_writer` writes
it: every rank hashes the files it wrote while writing them, rank 0 gathers the digests,
writes `manifest.json` (temp file + rename) and only then moves `latest`, in the background
while training goes on; older checkpoints are deleted only once a newer one is fsynced. Resume picks the newest checkpoint whose manifest
verifies (`checkpoint.verify`: sizes by default, or full checksums split over the ranks);
anything partial or corrupt is skipped with a warning naming it, and when committed
checkpoints exist but none verifies the run stops instead of starting over. Our files are
JSON: no pickle of our own objects. (DeepSpeed's own shards are pickles: load only trusted runs.)
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain import digest
from pretrain.errors import UserError

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
STATE = "state.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one. `durable`:
    also fsync the file and its directory, so the new file survives a power loss (on a disk that
    just took gigabytes of checkpoint data, an fsync waits for the journal to write them out)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries); an OSError names the path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        e.filename = e.filename or str(path)
        raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- verify / find
VERIFY_MODES = ("sizes", "full")


def read_manifest(tag_dir: Path) -> tuple[dict | None, str | None]:
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        return manifest, None if isinstance(manifest.get("files"), dict) else "manifest.json lists no files"
    except FileNotFoundError:
        return None, "no manifest.json (the save never committed)"
    except (OSError, ValueError, AttributeError) as e:
        return None, f"unreadable manifest.json ({e})"


def check_sizes(tag_dir: Path, files: dict) -> str | None:
    for name, meta in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {meta['size']}"
    return None


def check_hashes(tag_dir: Path, names: list[str], files: dict) -> str | None:
    for name in names:
        if problem := digest.mismatch(tag_dir / name, files[name]):
            return f"{name} {problem}"
    return None


def verify(tag_dir: Path, mode: str = "full") -> str | None:
    """None when `tag_dir` is a complete, intact checkpoint; else the reason it is not.

    mode 'sizes': the manifest exists and every file it lists has its size; 'full': also its checksum.
    """
    manifest, reason = read_manifest(tag_dir)
    if reason:
        return reason
    files = manifest["files"]
    return check_sizes(tag_dir, files) or (check_hashes(tag_dir, sorted(files), files) if mode == "full" else None)


def _tags(ckpt_dir: Path) -> list[Path]:
    return sorted((p for p in ckpt_dir.glob("step_*") if TAG_RE.match(p.name)), reverse=True) \
        if ckpt_dir.is_dir() else []


def _verify_everywhere(tag_dir: Path | None, mode: str) -> str | None:
    """verify() with the checksum work split over the ranks (collective; rank 0's `tag_dir` counts)."""
    reason = None
    if dist.get_rank() == 0 and tag_dir is not None:
        reason = verify(tag_dir, "sizes")
    tag_dir, reason = broadcast_from_rank0((tag_dir, reason))
    if reason or mode != "full" or tag_dir is None:
        return reason
    files = read_manifest(tag_dir)[0]["files"]
    names = sorted(files, key=lambda n: -files[n]["size"])[dist.get_rank()::dist.get_world_size()]
    mine = [check_hashes(tag_dir, names, files)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine[0])
    return next((r for r in everyone if r), None)


def read_state(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / STATE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{tag_dir / STATE}: cannot read checkpoint state ({e}); "
                        "point checkpoint.resume at a directory written by pretrain-train") from None


def prune(ckpt_dir: Path, keep_last: int) -> None:
    committed = sorted(p for p in _tags(ckpt_dir) if (p / MANIFEST).exists())
    for old in committed[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- load
def load(engine, tag_dir: Path) -> dict:
    """Load weights and optimizer state of `tag_dir` into `engine`; returns our state."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    return finish_load(load_path, tag_dir)


def finish_load(load_path, tag_dir: Path, rng: bool = True) -> dict:
    """After DeepSpeed's load_checkpoint returned `load_path`: this rank's RNG state, our state.

    Ranks beyond the saved world (a resharded resume) keep their seeded RNG.
    """
    if load_path is None:
        raise UserError(f"{tag_dir}: DeepSpeed could not load this checkpoint; "
                        "set checkpoint.resume=none to start fresh")
    rng_file = tag_dir / f"rng_{dist.get_rank():05d}.json"
    if rng and rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    return read_state(tag_dir)


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def choose_resume(resume: str, ckpt_dir: Path, log, mode: str = "sizes") -> Path | None:
    """The checkpoint to resume from, the same on every rank (collective).

    'auto': the newest that verifies (`mode`: sizes or full, the hashing split over the ranks).
    When committed checkpoints exist but none verifies, stop with an error rather than
    start again from step 0; only uncommitted saves (killed before their first commit) are
    left for a fresh start.
    """
    if resume == "none":
        return None
    if resume != "auto":
        tag_dir = Path(resume)
        exists = broadcast_from_rank0(tag_dir.is_dir() if dist.get_rank() == 0 else None)
        reason = _verify_everywhere(tag_dir, mode) if exists else "no such directory"
        if reason:
            raise UserError(f"checkpoint.resume={resume}: {reason}; use checkpoint.resume=auto or a committed "
                            "step_* directory")
        return tag_dir
    tags = broadcast_from_rank0(_tags(ckpt_dir) if dist.get_rank() == 0 else None)
    skipped = []
    for tag_dir in tags:
        reason = _verify_everywhere(tag_dir, mode)
        if reason is None:
            if dist.get_rank() == 0:
                _repair_latest(ckpt_dir, tag_dir)
            return tag_dir
        skipped.append(f"{tag_dir.name}: {reason}")
        log(f"warning: skipping checkpoint {tag_dir}: {reason}")
    committed = [t for t in tags if (t / MANIFEST).exists()] or (ckpt_dir / "latest").is_file()
    if committed:
        raise UserError(f"{ckpt_dir}: no checkpoint verifies ({'; '.join(skipped)}); restore the files, point "
                        "checkpoint.resume at a good step_* directory, or set checkpoint.resume=none to start "
                        "over from step 0 (the bad checkpoints are then overwritten)")
    return None


def _repair_latest(ckpt_dir: Path, tag_dir: Path) -> None:
    """A save killed between its manifest (the commit) and moving `latest` left `latest` one
    checkpoint behind: point it at the newer committed checkpoint the run resumes from, so that
    tools reading `latest` (export, generate) see it even if nothing more is saved."""
    latest = ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.is_file() else ""
    if named != tag_dir.name and (not named or named < tag_dir.name):
        write_atomic(latest, tag_dir.name + "\n")


def resolve_tag_dir(path: str, mode: str = "full") -> Path:
    """A committed checkpoint from a run directory, a checkpoint directory, or a step_* directory."""
    p = Path(path)
    for latest in (p / "checkpoints" / "latest", p / "latest"):
        if latest.is_file():
            p = latest.parent / latest.read_text().strip()
            break
    if not (p / STATE).is_file():
        raise UserError(f"{path}: no checkpoint here (expected a run directory, its checkpoints/ "
                        "directory, or a step_* directory with state.json)")
    reason = verify(p, mode)
    if reason is not None:
        raise UserError(f"{p}: {reason}; pick another step_* directory")
    return p


def tokenizer_dir(tag_dir: Path, state: dict) -> str | None:
    """The tokenizer of a checkpoint: its own copy (`tokenizer/`, checked against state.json's
    digests), else the data directory older checkpoints recorded; None when it has none."""
    own = Path(tag_dir) / "tokenizer"
    record = state.get("tokenizer") or {}
    if own.is_dir() and record.get("files"):
        for name, sha in record["files"].items():
            if not (own / name).is_file() or digest.file_digest(own / name, "sha256") != sha:
                raise UserError(f"{own / name}: missing or fails its sha256 check (state.json); the checkpoint's "
                                "tokenizer copy is damaged: pass --tokenizer SPEC")
        return str(own)
    old = state.get("tokenizer_dir")
    return old if old and (Path(old) / "manifest.json").is_file() else None

