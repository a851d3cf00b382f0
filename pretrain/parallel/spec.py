"""The parameter spec: every fact about a plain-GPT parameter, by name, in one table.

For each parameter of `pretrain.model.gpt.GPT` (matched by its name) `RULES` says

* ``group``   -- its optimizer group: 'matrix' (weight decay), 'embedding' (a lookup table:
  decayed only with optim.decay_embeddings), 'vector' (biases and norm gains: decayed only
  with optim.decay_norms_and_biases);
* ``tp_dim``  -- the dimension tensor parallelism splits (None: replicated on every TP rank);
* ``regroup`` -- the fused qkv rows are regrouped per rank before the split
  (`qkv_permutation`), so rank r holds its query heads and exactly the kv heads they read;
* ``vocab``   -- the rows are the padded vocabulary (`pad_vocab`: a multiple of
  vocab_multiple x tp, so every rank's slice is equal);
* ``init``    -- the initial value: 'normal' N(0, init_std), 'residual' N(0, init_std/sqrt(2L))
  (the projections into the residual stream), 'zeros', 'ones'.

Pipeline layers: [embedding, block 0 .. block L-1, head] are layers 0 .. L+1; a name's
layer is its prefix (`layer_of`, `layer_prefix`). Ties: with model.tie_embeddings the head
(layer L+1) reads ``embed.wte.weight``; a pipeline's last stage holds a copy of it, named
``head.wte.weight`` in plain terms (`TIED`), ``tied_modules.embed.wte.weight`` by DeepSpeed.

Everything that shards, merges, groups, names or initialises parameters derives from this
table: `local_piece` (sharding, loading imported or consolidated weights), `merge_state`
(export, consolidation, checkpoint reading), `param_groups` (the optimizer, the plain GPT
and every parallel layout alike), `plain_name` (pipeline stage names), `initial_value`.

Initial weights are a function of (seed, parameter name) only: each parameter is drawn full
size from its own generator (seeded by a hash of the run's seed and the name) and then
sliced, so every layout (plain, tensor-, pipeline-parallel, ZeRO-3) starts from the same
weights, and building holds at most one full parameter beyond this rank's own pieces.

This module imports only torch and the config schema: the model and the parallel code both
build on it (see docs/PARALLEL.md).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from pretrain.config.schema import ModelConfig

__all__ = ["Rule", "RULES", "TIED", "rule_of", "qkv_permutation", "layer_of", "layer_prefix", "plain_name",
           "full_shape", "local_piece", "merge_state", "decays", "param_groups", "optimizer_groups", "group_names", "draw_seed",
           "initial_value", "initialize"]


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
PIPE_TIED_KEY = "embed"  # DeepSpeed's TiedLayerSpec key: stage names 'tied_modules.embed.*'


def rule_of(name: str) -> Rule:
    """The rule of a plain-GPT parameter name (KeyError for a name the spec does not know)."""
    name = TIED.get(name, name)
    for pattern, rule in _COMPILED:
        if pattern.match(name):
            return rule
    raise KeyError(f"{name!r} is not a parameter of the plain GPT (pretrain.parallel.spec.RULES)")


# ----------------------------------------------------------------------------- pipeline names
def layer_of(name: str, n_layer: int) -> int:
    """The pipeline layer (0 embedding, 1..L blocks, L+1 head) holding plain parameter `name`."""
    if name.startswith("embed."):
        return 0
    if name.startswith("head."):
        return n_layer + 1
    return int(name.split(".")[1]) + 1


def layer_prefix(idx: int, n_layer: int) -> str:
    """Plain-GPT name prefix of pipeline layer `idx` ('embed.', 'blocks.{i}.', 'head.')."""
    if idx == 0:
        return "embed."
    if idx <= n_layer:
        return f"blocks.{idx - 1}."
    return "head."


_EMBED_ATTRS = ("wte.", "wpe.")


def plain_name(name: str, n_layer: int) -> str:
    """The plain-GPT name of a parameter of any built model: plain and tensor-parallel GPTs keep
    the plain names; a pipeline stage names layers by index ('3.attn.qkv.weight') and tied
    modules 'tied_modules.embed.<attr>' (the embedding on the first stage, the head with its
    copy of the token table on the last). A tied copy maps to its original (`TIED`)."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        if key != PIPE_TIED_KEY:
            raise KeyError(f"unexpected tied module {key!r} in {name!r}")
        name = ("embed." if rest.startswith(_EMBED_ATTRS) else "head.") + rest
    elif head.isdigit():
        name = layer_prefix(int(head), n_layer) + rest
    return TIED.get(name, name)


