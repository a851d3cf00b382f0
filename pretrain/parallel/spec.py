"""The split plan: how each plain-GPT parameter is sharded, merged, grouped and named in every
parallel layout, acting on the model's own table of its parameters (`pretrain.model.params`:
optimizer group, initial value and the tensor-parallel split it declares).

* ``tp_dim``  -- the dimension tensor parallelism splits (None: replicated on every TP rank);
* ``regroup`` -- the fused qkv rows are regrouped per rank before the split
  (`qkv_permutation`), so rank r holds its query heads and exactly the kv heads they read;
* ``vocab``   -- the rows are the padded vocabulary (`pad_vocab`: a multiple of
  vocab_multiple x tp, so every rank's slice is equal).

Pipeline layers: [embedding, block 0 .. block L-1, head] are layers 0 .. L+1; a name's
layer is its prefix (`layer_of`, `layer_prefix`). Ties: with model.tie_embeddings the head
(layer L+1) reads ``embed.wte.weight``; a pipeline's last stage holds a copy of it, named
``head.wte.weight`` in plain terms (`TIED`), ``tied_modules.embed.wte.weight`` by DeepSpeed.

Everything that shards, merges, groups, names or initialises parameters derives from the
table: `local_piece` (sharding, loading imported or consolidated weights), `merge_state`
(export, consolidation, checkpoint reading), `optimizer_groups` (the optimizer, the plain GPT
and every parallel layout alike), `plain_name` (pipeline stage names), `initialize` (each
rank's piece of the initial values -- its tensor-parallel slice, or under ZeRO-3 its
partition of that slice -- drawn by itself: `local_blocks` says which rows and columns of the
full tensor the piece holds, `params.initial_range` draws only the tiles covering them).

The names of the table are re-exported here for the parallel code (see docs/PARALLEL.md).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from pretrain import dsadapter
from pretrain.config.schema import ModelConfig
from pretrain.model import params
from pretrain.model.params import RULES, TIED, Rule, decays, draw_seed, initial_value, rule_of  # noqa: F401 (re-exported)

__all__ = ["Rule", "RULES", "TIED", "rule_of", "qkv_permutation", "layer_of", "layer_prefix", "plain_name",
           "full_shape", "local_piece", "local_blocks", "draw_piece", "merge_state", "decays", "optimizer_groups",
           "draw_seed", "initial_value", "initialize"]


PIPE_TIED_KEY = "embed"  # DeepSpeed's TiedLayerSpec key: stage names 'tied_modules.embed.*'


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


Block = tuple[tuple[int, int], tuple[int, int]]  # rows [r0, r1), columns [c0, c1) of a full tensor's matrix


def _local_region(name: str, full: tuple[int, ...], m: ModelConfig, tp: int, tp_rank: int):
    """Where `local_piece` takes its piece from, in the full tensor seen as a matrix
    (`params.matrix_shape`): the full-row runs [a, b) its rows are, in order, and its columns."""
    rows, cols = params.matrix_shape(full)
    rule = rule_of(name)
    if rule.tp_dim is None or tp == 1:
        return [(0, rows)], (0, cols)
    if full[rule.tp_dim] % tp:
        raise ValueError(f"{name}: dim {rule.tp_dim} of shape {full} does not divide by tp {tp}")
    if rule.tp_dim == 1:
        if len(full) != 2:
            raise ValueError(f"{name}: a column split of a {len(full)}-d tensor is not a range of its columns")
        per = cols // tp
        return [(0, rows)], (tp_rank * per, (tp_rank + 1) * per)
    per = rows // tp
    mine = torch.arange(tp_rank * per, (tp_rank + 1) * per)
    if rule.regroup:
        mine = _perm(m, tp)[mine]
    runs = []  # consecutive rows joined
    for r in mine.tolist():
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [tuple(run) for run in runs], (0, cols)


def local_blocks(name: str, full: Iterable[int], m: ModelConfig, tp: int, tp_rank: int,
                 start: int = 0, stop: Optional[int] = None) -> tuple[list[Block], int]:
    """Where elements [start, stop) of tensor-parallel rank `tp_rank`'s flattened piece of the
    full tensor `name` (shape `full`, seen as a matrix) come from: blocks of the full tensor
    whose flattened values, concatenated in order, hold them from offset `skip` on
    (`local_piece(...).reshape(-1)[start:stop]`; default: the whole piece). The blocks are the
    piece's whole rows that the range touches (a ZeRO-3 partition starts and ends inside rows):
    a row is drawn in tiles anyway. Returns (blocks, skip)."""
    runs, (c0, c1) = _local_region(name, tuple(full), m, tp, tp_rank)
    width = c1 - c0
    stop = sum(b - a for a, b in runs) * width if stop is None else stop
    if stop <= start:
        return [], 0
    lo, hi = start // width, -(-stop // width)  # the piece's rows [lo, hi)
    blocks, offset = [], 0
    for r0, r1 in runs:  # -> the full rows of its runs
        x, y = max(lo, offset), min(hi, offset + r1 - r0)
        if x < y:
            blocks.append(((r0 + x - offset, r0 + y - offset), (c0, c1)))
        offset += r1 - r0
    return blocks, start - lo * width


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
def optimizer_groups(model: torch.nn.Module, optim, n_layer: int) -> list[dict]:
    """`params.param_groups` of any built model (plain, tensor-parallel, pipeline stage: its
    index-named layers are looked up by `plain_name`) under the config's `optim` section:
    [{'params', 'names', 'weight_decay'}, ...]; the names are what checkpoints record."""
    return params.param_groups(model.named_parameters(), optim.weight_decay,
                               decay_norms_and_biases=optim.decay_norms_and_biases,
                               decay_embeddings=optim.decay_embeddings, plain=lambda name: plain_name(name, n_layer))


Source = Callable[[str, tuple], torch.Tensor]  # (plain name, full shape) -> full tensor
# A source may also fill a piece itself, reading only what it holds (checkpoint.init_from):
# `source.read_piece(name, full shape, m, tp, tp_rank, start, out)` writes elements
# [start, start + out.numel()) of rank tp_rank's flattened piece (as `local_piece`) into `out`.


def draw_piece(name: str, full: tuple, m: ModelConfig, seed: int, tp: int, tp_rank: int, start: int,
               out: torch.Tensor) -> None:
    """Elements [start, start + out.numel()) of tensor-parallel rank `tp_rank`'s flattened piece
    of the initial value of `name` into `out` (1-D, fp32, CPU), drawing only the tiles they touch."""
    blocks, skip = local_blocks(name, full, m, tp, tp_rank, start, start + out.numel())
    at = -skip  # where the next block starts in `out`
    for rows, cols in blocks:
        size = (rows[1] - rows[0]) * (cols[1] - cols[0])
        a, b = max(at, 0), min(at + size, out.numel())
        params.initial_range(name, full, m, seed, rows, cols, out[a:b], skip=a - at)
        at += size


def initialize(module: torch.nn.Module, m: ModelConfig, seed: Optional[int] = None, *, tp: int = 1,
               tp_rank: int = 0, prefix: str = "", source: Optional[Source] = None) -> None:
    """Fill every parameter of `module` (materialised on any device, or ZeRO-3 partitioned:
    then this rank's partition) with its piece of the full initial value: `source(plain name,
    full shape)` if given (imported weights; or the source's own `read_piece`), else the
    initial value under `seed`, of which only the tiles covering the piece are drawn. `prefix`
    is prepended to the module's own names (a pipeline layer: its plain-name prefix)."""
    if source is None and seed is None:
        raise ValueError("initialize needs a seed or a source")
    with torch.no_grad():
        for name, p in module.named_parameters():
            plain = plain_name(prefix + name, m.n_layer)
            local = tuple(dsadapter.param_full_shape(p))  # ZeRO-3: the full (tensor-parallel) shape
            full = full_shape(plain, local, tp)
            held = dsadapter.zero3_partition(p)  # ZeRO-3: (this rank's partition, its range of the flat piece)
            target, start, stop = held if held is not None else (p.view(-1), 0, p.numel())
            n = stop - start
            reads = hasattr(source, "read_piece")  # reads only what the piece holds, into it
            in_place = reads or (source is None and target.device.type == "cpu" and target.dtype == torch.float32)
            if reads:
                source.read_piece(plain, full, m, tp, tp_rank, start, target[:n])
            elif source is None:
                values = target[:n] if in_place else torch.empty(n)
                draw_piece(plain, full, m, seed, tp, tp_rank, start, values)
            else:
                piece = local_piece(plain, source(plain, full), m, tp, tp_rank)
                if tuple(piece.shape) != local:
                    raise ValueError(f"{plain}: the piece for tp rank {tp_rank} has shape {tuple(piece.shape)}, "
                                     f"the parameter {local}")
                values = piece.reshape(-1)[start:stop]
            if not in_place:
                target[:n].copy_(values)
            target[n:].zero_()  # ZeRO-3: DeepSpeed's padding of the last partition
