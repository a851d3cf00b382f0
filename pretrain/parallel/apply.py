"""Tensor parallelism applied to the plain GPT from outside, in one place.

The model code (`pretrain.model`) knows nothing about distribution. Here its layers are
built exactly as `GPT(cfg, vocab_size)` builds them -- one at a time, in the same order,
under the caller's seed, so the default RNG is consumed identically -- and each layer is
sharded right after it is built (peak memory: one full layer). So TP=1 and TP=k start from
the same full weights for the same seed, exactly (given the same padded vocabulary).

What becomes what (Megatron's layout; tp = tensor-parallel degree):

    embed.wte                 VocabParallelEmbedding (rows split over ranks)
    embed.wpe                 replicated (under sequence parallelism: sliced along T)
    blocks.i.attn.qkv         ColumnParallelLinear, rows regrouped per rank as
                              [q heads of rank r | its kv heads k | v] (see `qkv_permutation`)
    blocks.i.attn.proj        RowParallelLinear (its input is the local heads)
    blocks.i.mlp.fc|gate|up   ColumnParallelLinear
    blocks.i.mlp.proj|down    RowParallelLinear
    ln_1, ln_2, head.ln_f     replicated (sequence parallel: applied to T/tp rows, gradient all-reduced)
    head                      vocab-parallel logits (B, T, V/tp) from the (tied or own) vocab-split
                              weight; the loss is `vocab_parallel_cross_entropy`: full logits are
                              never gathered during training

Attention modules get the local head counts (n_head/tp, n_kv_head/tp); with grouped-query
attention rank r holds query heads [r*nh/tp, (r+1)*nh/tp) and exactly the kv heads they read.

Sequence parallelism (parallel.sequence_parallel): the residual stream between the
tensor-parallel regions is split along T; column-parallel layers all-gather it, row-parallel
layers reduce-scatter. Dropout on a sequence shard draws the mask of the *full* sequence
and keeps its slice (`SPDropout`), so masks equal those of TP=1 for the same RNG state.

The same sharding functions serve the pipeline (`pretrain.parallel.pipeline`), which builds
the same layers per stage. Parameter names stay those of the plain GPT, so a checkpoint's
tensor-parallel pieces merge back into a plain state dict (`merge_tp_shards`).
"""
from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config.schema import ModelConfig
from pretrain.model.gpt import GPT, loss_fn, param_groups
from pretrain.model.layers import Block, Embedding, Head, RMSNorm, check_config
from pretrain.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_rank,
    get_world_size,
    scatter_to_sequence_parallel_region,
    sequence_parallel_param,
)
from pretrain.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = [
    "plain_layers", "qkv_permutation", "shard_embedding", "shard_block", "shard_head",
    "ParallelEmbedding", "ParallelHead", "ParallelGPT", "SPDropout", "parallel_loss",
    "build_model", "parallel_param_groups", "tp_partition_dim", "merge_tp_shards",
]


# ----------------------------------------------------------------------------- building
def plain_layers(cfg: ModelConfig, vocab_size: int) -> Iterator[nn.Module]:
    """Embedding, Block x n_layer, Head: the plain layers, built lazily one at a time in
    `GPT.__init__`'s order, so the default RNG is consumed exactly as `GPT(cfg, vocab_size)`
    consumes it. The Head has no embedding reference (tied: pass the weight or wrap it)."""
    check_config(cfg)
    yield Embedding(cfg, vocab_size)
    for _ in range(cfg.n_layer):
        yield Block(cfg)
    yield Head(cfg, vocab_size)


def qkv_permutation(n_head: int, n_kv_head: int, head_dim: int, tp: int) -> torch.Tensor:
    """Row order of the fused qkv weight such that rank r's contiguous 1/tp slice is
    [q heads of rank r | k heads of rank r | v heads of rank r].

    The plain layout is [q (nh*hd) | k (nkv*hd) | v (nkv*hd)]; `full[perm]` is the regrouped
    weight, and `regrouped[argsort(perm)]` (or `out[perm] = regrouped`) undoes it."""
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


