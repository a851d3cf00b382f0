"""Tensor parallelism applied to the plain GPT from outside, in one place.

The model code (`pretrain.model`) knows nothing about distribution. Here its layers are
built on the meta device exactly as `GPT(cfg, vocab_size)` builds them, each layer is
replaced by its tensor-parallel form (still on the meta device), and only then is this
rank's piece of every parameter allocated on its device and filled: each parameter's initial
value is drawn in fixed tiles, each from its own generator seeded by (seed, name, tile)
(`params`), and a rank draws only the tiles that cover its piece (`spec.initialize`, by the
parameter spec). So TP=1 and TP=k start from the same weights for the same seed, and a rank
draws about its own share.

What becomes what (Megatron's layout; tp = tensor-parallel degree; the split dimensions
and the qkv regrouping are the spec's):

    embed.wte                 VocabParallelEmbedding (rows split over ranks)
    embed.wpe                 replicated (under sequence parallelism: sliced along T)
    blocks.i.attn.qkv         ColumnParallelLinear, rows regrouped per rank as
                              [q heads of rank r | its kv heads k | v] (`spec.qkv_permutation`)
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
tensor-parallel pieces merge back into a plain state dict (`spec.merge_state`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config.schema import ModelConfig
from pretrain.model.gpt import GPT, loss_fn
from pretrain.model.layers import Block, Embedding, Head, RMSNorm, rms_norm
from pretrain.parallel import spec
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
    "shard_embedding", "shard_block", "shard_head", "materialize",
    "ParallelEmbedding", "ParallelHead", "ParallelGPT", "SPDropout", "parallel_loss",
]


# ----------------------------------------------------------------------------- building
def materialize(module: nn.Module, cfg: ModelConfig, group, device, seed: int, prefix: str = "",
                source: Optional[spec.Source] = None) -> nn.Module:
    """Allocate a meta-device `module` (a layer, or a whole model) on `device` and fill this
    tensor-parallel rank's piece of every parameter (`spec.initialize`: the initial value
    of (seed, name), or `source`'s full tensors). `prefix`: the module's plain-name prefix."""
    marks = {n: dict(vars(p)) for n, p in module.named_parameters()}  # tensor_model_parallel, partition_dim, ...
    module.to_empty(device=device)  # new Parameter objects (meta -> device): restore their marks
    for n, p in module.named_parameters():
        for k, v in marks[n].items():
            setattr(p, k, v)
    spec.initialize(module, cfg, seed, tp=get_world_size(group), tp_rank=get_rank(group), prefix=prefix,
                    source=source)
    return module


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
        return rms_norm(x, sequence_parallel_param(self.weight, self.group), self.eps)


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


class ParallelEmbedding(Embedding):
    """`Embedding` with a vocab-parallel token table (same attribute names: wte, wpe, dropout)."""

    group = None
    sequence_parallel = False

    def forward(self, idx: torch.Tensor, start_pos: int = 0, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.wte(idx)  # (B, T, C), or (B, T/tp, C) under sequence parallelism
        p = self.positions(start_pos, idx.size(1), idx.device, pos)  # (T, C), (B, T, C) or None
        if p is not None and self.sequence_parallel:  # this rank's rows; backward all-gathers the gradient
            p = scatter_to_sequence_parallel_region(p, self.group, dim=p.dim() - 2)
        return self.dropout(x if p is None else x + p)


def _like(module: nn.Module) -> dict:
    p = next(module.parameters())
    return {"dtype": p.dtype, "device": p.device}


def shard_embedding(embed: Embedding, group, sequence_parallel: bool = False) -> nn.Module:
    """The tensor-parallel version of a plain `Embedding`, in place (itself when group is None).
    Weights are not copied: build on the meta device, then `materialize`."""
    if get_world_size(group) == 1:
        return embed
    sp = sequence_parallel
    w = embed.wte.weight
    embed.wte = VocabParallelEmbedding(w.shape[0], w.shape[1], group, sequence_parallel=sp, init_method=None,
                                       **_like(embed.wte))
    embed.__class__ = ParallelEmbedding
    embed.group, embed.sequence_parallel = group, sp
    if sp:
        _sp_dropout(embed.dropout, group)
    return embed


def shard_block(block: Block, group, sequence_parallel: bool = False) -> Block:
    """Shard a plain `Block` in place (column/row-parallel linears, local head counts). Weights
    are not copied: build on the meta device, then `materialize`."""
    tp = get_world_size(group)
    if tp == 1:
        return block
    sp = sequence_parallel

    def column(lin: nn.Linear) -> ColumnParallelLinear:
        return ColumnParallelLinear(lin.in_features, lin.out_features, lin.bias is not None, group,
                                    sequence_parallel=sp, init_method=None, **_like(lin))

    def row(lin: nn.Linear) -> RowParallelLinear:
        return RowParallelLinear(lin.in_features, lin.out_features, lin.bias is not None, group,
                                 input_is_parallel=True, sequence_parallel=sp, init_method=None, **_like(lin))

    def split(lin: nn.Linear, plain: str) -> nn.Module:
        """Column- or row-parallel as the spec's split dimension of the weight says (0: output rows)."""
        dim = spec.rule_of(plain).tp_dim
        layer = column(lin) if dim == 0 else row(lin)
        assert layer.weight.partition_dim == dim, plain  # the layer type agrees with the spec
        return layer

    attn, mlp = block.attn, block.mlp
    spec.qkv_permutation(attn.n_head, attn.n_kv_head, attn.head_dim, tp)  # checks the head counts divide
    attn.qkv, attn.proj = split(attn.qkv, "blocks.0.attn.qkv.weight"), split(attn.proj, "blocks.0.attn.proj.weight")
    attn.n_head //= tp
    attn.n_kv_head //= tp
    for name in ("fc", "gate", "up", "proj", "down"):
        if hasattr(mlp, name):
            setattr(mlp, name, split(getattr(mlp, name), f"blocks.0.mlp.{name}.weight"))
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
        self.lm_head = head.lm_head
        if head.lm_head is not None and tp > 1:
            self.lm_head = ColumnParallelLinear(head.lm_head.in_features, head.lm_head.out_features, False, group,
                                                init_method=None, **_like(head.lm_head))
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
                targets: Optional[torch.Tensor] = None, denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's logits (B, T, V/tp); with `targets` the mean loss, fused and chunked
        (`denominator`: as `Head`)."""
        h = self.ln_f(x)
        if self.sequence_parallel:  # (B, T/tp, C) -> (B, T, C); backward reduce-scatters
            h = gather_from_sequence_parallel_region(h, self.group, tensor_parallel_output_grad=True)
        else:  # identity forward, all-reduce of the input gradient backward
            h = copy_to_tensor_model_parallel_region(h, self.group)
        weight = self._weight() if weight is None else weight
        if targets is not None:
            return vocab_parallel_linear_cross_entropy(h, weight, targets, self.group, denominator=denominator)
        return F.linear(h, weight)  # (B, T, V/tp)


def shard_head(head: Head, group, sequence_parallel: bool = False, tied_embedding=None) -> nn.Module:
    """The tensor-parallel version of a plain `Head` (itself, re-tied, when group is None).
    Weights are not copied: build on the meta device, then `materialize`."""
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

    def __init__(self, cfg: ModelConfig, vocab_size: int, group, sequence_parallel: bool = False, *,
                 device=None, seed: Optional[int] = None, source: Optional[spec.Source] = None):
        """`device`, `seed` as for `GPT` ("meta": left unallocated); `source`: full tensors by
        plain name instead of the initial values (imported weights)."""
        GPT.__init__(self, cfg, vocab_size, device="meta")  # the plain layers, unallocated
        self.group = group
        self.sequence_parallel = sp = sequence_parallel and get_world_size(group) > 1
        shard_embedding(self.embed, group, sp)
        for block in self.blocks:
            shard_block(block, group, sp)
        self.head = shard_head(self.head, group, sp, tied_embedding=self.embed if cfg.tie_embeddings else None)
        device = torch.get_default_device() if device is None else torch.device(device)
        if device.type != "meta":
            materialize(self, cfg, group, device, spec.draw_seed() if seed is None else seed, source=source)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache=None,
                start_pos: int = 0, *, doc: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
                denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is not None:
            raise NotImplementedError("KV-cache generation runs on the plain GPT (merge the checkpoint first)")
        x = self.embed(idx, start_pos, pos)
        for block in self.blocks:
            x = block(x, doc=doc, pos=pos)  # doc, pos: whole (B, T) on every rank, also under SP
        if targets is None:
            return gather_from_tensor_model_parallel_region(self.head(x), self.group)  # (B, T, V)
        return self.head(x, targets=targets, denominator=denominator)  # = parallel_loss(self.head(x), ...), in chunks

    def make_cache(self, *args, **kwargs):
        raise NotImplementedError("KV-cache generation runs on the plain GPT (merge the checkpoint first)")
