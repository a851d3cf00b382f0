"""User-facing errors: one clear line, a non-zero exit, no traceback.

Code raises `UserError` for anything the user can fix (bad config, missing or corrupt
file, malformed data). Entry points wrap `main` with `cli_entry`, which prints the
message as `error: ...` and exits with status 2. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix; the message names the file/field and the fix."""


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
