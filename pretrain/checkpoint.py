"""Crash-safe checkpoints: DeepSpeed's shards plus our own JSON state, committed atomically.

Layout of `<checkpoint dir>`:
    step_00000100/          DeepSpeed's files (model states, ZeRO optimizer shards)
        state.json          ours: step, consumed samples, config, data fingerprint, layout
        rng_00000.json      ours, one per rank: python/numpy/torch RNG states
        manifest.json       the commit record: every file above with size and sha256
    latest                  the tag of the newest committed checkpoint

DeepSpeed writes shards in place and is not atomic, so a checkpoint counts only once
its manifest exists: after every rank has written and a barrier, rank 0 hashes the
files, writes `manifest.json` (temp file + fsync + rename) and only then moves
`latest`. Resume picks the newest checkpoint whose manifest verifies; anything
partial or corrupt is skipped with a warning naming it. Our files are JSON: no pickle
of our own objects. (DeepSpeed's own shards are pickles: load only trusted runs.)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain import faults
from pretrain.errors import UserError

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
STATE = "state.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
def verify(tag_dir: Path) -> str | None:
    """None when `tag_dir` is a complete, intact checkpoint; else the reason it is not."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest.json (the save never committed)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    for name, meta in manifest.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, manifest says {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{name} fails its sha256 check"
    return None


def find_resumable(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under `ckpt_dir` that verifies, and a warning per one skipped."""
    warnings = []
    tags = sorted((p for p in ckpt_dir.glob("step_*") if TAG_RE.match(p.name)), reverse=True)
    for tag_dir in tags:
        reason = verify(tag_dir)
        if reason is None:
            return tag_dir, warnings
        warnings.append(f"skipping checkpoint {tag_dir}: {reason}")
    return None, warnings


def read_state(tag_dir: Path) -> dict:
    try:
        return json.loads((tag_dir / STATE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{tag_dir / STATE}: cannot read checkpoint state ({e}); "
                        "point checkpoint.resume at a directory written by pretrain-train") from None


# ----------------------------------------------------------------------------- save / load
def save(engine, ckpt_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Save and commit the checkpoint of `step` (collective: every rank calls it)."""
    rank = dist.get_rank()
    tag_dir = ckpt_dir / tag_for(step)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists() and verify(tag_dir) is not None:
            shutil.rmtree(tag_dir)  # a partial save of this step from a killed run
    already = broadcast_from_rank0(tag_dir.exists() and (tag_dir / MANIFEST).exists())
    if already:  # e.g. the final save right after a periodic one
        return tag_dir
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, save_latest=False)
    write_atomic(tag_dir / f"rng_{rank:05d}.json", json.dumps(rng_state()))
    if rank == 0:
        write_atomic(tag_dir / STATE, json.dumps(state, indent=1, sort_keys=True))
    dist.barrier()  # every rank's files are on disk before the commit
    faults.kill_if("kill_in_save", step, rank)
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
        write_atomic(tag_dir / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1))
        write_atomic(ckpt_dir / "latest", tag_dir.name + "\n")
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag_dir


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if TAG_RE.match(p.name))
    committed = [p for p in tags if (p / MANIFEST).exists()]
    for old in committed[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine, tag_dir: Path) -> dict:
    """Load weights and optimizer state of `tag_dir` into `engine`; returns our state."""
    load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    return finish_load(load_path, tag_dir)


def finish_load(load_path, tag_dir: Path) -> dict:
    """After DeepSpeed's load_checkpoint returned `load_path`: this rank's RNG state, our state.

    Ranks beyond the saved world (a resharded resume) keep their seeded RNG.
    """
    if load_path is None:
        raise UserError(f"{tag_dir}: DeepSpeed could not load this checkpoint; "
                        "set checkpoint.resume=none to start fresh")
    rng_file = tag_dir / f"rng_{dist.get_rank():05d}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    return read_state(tag_dir)


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def choose_resume(resume: str, ckpt_dir: Path, log) -> Path | None:
    """Rank 0 decides which checkpoint to resume from and tells every rank (collective)."""
    choice = None
    if dist.get_rank() == 0 and resume != "none":
        if resume == "auto":
            choice, warnings = find_resumable(ckpt_dir) if ckpt_dir.is_dir() else (None, [])
            for w in warnings:
                log(f"warning: {w}")
        else:
            tag_dir = Path(resume)
            reason = verify(tag_dir) if tag_dir.is_dir() else "no such directory"
            choice = tag_dir if reason is None else UserError(
                f"checkpoint.resume={resume}: {reason}; use checkpoint.resume=auto or a committed step_* directory")
    choice = broadcast_from_rank0(str(choice) if isinstance(choice, Path) else choice)
    if isinstance(choice, UserError):
        raise choice
    return Path(choice) if choice else None


def resolve_tag_dir(path: str) -> Path:
    """A committed checkpoint from a run directory, a checkpoint directory, or a step_* directory."""
    p = Path(path)
    for latest in (p / "checkpoints" / "latest", p / "latest"):
        if latest.is_file():
            p = latest.parent / latest.read_text().strip()
            break
    if not (p / STATE).is_file():
        raise UserError(f"{path}: no checkpoint here (expected a run directory, its checkpoints/ "
                        "directory, or a step_* directory with state.json)")
    reason = verify(p)
    if reason is not None:
        raise UserError(f"{p}: {reason}; pick another step_* directory")
    return p
