"""The GPT model (no DeepSpeed / torch.distributed): layers, full model, param groups, sampling,
the table of its parameters (`params`) and its sizes (`size`).

Kept import-light, like ``pretrain.parallel``: `size` needs no torch (the planner imports it
before torch exists), so the public names below resolve on first access."""
from __future__ import annotations

_NAMES = {"GPT": "gpt", "loss_fn": "gpt", "param_groups": "params", "Block": "layers", "Embedding": "layers",
          "Head": "layers", "KVCache": "layers", "resolve_d_ff": "layers", "generate": "sampling",
          "sample_logits": "sampling"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
