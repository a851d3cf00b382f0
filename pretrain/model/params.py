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

Initial weights are a function of (seed, parameter name) only, so every layout (plain,
tensor-, pipeline-parallel, ZeRO-3) starts from the same weights. A parameter is drawn in
tiles (`tile_shape`), each from its own generator seeded by a hash of (seed, name, tile), so
a piece of it -- a tensor-parallel slice, a ZeRO-3 partition -- is drawn without the rest
(`initial_block`): a rank draws about its share of the model, not the whole of it.

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

__all__ = ["Rule", "RULES", "TIED", "rule_of", "decays", "param_groups", "draw_seed", "matrix_shape", "tile_shape",
           "initial_block", "initial_range", "initial_value", "initialize", "values_drawn"]


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


# A parameter is seen as a matrix (shape[0], the rest) and drawn in tiles of about TILE values:
# bands of whole rows, so that any range of rows (a row split, a ZeRO-3 partition of the
# flattened tensor) covers whole tiles but at its two ends; for a weight that tensor
# parallelism splits by columns, bands of rows x cols/8 columns (`_COLUMN_BANDS`), so that a
# split into 2, 4 or 8 column slices covers whole tiles too. Tile shapes depend on the full
# shape only (never on a layout), and a tile is always drawn whole: its values do not
# depend on how much of it a rank keeps, nor on the number of rows (the padded vocabulary).
TILE = 8192
_COLUMN_BANDS = 8
_drawn = 0  # random values drawn by this process for initial weights (`values_drawn`)


def matrix_shape(shape: Iterable[int]) -> tuple[int, int]:
    """The (rows, columns) a tensor of `shape` is drawn as: (shape[0], product of the rest)."""
    shape = tuple(shape)
    return shape[0], math.prod(shape[1:])


def tile_shape(name: str, shape: Iterable[int]) -> tuple[int, int]:
    """(rows, columns) of a tile of plain parameter `name` of full `shape` (see TILE)."""
    cols = width = matrix_shape(shape)[1]
    if rule_of(name).tp_dim == 1:
        while width % 2 == 0 and cols // width < _COLUMN_BANDS:
            width //= 2
    return max(1, TILE // width), width


def values_drawn() -> int:
    """How many random values this process has drawn for initial weights so far."""
    return _drawn


def _tile_seed(seed: int, name: str, row: int, col: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{row}/{col}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def initial_block(name: str, shape: Iterable[int], m: ModelConfig, seed: int, rows: tuple[int, int],
                  cols: tuple[int, int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows [r0, r1) x columns [c0, c1) of the initial value of plain parameter `name` of full
    `shape`, seen as a matrix (`matrix_shape`), drawn from the tiles they cover only: a
    function of (seed, name, shape's columns) and the range. Into `out` if given (fp32, CPU,
    that shape), else into a new tensor."""
    global _drawn
    (r0, r1), (c0, c1) = rows, cols
    out = torch.empty(r1 - r0, c1 - c0) if out is None else out
    rule = rule_of(name)
    if rule.init in ("zeros", "ones"):
        return out.fill_(0.0 if rule.init == "zeros" else 1.0)
    std = m.init_std / math.sqrt(2 * m.n_layer) if rule.init == "residual" else m.init_std
    th, tw = tile_shape(name, shape)
    name = TIED.get(name, name)
    g = torch.Generator()
    for i in range(r0 // th, -(-r1 // th)):
        a, b = max(r0, i * th), min(r1, (i + 1) * th)
        for j in range(c0 // tw, -(-c1 // tw)):
            c, d = max(c0, j * tw), min(c1, (j + 1) * tw)
            g.manual_seed(_tile_seed(seed, name, i, j))
            dst = out[a - r0:b - r0, c - c0:d - c0]
            if (b - a, d - c) == (th, tw) and dst.is_contiguous():
                dst.normal_(0.0, std, generator=g)  # the whole tile, in place (same values as drawn apart)
            else:
                dst.copy_(torch.empty(th, tw).normal_(0.0, std, generator=g)[a - i * th:b - i * th,
                                                                                c - j * tw:d - j * tw])
            _drawn += th * tw
    return out


def initial_range(name: str, shape: Iterable[int], m: ModelConfig, seed: int, rows: tuple[int, int],
                  cols: tuple[int, int], out: torch.Tensor, skip: int = 0) -> None:
    """Write elements [skip, skip + out.numel()) of the flattened block rows x cols (see
    `initial_block`) into the 1-D fp32 CPU tensor `out`: a range that starts and ends inside
    rows (a ZeRO-3 partition). The whole tile rows inside the range are drawn in place, the
    partial ones at its two ends apart and copied, so every tile is drawn once."""
    r0, (c0, c1) = rows[0], cols
    width, n = c1 - c0, out.numel()
    if n == 0:
        return
    th = tile_shape(name, shape)[0]
    first, last = r0 + skip // width, r0 + -(-(skip + n) // width)  # the rows the range touches
    # the tile rows whose rows all lie inside the range: [lo, hi)
    lo = -(-(r0 + -(-skip // width)) // th) * th
    hi = (r0 + (skip + n) // width) // th * th
    if lo >= hi:
        lo = hi = last
    for start, stop, inside in ((first, lo, False), (lo, hi, True), (hi, last, False)):
        if start >= stop:
            continue
        a, b = max((start - r0) * width - skip, 0), min((stop - r0) * width - skip, n)  # its part of `out`
        if inside:
            initial_block(name, shape, m, seed, (start, stop), cols, out=out[a:b].view(stop - start, width))
        else:
            drawn = initial_block(name, shape, m, seed, (start, stop), cols).view(-1)
            out[a:b] = drawn[a + skip - (start - r0) * width:][:b - a]


def initial_value(name: str, shape: Iterable[int], m: ModelConfig, seed: int) -> torch.Tensor:
    """The full initial fp32 tensor (CPU) of plain parameter `name`: a function of (seed, name, shape)."""
    shape = tuple(shape)
    rows, cols = matrix_shape(shape)
    return initial_block(name, shape, m, seed, (0, rows), (0, cols)).view(shape)


def initialize(module: torch.nn.Module, m: ModelConfig, seed: int) -> None:
    """Fill every parameter of the plain model `module` with its initial value under `seed`."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            rows, cols = matrix_shape(p.shape)
            if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous():
                initial_block(name, p.shape, m, seed, (0, rows), (0, cols), out=p.view(rows, cols))  # in place
            else:
                p.copy_(initial_value(name, p.shape, m, seed))
