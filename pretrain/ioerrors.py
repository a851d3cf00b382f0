"""Known I/O errors (disk full, read-only file system, no permission) as one line naming the
path and what state the output was left in, instead of a traceback. Other OSErrors stay bugs."""
from __future__ import annotations

import errno
import functools
from typing import Callable

from pretrain.errors import UserError

KNOWN = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
         errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
         errno.EPERM: "operation not permitted"}


def os_error_line(e: OSError, path, doing: str) -> str:
    """`{doing} {path}: {why}` for any OSError (KNOWN reasons in plain words)."""
    why = {**KNOWN, errno.ENOTDIR: "a parent path is a file, not a directory",
           errno.EEXIST: "it exists and is not a directory"}.get(e.errno, e.strerror or str(e))
    return f"{doing} {path}: {why}"


def known_io_errors(describe: Callable[[OSError], str]):
    """Decorator: a KNOWN OSError from the function becomes UserError(describe(error))."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if e.errno not in KNOWN:
                    raise
                raise UserError(describe(e)) from None
        return inner
    return wrap