# ----------------------------------------------------------------------------- tensor parallelism
def qkv_permutation(n_head: int, n_kv_head: int, head_dim: int, tp: int) -> torch.Tensor:
    """Row order of the fused qkv weight such that rank r's contiguous 1/tp slice is
    [q heads of rank r | k heads of rank r | v heads of rank r].

    The plain layout is [q (nh*hd) | k (nkv*hd) | v (nkv*hd)]; `full[perm]` is the regrouped
    weight, and `out[perm] = regrouped` undoes it."""
    if n_head % tp or n_kv_head % tp:
        raise ValueError(f"heads ({n_head}) and kv heads ({n_kv_head}) must divide by tp ({tp})")
    nh, nkv = n_head // tp, n_kv_head // tp
    q0, k0, v0 = 0, n_head * head_dim, (n_head + n_kv_head) * head_dim
    parts = []
    for r in range(tp):
        parts.append(torch.arange(q0 + r * nh * head_dim, q0 + (r + 1) * nh * head_dim))
        parts.append(torch.arange(k0 + r * nkv * head_dim, k0 + (r + 1) * nkv * head_dim))
        parts.append(torch.arange(v0 + r * nkv * head_dim, v0 + (r + 1) * nkv * head_dim))
    return torch.cat(parts)


def _perm(m: ModelConfig, tp: int) -> torch.Tensor:
    return qkv_permutation(m.n_head, m.n_kv_head or m.n_head, m.d_model // m.n_head, tp)


def full_shape(name: str, local: Iterable[int], tp: int) -> tuple[int, ...]:
    """The full shape of plain parameter `name` whose tensor-parallel piece has shape `local`."""
    shape = list(local)
    dim = rule_of(name).tp_dim
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


def local_piece(name: str, full: torch.Tensor, m: ModelConfig, tp: int, tp_rank: int) -> torch.Tensor:
    """Tensor-parallel rank `tp_rank`'s piece of the full plain tensor `name` (a view when it can be)."""
    rule = rule_of(name)
    if rule.tp_dim is None or tp == 1:
        return full
    if rule.regroup:
        full = full[_perm(m, tp)]
    if full.shape[rule.tp_dim] % tp:
        raise ValueError(f"{name}: dim {rule.tp_dim} of shape {tuple(full.shape)} does not divide by tp {tp}")
    return full.chunk(tp, dim=rule.tp_dim)[tp_rank]


def merge_state(shards: list[dict], m: ModelConfig) -> dict:
    """One plain state dict from the tensor-parallel ranks' state dicts of plain names (rank order)."""
    tp = len(shards)
    if tp == 1:
        return dict(shards[0])
    out = {}
    for name, first in shards[0].items():
        rule = rule_of(name)
        if rule.tp_dim is None:
            out[name] = first
            continue
        full = torch.cat([s[name] for s in shards], dim=rule.tp_dim)
        if rule.regroup:
            plain = torch.empty_like(full)
            plain[_perm(m, tp)] = full
            full = plain
        out[name] = full
    return out


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
                 n_layer: int = 0) -> list[dict]:
    """AdamW groups [{'params', 'names', 'weight_decay': wd}, {..., 'weight_decay': 0}] of the
    trainable `named` parameters (e.g. `model.named_parameters()`: a shared parameter once) by
    their plain names' rule, in the given order; 'names' are the given (module) names. Empty
    groups are dropped. Pass `n_layer` for a pipeline stage's index-named layers."""
    decay, no_decay = ([], []), ([], [])
    for name, p in named:
        if not p.requires_grad:
            continue
        use = decays(plain_name(name, n_layer), decay_norms_and_biases, decay_embeddings)
        target = decay if use else no_decay
        target[0].append(p)
        target[1].append(name)
    groups = [{"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
              {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _model_groups(model: torch.nn.Module, optim, n_layer: int) -> list[dict]:
    return param_groups(model.named_parameters(), optim.weight_decay, n_layer=n_layer,
                        decay_norms_and_biases=optim.decay_norms_and_biases, decay_embeddings=optim.decay_embeddings)


def optimizer_groups(model: torch.nn.Module, optim, n_layer: int) -> list[dict]:
    """The AdamW parameter groups of any built model (plain, tensor-parallel, pipeline stage)
    under the config's `optim` section."""
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in _model_groups(model, optim, n_layer)]


def group_names(model: torch.nn.Module, optim, n_layer: int) -> list[list[str]]:
    """The module names of each of `optimizer_groups`' groups (what checkpoints record)."""
    return [g["names"] for g in _model_groups(model, optim, n_layer)]


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


Source = Callable[[str, tuple], torch.Tensor]  # (plain name, full shape) -> full tensor


def initialize(module: torch.nn.Module, m: ModelConfig, seed: Optional[int] = None, *, tp: int = 1,
               tp_rank: int = 0, prefix: str = "", source: Optional[Source] = None) -> None:
    """Fill every parameter of `module` (materialised, any device) with its piece of the full
    initial value: `source(plain name, full shape)` if given (imported weights), else
    `initial_value` under `seed`. `prefix` is prepended to the module's own names (a pipeline
    layer: its plain-name prefix). One full parameter exists at a time."""
    if source is None:
        if seed is None:
            raise ValueError("initialize needs a seed or a source")

        def source(name, shape):
            return initial_value(name, shape, m, seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            plain = plain_name(prefix + name, m.n_layer)
            local = tuple(getattr(p, "ds_shape", p.shape))
            piece = local_piece(plain, source(plain, full_shape(plain, local, tp)), m, tp, tp_rank)
            if tuple(piece.shape) != local:
                raise ValueError(f"{plain}: the piece for tp rank {tp_rank} has shape {tuple(piece.shape)}, "
                                 f"the parameter {local}")
            p.copy_(piece)