class SPDropout(nn.Dropout):
    """Dropout on a sequence shard (B, T/tp, ...): draws the full-sequence mask, keeps its slice.

    Every TP rank has the same RNG state, so this equals dropout on the full activation
    (TP=1) restricted to the rank's rows, instead of repeating one shard's mask tp times."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        tp = get_world_size(self.group)
        T = x.size(1)
        shape = list(x.shape)
        shape[1] = T * tp
        mask = F.dropout(torch.ones(shape, dtype=x.dtype, device=x.device), self.p, True)
        return x * mask.narrow(1, get_rank(self.group) * T, T)


class _SPLayerNorm(nn.LayerNorm):
    """LayerNorm on a sequence shard: its weight/bias gradients are all-reduced over the TP group."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else sequence_parallel_param(self.weight, self.group)
        b = None if self.bias is None else sequence_parallel_param(self.bias, self.group)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class _SPRMSNorm(RMSNorm):
    """RMSNorm on a sequence shard (see _SPLayerNorm)."""

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * sequence_parallel_param(self.weight, self.group)


def _sp_norm(norm: nn.Module, group) -> nn.Module:
    """Make a norm sequence-parallel in place (same parameters, same names)."""
    if isinstance(norm, nn.LayerNorm):
        norm.__class__ = _SPLayerNorm
    elif isinstance(norm, RMSNorm):
        norm.__class__ = _SPRMSNorm
    else:
        raise TypeError(f"no sequence-parallel version of {type(norm).__name__}")
    norm.group = group
    for p in norm.parameters():
        p.sequence_parallel = True
    return norm


def _sp_dropout(drop: nn.Dropout, group) -> nn.Dropout:
    drop.__class__ = SPDropout
    drop.group = group
    return drop


class ParallelEmbedding(nn.Module):
    """`Embedding` with a vocab-parallel token table (same attribute names: wte, wpe, dropout)."""

    def __init__(self, embed: Embedding, group, sequence_parallel: bool = False):
        super().__init__()
        self.seq_len = embed.seq_len
        self.group = group
        self.sequence_parallel = sequence_parallel and get_world_size(group) > 1
        w = embed.wte.weight
        self.wte = VocabParallelEmbedding(w.shape[0], w.shape[1], group, sequence_parallel=self.sequence_parallel,
                                          init_method=None, dtype=w.dtype, device=w.device)
        self.wte.load_full_weight(w)
        self.wpe = embed.wpe
        self.dropout = _sp_dropout(embed.dropout, group) if self.sequence_parallel else embed.dropout

    def forward(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx)  # (B, T, C), or (B, T/tp, C) under sequence parallelism
        if self.wpe is not None:
            if start_pos + T > self.seq_len:
                raise ValueError(f"sequence of {start_pos + T} tokens exceeds the {self.seq_len} learned positions")
            pos = self.wpe(torch.arange(start_pos, start_pos + T, device=idx.device))  # (T, C)
            if self.sequence_parallel:  # this rank's rows; backward all-gathers the full gradient
                pos = scatter_to_sequence_parallel_region(pos, self.group, dim=0)
            x = x + pos
        return self.dropout(x)


def shard_embedding(embed: Embedding, group, sequence_parallel: bool = False) -> nn.Module:
    """The tensor-parallel version of a plain `Embedding` (itself when group is None)."""
    if get_world_size(group) == 1:
        return embed
    return ParallelEmbedding(embed, group, sequence_parallel)


