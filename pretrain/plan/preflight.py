"""Checks before step 1 of what can be checked, so a run fails in seconds rather than at
its first save: the output and checkpoint directories are directories and writable, the
checkpoint directory has room for a checkpoint (a warning), and the DeepSpeed config
(ours merged with the `deepspeed:` pass-through) passes DeepSpeed's own config model.
"""
from __future__ import annotations

import os
import sys
import shutil
from pathlib import Path
from typing import Callable

from pretrain import dsadapter
from pretrain.config.schema import Config
from pretrain.config.validate import Layout
from pretrain.errors import UserError, os_error_line


def check_dir(path: Path, what: str) -> None:
    """`path` is (made) a writable directory; UserError naming `what` (a config field) otherwise."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory; set {what} to a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pretrain-write-test.{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{os_error_line(e, path, f'cannot write {what}')}; set {what} to a writable "
                        "directory") from None


def check_free_space(cfg: Config, layout: Layout, ckpt_dir: Path, warn: Callable[[str], None]) -> None:
    """Warn when the checkpoint directory has less free space than one checkpoint (the --plan estimate)."""
    from pretrain.plan.estimate import checkpoint_bytes

    need = checkpoint_bytes(cfg, layout)
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        return
    if free < need:
        warn(f"warning: {ckpt_dir} has {free / 2**30:.2f} GiB free, one checkpoint needs about "
             f"{need / 2**30:.2f} GiB (--plan); the first save may fail with a full disk")


def _key_path(tree: dict, loc: tuple) -> str:
    """The dotted path of `loc` in the pass-through (DeepSpeed validates each section alone,
    so its error path lacks the section name)."""
    for key, value in tree.items():
        if (key,) == tuple(loc[:1]) and len(loc) == 1:
            return key
        if isinstance(value, dict):
            below = _key_path(value, loc)
            if below:
                return f"{key}.{below}"
    return ""


def _ds_error_line(e: Exception, passthrough: dict) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic.ValidationError: the first problem, with its key path
        try:
            first = errors()[0]
            loc = tuple(str(x) for x in first.get("loc", ()))
            where = _key_path(passthrough, loc[-1:]) or ".".join(loc)
            got = first.get("input")
            got = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            return f"deepspeed.{where}: {first.get('msg')}{got}"
        except (IndexError, TypeError):
            pass
    return "deepspeed: " + (" ".join(str(e).split()) or type(e).__name__)


def check_deepspeed(cfg: Config, layout: Layout) -> None:
    """Parse the generated DeepSpeed config with DeepSpeed's config model (before any process group)."""
    from pretrain.config.deepspeed import deepspeed_config

    ds = _ReadKeys(deepspeed_config(cfg, layout))
    # Without a process group DeepSpeed assumes one data-parallel rank; the batch triple was
    # checked by `validate.resolve` for the real one, so give DeepSpeed its per-rank share.
    ds["train_batch_size"] = layout.micro_batch_size * layout.grad_accum
    try:
        dsadapter.parse_config(ds)
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError, TypeError ...
        raise UserError(f"{_ds_error_line(e, cfg.deepspeed)}; DeepSpeed's config model refuses the deepspeed: section "
                        "(see DeepSpeed's config-json docs for the key and its type)") from None
    _check_top_level(cfg.deepspeed or {}, ds.read)


class _ReadKeys(dict):
    """The DeepSpeed config, noting which top-level keys DeepSpeed's config model reads: DeepSpeed
    ignores a top-level key it does not know, so a misspelt section would otherwise pass silently."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _check_top_level(passthrough: dict, read: set) -> None:
    """A pass-through key DeepSpeed never read: an error when it is close to one it reads (a typo,
    e.g. zero_optimisation), else a warning (a key some other DeepSpeed component may read)."""
    import difflib

    for key in sorted(set(passthrough) - read):
        near = difflib.get_close_matches(key, sorted(k for k in read if isinstance(k, str)), n=1, cutoff=0.8)
        if near:
            raise UserError(f"deepspeed.{key}: DeepSpeed reads no such key; did you mean deepspeed.{near[0]}?")
        print(f"warning: deepspeed.{key}: DeepSpeed's config model does not read this key; it is passed on "
              "as it is", file=sys.stderr, flush=True)
