"""What the model says about each of its own parameters, by plain-GPT name, in one table.

For each parameter of `pretrain.model.gpt.GPT` (matched by its name) `RULES` says

* ``group``   -- its optimizer group: 'matrix' (weight decay), 'embedding' (a lookup table:
  decayed only with optim.decay_embeddings), 'vector' (biases and norm gains: decayed only
  with optim.decay_norms_and_biases);
* ``init``    -- the initial value: 'normal' N(0, init_std), 'residual' N(0, init_std/sqrt(2L))
  (the projections into the residual stream), 'zeros', 'ones';
* ``tp_dim``, ``regroup``, ``vocab`` -- how tensor parallelism splits it: the dimension (None:
  replicated), whether the fused qkv rows are regrouped per rank first, whether the rows are
  the padded vocabulary. The table only declares them; `pretrain.parallel.spec` acts on them.

Ties: with model.tie_embeddings the head reads ``embed.wte.weight``; a pipeline's last stage
holds a copy of it, named ``head.wte.weight`` in plain terms (`TIED`).

Initial weights are a function of (seed, parameter name) only: each parameter is drawn full
size from its own generator (seeded by a hash of the run's seed and the name), so every
layout (plain, tensor-, pipeline-parallel, ZeRO-3) starts from the same weights.

This module imports only torch and the config schema (the model knows nothing of distribution).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from pretrain.config.schema import ModelConfig

__all__ = ["Rule", "RULES", "TIED", "rule_of", "decays", "param_groups", "draw_seed", "initial_value", "initialize"]


@dataclass(frozen=True)
class Rule:
    group: str  # 'matrix' | 'embedding' | 'vector'
    tp_dim: Optional[int]
    init: str  # 'normal' | 'residual' | 'zeros' | 'ones'
    regroup: bool = False
    vocab: bool = False


_B = r"blocks\.\d+\."
RULES: tuple[tuple[str, Rule], ...] = (
    (r"embed\.wte\.weight", Rule("embedding", 0, "normal", vocab=True)),
    (r"embed\.wpe\.weight", Rule("embedding", None, "normal")),
    (_B + r"ln_[12]\.weight", Rule("vector", None, "ones")),
    (_B + r"ln_[12]\.bias", Rule("vector", None, "zeros")),
    (_B + r"attn\.qkv\.weight", Rule("matrix", 0, "normal", regroup=True)),
    (_B + r"attn\.qkv\.bias", Rule("vector", 0, "zeros", regroup=True)),
    (_B + r"attn\.proj\.weight", Rule("matrix", 1, "residual")),
    (_B + r"attn\.proj\.bias", Rule("vector", None, "zeros")),
    (_B + r"mlp\.(fc|gate|up)\.weight", Rule("matrix", 0, "normal")),
    (_B + r"mlp\.(fc|gate|up)\.bias", Rule("vector", 0, "zeros")),
    (_B + r"mlp\.(proj|down)\.weight", Rule("matrix", 1, "residual")),
    (_B + r"mlp\.(proj|down)\.bias", Rule("vector", None, "zeros")),
    (r"head\.ln_f\.weight", Rule("vector", None, "ones")),
    (r"head\.ln_f\.bias", Rule("vector", None, "zeros")),
    (r"head\.lm_head\.weight", Rule("matrix", 0, "normal", vocab=True)),
)
_COMPILED = tuple((re.compile(p + r"$"), r) for p, r in RULES)

# A copy of another parameter (plain name of the copy -> the original's): the tied output
# head of a pipeline's last stage.
TIED = {"head.wte.weight": "embed.wte.weight"}


def rule_of(name: str) -> Rule:
    """The rule of a plain-GPT parameter name (KeyError for a name the spec does not know)."""
    name = TIED.get(name, name)
    for pattern, rule in _COMPILED:
        if pattern.match(name):
            return rule
    raise KeyError(f"{name!r} is not a parameter of the plain GPT (pretrain.parallel.spec.RULES)")


# ----------------------------------------------------------------------------- optimizer groups
def decays(name: str, decay_norms_and_biases: bool, decay_embeddings: bool) -> bool:
    """Whether plain parameter `name` is in the weight-decay group."""
    group = rule_of(name).group
    if group == "embedding":
        return decay_embeddings
    if group == "vector":
        return decay_norms_and_biases
    return True


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, *,
                 decay_norms_and_biases: bool = False, decay_embeddings: bool = False,
                 plain: Callable[[str], str] = lambda name: name) -> list[dict]:
    """AdamW groups [{'params', 'names', 'weight_decay': wd}, {..., 'weight_decay': 0}] of the
    trainable `named` parameters (e.g. `model.named_parameters()`: a shared parameter once) by
    their rule, in the given order; 'names' are the given (module) names, `plain(name)` the
    plain-GPT name the rule is looked up by. Empty groups are dropped."""
    decay, no_decay = ([], []), ([], [])
    for name, p in named:
        if not p.requires_grad:
            continue
        target = decay if decays(plain(name), decay_norms_and_biases, decay_embeddings) else no_decay
        target[0].append(p)
        target[1].append(name)
    groups = [{"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
              {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- initial values
def draw_seed() -> int:
    """The base seed of a model's initial weights: one draw of torch's default generator (so a
    model built under `torch.manual_seed(s)` is a function of s, in any layout)."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def initial_value(name: str, shape: Iterable[int], m: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial fp32 tensor (CPU) of plain parameter `name`: a function of (seed, name, shape)."""
    rule = rule_of(name)
    shape = tuple(shape)
    if rule.init == "zeros":
        return torch.zeros(shape)
    if rule.init == "ones":
        return torch.ones(shape)
    std = m.init_std / math.sqrt(2 * m.n_layer) if rule.init == "residual" else m.init_std
    g = torch.Generator().manual_seed(_name_seed(seed, TIED.get(name, name)))
    return torch.empty(shape).normal_(0.0, std, generator=g)


def initialize(module: torch.nn.Module, m: ModelConfig, seed: int) -> None:
    """Fill every parameter of the plain model `module` with its initial value under `seed`."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(initial_value(name, p.shape, m, seed))