def shard_block(block: Block, group, sequence_parallel: bool = False) -> Block:
    """Shard a plain `Block` in place (column/row-parallel linears, local head counts)."""
    tp = get_world_size(group)
    if tp == 1:
        return block
    sp = sequence_parallel
    attn = block.attn
    qkv = attn.qkv
    perm = qkv_permutation(attn.n_head, attn.n_kv_head, attn.head_dim, tp)
    new_qkv = ColumnParallelLinear(qkv.in_features, qkv.out_features, qkv.bias is not None, group,
                                   sequence_parallel=sp, init_method=None,
                                   dtype=qkv.weight.dtype, device=qkv.weight.device)
    with torch.no_grad():
        new_qkv.load_full_weight(qkv.weight[perm], None if qkv.bias is None else qkv.bias[perm])
    attn.qkv = new_qkv
    attn.proj = RowParallelLinear.from_linear(attn.proj, group, input_is_parallel=True, sequence_parallel=sp,
                                              init_method=None)
    attn.n_head //= tp
    attn.n_kv_head //= tp
    mlp = block.mlp
    for name in ("fc", "gate", "up"):
        if hasattr(mlp, name):
            setattr(mlp, name, ColumnParallelLinear.from_linear(getattr(mlp, name), group, sequence_parallel=sp,
                                                                init_method=None))
    for name in ("proj", "down"):
        if hasattr(mlp, name):
            setattr(mlp, name, RowParallelLinear.from_linear(getattr(mlp, name), group, input_is_parallel=True,
                                                             sequence_parallel=sp, init_method=None))
    if sp:
        _sp_norm(block.ln_1, group)
        _sp_norm(block.ln_2, group)
        _sp_dropout(attn.dropout, group)
        _sp_dropout(mlp.dropout, group)
    return block


class ParallelHead(nn.Module):
    """Final norm + vocab-parallel output projection: x -> this rank's logits (B, T, V/tp).

    The output weight is, in order: `weight=` if given; the own `lm_head` (untied); the
    registered `wte` table (a pipeline's last stage holds a tied copy of the embedding);
    or the referenced `tied_embedding.wte` (unregistered, as the plain Head).
    """

    def __init__(self, head: Head, group, sequence_parallel: bool = False, tied_embedding=None,
                 wte: Optional[nn.Module] = None):
        super().__init__()
        self.group = group
        tp = get_world_size(group)
        self.sequence_parallel = sequence_parallel and tp > 1
        self.ln_f = _sp_norm(head.ln_f, group) if self.sequence_parallel else head.ln_f
        self.lm_head = None
        if head.lm_head is not None:
            self.lm_head = ColumnParallelLinear.from_linear(head.lm_head, group, init_method=None) \
                if tp > 1 else head.lm_head
        if wte is not None:
            self.wte = wte
        object.__setattr__(self, "tied_embedding", tied_embedding)

    def _weight(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        if "wte" in self._modules:
            return self._modules["wte"].weight
        if self.tied_embedding is not None:
            return self.tied_embedding.wte.weight
        raise ValueError("tied ParallelHead without an embedding: pass weight=")

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's logits (B, T, V/tp); with `targets` the mean loss, fused and chunked."""
        h = self.ln_f(x)
        if self.sequence_parallel:  # (B, T/tp, C) -> (B, T, C); backward reduce-scatters
            h = gather_from_sequence_parallel_region(h, self.group, tensor_parallel_output_grad=True)
        else:  # identity forward, all-reduce of the input gradient backward
            h = copy_to_tensor_model_parallel_region(h, self.group)
        weight = self._weight() if weight is None else weight
        if targets is not None:
            return vocab_parallel_linear_cross_entropy(h, weight, targets, self.group)
        return F.linear(h, weight)  # (B, T, V/tp)


def shard_head(head: Head, group, sequence_parallel: bool = False, tied_embedding=None) -> nn.Module:
    """The tensor-parallel version of a plain `Head` (itself, re-tied, when group is None)."""
    if get_world_size(group) == 1:
        object.__setattr__(head, "tied_embedding", tied_embedding)
        return head
    return ParallelHead(head, group, sequence_parallel, tied_embedding=tied_embedding)


def parallel_loss(logits: torch.Tensor, targets: torch.Tensor, group, ignore_index: int = -100) -> torch.Tensor:
    """Mean fp32 cross entropy of vocab-sharded logits (B, T, V/tp) -- `gpt.loss_fn` for tp == 1."""
    if get_world_size(group) == 1:
        return loss_fn(logits, targets)
    per_token = vocab_parallel_cross_entropy(logits, targets, group, ignore_index=ignore_index)
    count = (targets != ignore_index).sum().clamp(min=1)
    return per_token.sum() / count


class ParallelGPT(GPT):
    """GPT whose layers are tensor-parallel over `group`; same parameter names as `GPT`.

    forward(idx, targets) returns the mean loss via `vocab_parallel_cross_entropy`; without
    targets it returns full logits (gathered: for evaluation tools, not for training).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, group, sequence_parallel: bool = False):
        nn.Module.__init__(self)  # not GPT.__init__: the layers come from plain_layers, sharded one by one
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.group = group
        self.sequence_parallel = sequence_parallel and get_world_size(group) > 1
        layers = plain_layers(cfg, vocab_size)
        sp = self.sequence_parallel
        self.embed = shard_embedding(next(layers), group, sp)
        self.blocks = nn.ModuleList(shard_block(next(layers), group, sp) for _ in range(cfg.n_layer))
        self.head = shard_head(next(layers), group, sp, tied_embedding=self.embed if cfg.tie_embeddings else None)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache=None,
                start_pos: int = 0) -> torch.Tensor:
        if cache is not None:
            raise NotImplementedError("KV-cache generation runs on the plain GPT (merge the checkpoint first)")
        x = self.embed(idx, start_pos)
        for block in self.blocks:
            x = block(x)
        if targets is None:
            return gather_from_tensor_model_parallel_region(self.head(x), self.group)  # (B, T, V)
        return self.head(x, targets=targets)  # = parallel_loss(self.head(x), ...), in chunks

    def make_cache(self, *args, **kwargs):
        raise NotImplementedError("KV-cache generation runs on the plain GPT (merge the checkpoint first)")


def build_model(cfg, layout, topo) -> nn.Module:
    """The model of this rank for `layout`: plain GPT, ParallelGPT (tp > 1) or a pipeline stage
    (pp > 1). Call under the run's seed: every variant draws the same full weights."""
    if layout.pp > 1:
        from pretrain.parallel.pipeline import build_pipeline

        return build_pipeline(cfg, layout, topo)
    if layout.tp > 1:
        return ParallelGPT(cfg.model, layout.padded_vocab_size, topo.tp_group, cfg.parallel.sequence_parallel)
    return GPT(cfg.model, layout.padded_vocab_size)


def parallel_param_groups(model: nn.Module, optim) -> list[dict]:
    """`gpt.param_groups`, also treating vocab-parallel embedding tables as embeddings
    (no weight decay unless optim.decay_embeddings), like `nn.Embedding` in the plain model."""
    groups = param_groups(model, optim.weight_decay, decay_norms_and_biases=optim.decay_norms_and_biases,
                          decay_embeddings=optim.decay_embeddings)
    if optim.decay_embeddings or optim.weight_decay == 0:
        return groups
    vocab = {id(p) for m in model.modules() if isinstance(m, VocabParallelEmbedding)
             for p in m.parameters(recurse=False)}
    if not vocab:
        return groups
    decay_ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]} - vocab
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    out = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in out if g["params"]]


