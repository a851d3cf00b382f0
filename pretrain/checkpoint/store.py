"""Crash-safe checkpoints: DeepSpeed's shards plus our own JSON state, committed atomically.

Layout of `<checkpoint dir>`:
    step_00000100/          DeepSpeed's files (model states, ZeRO optimizer shards)
        state.json          ours: step, consumed samples, config, data fingerprint, layout
        rng_00000.json      ours, one per rank: python/numpy/torch RNG states
        tokenizer/          ours: the run's copy of the tokenizer files (digests in state.json)
        manifest.json       the commit record: every file above with size and checksum (pretrain.digest)
    latest                  the tag of the newest committed checkpoint

A checkpoint counts only once its manifest exists. `pretrain.checkpoint.writer` writes
it: every rank hashes the files it wrote while writing them, rank 0 gathers the digests,
writes `manifest.json` (temp file + rename) and only then moves `latest`, in the background
while training goes on; older checkpoints are deleted only once a newer one is fsynced.

Resume takes the newest checkpoint that verifies and loads (`choose_resume`): every file the
manifest lists is checked (`pretrain.checkpoint.read`: its digest with `checkpoint.verify: full`,
the default, and its structure), the files split over the ranks, and then loaded; a checkpoint
that is partial, fails a check on any rank, or fails to load is skipped with a warning naming
the file, and when committed checkpoints exist but none verifies the run stops instead of
starting over. Our files are JSON: no pickle of our own objects. (DeepSpeed's own shards are
pickles: load only trusted runs.)
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
from pretrain.checkpoint.read import Unreadable, engine_load, file_problem, hashing_reads  # noqa: F401 (engine_load: re-exported)
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
VERIFY_MODES = ("full", "sizes")


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


def check_files(tag_dir: Path, names: list[str], files: dict, mode: str, later: bool = False) -> str | None:
    """The first problem of files `names` (digest with mode 'full', structure always), or None.
    `later`: the digests of `.pt` files are left to the load that follows (HashingReads)."""
    for name in names:
        if problem := file_problem(tag_dir, name, files[name], "structure" if later and _loaded(name) else mode):
            return problem
    return None


def _loaded(name: str) -> bool:
    """The files DeepSpeed's load reads (the rest are ours: JSON, the tokenizer copy, scripts)."""
    return name.endswith(".pt")


def verify(tag_dir: Path, mode: str = "full") -> str | None:
    """None when `tag_dir` is a complete, intact checkpoint; else the reason it is not.

    mode 'sizes': the manifest exists and every file it lists has its size and structure
    (pretrain.checkpoint.read); 'full': also its checksum.
    """
    manifest, reason = read_manifest(tag_dir)
    if reason:
        return reason
    files = manifest["files"]
    return check_sizes(tag_dir, files) or check_files(tag_dir, sorted(files), files, mode)


def _tags(ckpt_dir: Path) -> list[Path]:
    return sorted((p for p in ckpt_dir.glob("step_*") if TAG_RE.match(p.name)), reverse=True) \
        if ckpt_dir.is_dir() else []


def share(files: dict, world: int) -> list[list[str]]:
    """The files split over `world` ranks for checking, largest first to the least loaded rank,
    so the largest share (the time every rank waits for) is as small as this greedy rule makes it."""
    shares, load = [[] for _ in range(world)], [0] * world
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = load.index(min(load))
        shares[r].append(name)
        load[r] += files[name]["size"]
    return shares


