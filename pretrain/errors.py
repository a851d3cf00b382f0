"""User-facing errors: one clear line, a non-zero exit, no traceback.

Code raises `UserError` for anything the user can fix (bad config, missing or corrupt
file, malformed data). Entry points wrap `main` with `cli_entry`, which prints the
message as `error: ...` and exits with status 2. Anything else is a bug and keeps
its traceback. Their parsers use `HelpFormatter`, so `--help` shows every default.
"""
from __future__ import annotations

import argparse
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