# ----------------------------------------------------------------------------- merging
_DIM0 = re.compile(r"(^|\.)(wte\.weight|lm_head\.weight|mlp\.(fc|gate|up)\.(weight|bias))$")
_DIM1 = re.compile(r"(^|\.)(attn\.proj\.weight|mlp\.(proj|down)\.weight)$")
_QKV = re.compile(r"(^|\.)attn\.qkv\.(weight|bias)$")


def tp_partition_dim(name: str) -> Optional[int]:
    """The dim along which the plain-GPT parameter `name` is split over TP ranks (None: replicated)."""
    if _DIM0.search(name) or _QKV.search(name):
        return 0
    if _DIM1.search(name):
        return 1
    return None


def merge_tp_shards(shards: list[dict], cfg: ModelConfig) -> dict:
    """One plain state dict from the per-TP-rank state dicts (rank order) of plain-GPT names."""
    tp = len(shards)
    if tp == 1:
        return dict(shards[0])
    n_kv = cfg.n_kv_head or cfg.n_head
    perm = qkv_permutation(cfg.n_head, n_kv, cfg.d_model // cfg.n_head, tp)
    out = {}
    for name, first in shards[0].items():
        dim = tp_partition_dim(name)
        if dim is None:
            out[name] = first
            continue
        full = torch.cat([s[name] for s in shards], dim=dim)
        if _QKV.search(name):
            plain = torch.empty_like(full)
            plain[perm] = full
            full = plain
        out[name] = full
    return out
