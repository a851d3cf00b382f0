"""User-facing errors: one clear line, a non-zero exit, no traceback.

Code raises `UserError` for anything the user can fix (bad config, missing or corrupt
file, malformed data). Entry points wrap `main` with `cli_entry`, which prints the
message as `error: ...` and exits with status 2. Anything else is a bug and keeps
its traceback. Their parsers use `HelpFormatter`, so `--help` shows every default.
"""
from __future__ import annotations

import argparse
import errno
import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix; the message names the file/field and the fix."""


# Known I/O errors (disk full, read-only file system, no permission) become one line naming the
# path and what state the output was left in, instead of a traceback; other OSErrors stay bugs.
# errno: (short form, as in "disk full writing X"; clause, as in "writing X: the disk is full")
IO_ERRORS = {errno.ENOSPC: ("disk full", "the disk is full"),
             errno.EDQUOT: ("disk quota exceeded", "the disk quota is exhausted"),
             errno.EROFS: ("read-only file system", "the file system is read-only"),
             errno.EACCES: ("permission denied", "permission denied"),
             errno.EPERM: ("operation not permitted", "operation not permitted")}


def os_error_line(e: OSError, path, doing: str) -> str:
    """`{doing} {path}: {why}` for any OSError (IO_ERRORS in plain words)."""
    known = IO_ERRORS.get(e.errno)
    why = known[1] if known else {errno.ENOTDIR: "a parent path is a file, not a directory",
                                  errno.EEXIST: "it exists and is not a directory"}.get(e.errno, e.strerror or str(e))
    return f"{doing} {path}: {why}"


def known_io_errors(describe: Callable[[OSError], str]):
    """Decorator: a known OSError (IO_ERRORS) from the function becomes UserError(describe(error))."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if e.errno not in IO_ERRORS:
                    raise
                raise UserError(describe(e)) from None
        return inner
    return wrap


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        return int(rc or 0)

    return wrapper


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with "(default: X)" after every option that takes a value and has a default (not
    None), also options without help text; help that already names its default is kept."""

    def _format_action(self, action):
        if action.help is None and self._shows_default(action):
            action.help = "default: %(default)r"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)r)"

    @staticmethod
    def _shows_default(action) -> bool:
        d = action.default  # flags (store_true/false, nargs 0) say what they do instead
        return (bool(action.option_strings) and action.nargs != 0
                and not (d is None or d is False or d == [] or d == argparse.SUPPRESS))
