"""Index arrays built once and memory-mapped read-only by every rank (Megatron's index cache).

An artifact is a directory of `.npy` files (document sizes of a source, or one epoch of its
sample index). It is published by renaming a complete temporary directory into place, so a
reader sees all of it or nothing, and is read with `np.load(mmap_mode="r")`: every rank on a
host shares the same page-cache pages, so no rank holds a private O(documents) or O(samples) copy.

Who builds: `open_dataset` lets rank 0 go first (`Peers`), so on a shared cache directory the
other ranks only map what it wrote. A process that still finds an artifact missing (a node-local
cache directory, or processes not in one process group) builds it holding an `flock` on
`<artifact>.lock`: processes racing on one directory build it once, one per node when the
directory is node-local. Where the file system refuses locks, racers may build twice; the rename
keeps one copy and both are identical.

Integrity: the builder records a blake2b digest of each file (`digest.json`, written before the
rename). The process that does the shared work (rank 0: `verify`) checks every file against it
when it maps an artifact it did not just build, streaming through the map (time O(size), no
private copy); a mismatch is a damaged artifact, rebuilt with a warning. The other ranks map
what rank 0 checked.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Peers:
    """The processes that open the same data together. Rank 0 does the shared work (shard checks,
    index builds); `share` hands its result to every rank and is also the barrier."""
    rank: int = 0
    size: int = 1

    def share(self, value):
        """Rank 0's `value` on every rank (collective: every rank must call it)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        obj = [value]
        dist.broadcast_object_list(obj, src=0)
        return obj[0]


def torch_peers() -> Peers:
    """Every rank of torch.distributed's default group when it is initialised, else this process alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Peers(dist.get_rank(), dist.get_world_size())
    return Peers()


DIGEST = "digest.json"


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def _try_map(path: str, names: tuple[str, ...], valid: Callable[[Arrays], bool],
             verify: bool = False) -> tuple[Optional[Arrays], str]:
    """(the mapped arrays, "") or (None, why not): "" when absent, else what is damaged. `verify`:
    also check every file against the builder's digests."""
    if not os.path.isdir(path):
        return None, ""
    try:
        got = {n: np.load(os.path.join(path, n + ".npy"), mmap_mode="r", allow_pickle=False) for n in names}
        if verify:
            with open(os.path.join(path, DIGEST)) as f:
                want = json.load(f)
            bad = [n for n in names if want.get(n) != _file_digest(os.path.join(path, n + ".npy"))]
            if bad:
                return None, f"{', '.join(n + '.npy' for n in bad)} differ from {DIGEST}"
    except (OSError, ValueError, EOFError) as e:
        return None, f"{type(e).__name__}: {e}"
    if not valid(got):
        return None, "arrays of the wrong size"
    return got, ""


@contextmanager
def _locked(path: str):
    """Hold an exclusive flock on `path` (created if need be); yields whether it is held (False
    where the file system refuses locks: then just go on)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
        except OSError:
            held = False
        yield held
    finally:
        os.close(fd)  # closing drops the lock


def _save(tmp: str, arrays: Arrays) -> None:
    os.makedirs(tmp)
    digests = {}
    for name, a in arrays.items():
        path = os.path.join(tmp, name + ".npy")
        with open(path, "wb") as f:
            np.save(f, a, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())  # a renamed-in artifact must not turn into zeros after a crash
        digests[name] = _file_digest(path)
    with open(os.path.join(tmp, DIGEST), "w") as f:
        json.dump(digests, f)
        f.flush()
        os.fsync(f.fileno())


def load_or_build(path: str, names: tuple[str, ...], build: Callable[[], Arrays],
                  valid: Callable[[Arrays], bool], what: str, verify: bool = True) -> tuple[Arrays, bool]:
    """The arrays `names` of artifact directory `path`, memory-mapped; built by `build()` and
    published first when missing or damaged (`verify`: files checked against their digests).
    Returns (arrays, whether this call built them).

    When the cache cannot be written, warns once and returns the built arrays in private memory.
    """
    got, damage = _try_map(path, names, valid, verify)
    if got is not None:
        return got, False
    tag = f"{socket.gethostname()}-{os.getpid()}"
    arrays = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _locked(path + ".lock") as held:
            got, damage = _try_map(path, names, valid, verify)  # another process may have built it meanwhile
            if got is not None:
                return got, False
            if held:  # no one else is building: what temporary directories remain are of killed builders
                for old in glob.glob(glob.escape(path) + ".tmp-*"):
                    shutil.rmtree(old, ignore_errors=True)
            if damage:
                print(f"warning: damaged sample-index cache {path} ({damage}); rebuilding it",
                      file=sys.stderr, flush=True)
                aside = f"{path}.damaged-{tag}"
                os.rename(path, aside)  # ranks that mapped it keep their (unlinked) pages
                shutil.rmtree(aside, ignore_errors=True)
            arrays = build()
            tmp = f"{path}.tmp-{tag}"
            shutil.rmtree(tmp, ignore_errors=True)  # a killed process with this pid may have left it
            _save(tmp, arrays)
            try:
                os.rename(tmp, path)
            except OSError:  # a racer without a working lock published first: same content
                shutil.rmtree(tmp, ignore_errors=True)
            arrays = None  # drop the private copy before mapping the published one
            got, damage = _try_map(path, names, valid)
            if got is None:
                raise OSError(f"{path}: unreadable right after writing it ({damage or 'missing'})")
            return got, True
    except OSError as e:
        print(f"warning: cannot use the sample-index cache for {what} at {path} ({type(e).__name__}: {e}); "
              f"every rank keeps its own copy in memory: set data.cache_dir to a writable directory",
              file=sys.stderr, flush=True)
        return (arrays if arrays is not None else build()), True
