"""Model-shape flags shared by tools/bench_train.py and tools/bench_memory.py."""
from __future__ import annotations

import argparse

SMOKE = dict(layers=2, d_model=64, heads=2, vocab=512, seq=32, batch=2)  # a tiny model (--smoke)
ANCHOR = dict(layers=6, d_model=384, heads=6, vocab=50304, seq=256, batch=8)  # REFERENCE.md CPU anchor

# flag attribute -> trainer override key
_KEYS = (("layers", "model.n_layer"), ("d_model", "model.d_model"), ("heads", "model.n_head"),
         ("vocab", "model.vocab_size"), ("seq", "model.seq_len"), ("batch", "train.micro_batch_size"))


def add_shape_args(parser: argparse.ArgumentParser, batch_help: str) -> None:
    """--layers --d-model --heads --vocab --seq --batch (each default None: the config's)."""
    parser.add_argument("--layers", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int, help=batch_help)


def fill_defaults(args: argparse.Namespace, defaults: dict) -> None:
    """Set each shape flag left unset (None) to its value in `defaults` (SMOKE, ANCHOR)."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def shape_overrides(args: argparse.Namespace) -> list[str]:
    """Trainer overrides `model.n_layer=...` etc. for the shape flags that are set."""
    return [f"{key}={getattr(args, name)}" for name, key in _KEYS if getattr(args, name) is not None]
