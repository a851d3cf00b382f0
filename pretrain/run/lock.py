"""One trainer per run directory: an exclusive `flock` on `.pretrain.lock` in `train.out_dir`
and in the checkpoint directory, taken by rank 0 before the run writes anything.

A second trainer on either directory stops with one line naming the holder (host, pid,
start time, read from the lock file). The kernel drops an `flock` when its holder dies, so
a killed run never blocks its own resume; the lock file itself stays and is harmless.

File systems: on NFS, Linux turns `flock` into NFS byte-range locks served by the lock
manager, which hold between hosts unless the mount says `nolock` (the kernel's documented
behaviour; the tests use a local file system). Where the file system refuses locks
(ENOLCK, EOPNOTSUPP: some FUSE and object-store mounts), the run goes on with a warning:
nothing then stops two trainers on one directory.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable

from pretrain.errors import UserError

LOCK_NAME = ".pretrain.lock"


def _holder(path: Path, wait: float = 1.0) -> str:
    """The holder's line; a holder that has just taken the lock writes it a moment later, so an
    empty file is read again for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text or time.monotonic() >= deadline:
            return text or "holder unknown: it has not written its name yet"
        time.sleep(0.02)


def lock_dir(d: Path, what: str, warn: Callable[[str], None]):
    """The open, locked file of directory `d` (keep it open for the whole run), or None when
    the file system does not support locks. UserError when another process holds it."""
    path = d / LOCK_NAME
    fh = open(path, "a+")  # not "w": truncating before the lock is ours would erase the holder's name
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            fh.close()
            raise UserError(f"{what} {d} is in use by another trainer ({_holder(path)}); wait for it to end "
                            f"or stop it, or choose another {what}") from None
        fh.close()
        warn(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second trainer on {d}")
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"host {socket.gethostname()}, pid {os.getpid()}, started "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}\n")
    fh.flush()
    return fh


def lock_run(out_dir: Path, ckpt_dir: Path, warn: Callable[[str], None]) -> list:
    """Lock the output directory and the checkpoint directory (both must exist; one lock when
    they are the same). The returned handles hold the locks until closed or process exit."""
    held = []
    try:
        for d, what in ((out_dir, "train.out_dir"), (ckpt_dir, "checkpoint.dir")):
            if any(os.path.samefile(d, h_dir) for h_dir, _ in held):
                continue
            fh = lock_dir(d, what, warn)
            held.append((d, fh))
    except BaseException:
        for _, fh in held:
            if fh:
                fh.close()
        raise
    return [fh for _, fh in held if fh]