def agree(reason: str | None) -> str | None:
    """The first rank's problem, on every rank (collective): one rank's verdict counts for all."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, reason)
    return next((r for r in everyone if r), None)


def verify_everywhere(tag_dir: Path | None, mode: str, later: bool = False) -> str | None:
    """verify() with the file checks split over the ranks (collective; rank 0's `tag_dir` counts);
    `later`: see check_files."""
    reason = None
    if dist.get_rank() == 0 and tag_dir is not None:
        manifest, reason = read_manifest(tag_dir)
        reason = reason or check_sizes(tag_dir, manifest["files"])
    tag_dir, reason = broadcast_from_rank0((tag_dir, reason))
    if reason or tag_dir is None:
        return reason
    files = read_manifest(tag_dir)[0]["files"]
    mine = share(files, dist.get_world_size())[dist.get_rank()]
    return agree(check_files(tag_dir, mine, files, mode, later))


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
    """Load weights and optimizer state of `tag_dir` into `engine`; returns our state. A file that
    fails to load raises Unreadable naming it."""
    load_path, _ = engine_load(engine, tag_dir, load_optimizer_states=True, load_lr_scheduler_states=False)
    return finish_load(load_path, tag_dir)


def finish_load(load_path, tag_dir: Path, rng: bool = True) -> dict:
    """After DeepSpeed's load_checkpoint returned `load_path`: this rank's RNG state, our state.

    Ranks beyond the saved world (a resharded resume) keep their seeded RNG.
    """
    if load_path is None:
        raise Unreadable(tag_dir, "DeepSpeed found no checkpoint files to load here")
    rng_file = tag_dir / f"rng_{dist.get_rank():05d}.json"
    if rng and rng_file.exists():
        try:
            set_rng_state(json.loads(rng_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise Unreadable(rng_file, f"is not an RNG state ({type(e).__name__}: {e})") from None
    return read_state(tag_dir)


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _problem(tag_dir: Path, mode: str, load) -> str | None:
    """Why `tag_dir` cannot be resumed from, agreed by every rank (collective): a failed check on
    any rank, or a file that fails to load (`load(tag_dir)` raising Unreadable) on any rank.

    With mode 'full' the `.pt` files are hashed as the load reads them (HashingReads); those no
    rank read (another layout's files) are hashed after it, split over the ranks. Nothing is
    trained before every digest has been compared."""
    hashing = mode == "full" and load is not None
    reason = verify_everywhere(tag_dir, mode, later=hashing)
    if reason or load is None:
        return reason
    files = read_manifest(tag_dir)[0]["files"]
    with hashing_reads(tag_dir, files, hashing) as reads:
        try:
            load(tag_dir)
            mine = reads.problem()
        except Unreadable as e:
            mine = str(e)
    reason = agree(mine)
    if reason or not hashing:
        return reason
    read = [None] * dist.get_world_size()
    dist.all_gather_object(read, sorted(reads.checked))
    unread = {n: e for n, e in files.items() if _loaded(n) and not any(n in r for r in read)}
    return agree(check_files(tag_dir, share(unread, dist.get_world_size())[dist.get_rank()], files, "full"))


def choose_resume(resume: str, ckpt_dir: Path, log, mode: str = "full", load=None) -> Path | None:
    """The checkpoint resumed from, the same on every rank (collective); `load(tag_dir)` loads it.

    'auto': the newest that verifies (`mode`: full or sizes, the checks split over the ranks) and
    loads; a checkpoint that does not is skipped with a warning, and the next older one is tried
    (its load replaces everything a failed load left behind). When committed checkpoints exist
    but none is usable, stop with an error rather than start again from step 0; only uncommitted
    saves (killed before their first commit) are left for a fresh start.
    """
    if resume == "none":
        return None
    if resume != "auto":
        tag_dir = Path(resume)
        exists = broadcast_from_rank0(tag_dir.is_dir() if dist.get_rank() == 0 else None)
        reason = _problem(tag_dir, mode, load) if exists else "no such directory"
        if reason:
            raise UserError(f"checkpoint.resume={resume}: {reason}; use checkpoint.resume=auto or a committed "
                            "step_* directory")
        return tag_dir
    tags = broadcast_from_rank0(_tags(ckpt_dir) if dist.get_rank() == 0 else None)
    skipped = []
    for tag_dir in tags:
        reason = _problem(tag_dir, mode, load)
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


def resolve_tag_dir(path: str, mode: str = "full", split: bool = False) -> Path:
    """A committed checkpoint from a run directory, a checkpoint directory, or a step_* directory,
    verified (`mode`); `split`: the checks split over the ranks (collective)."""
    p = Path(path)
    for latest in (p / "checkpoints" / "latest", p / "latest"):
        if latest.is_file():
            p = latest.parent / latest.read_text().strip()
            break
    if not (p / STATE).is_file():
        raise UserError(f"{path}: no checkpoint here (expected a run directory, its checkpoints/ "
                        "directory, or a step_* directory with state.json)")
    reason = verify_everywhere(p, mode) if split else verify(p, mode)
    if reason is not None:
        raise UserError(f"{p}: {reason}; pick another step_* directory, or restore the file "
                        f"from a copy")
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

