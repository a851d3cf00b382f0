"""The GPT's layer modules: Embedding -> Block x n_layer -> Head, plus their parts.

Each layer is a self-contained nn.Module, so a pipeline-parallel wrapper can build any
subset of them on a stage and call them in sequence (`x = layer(x)`). See `gpt.py` for the
parameter naming scheme. The modules do not choose their initial weights: the builders
(`GPT`, `pretrain.parallel.apply`) fill them from `pretrain.parallel.spec` by name.

Shapes: B batch, T sequence (new tokens), S keys (cached + new), C d_model,
nh query heads, nkv key/value heads, hd head_dim, V (padded) vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.config.schema import ModelConfig
from pretrain.errors import UserError
from pretrain.model import documents
from pretrain.model.loss import linear_cross_entropy


def resolve_d_ff(cfg: ModelConfig) -> int:
    """MLP hidden width (see ModelConfig.ffn_dim)."""
    return cfg.ffn_dim()


def check_config(cfg: ModelConfig) -> None:
    """Raise UserError for a ModelConfig the model cannot be built from."""
    if cfg.position not in ("learned", "rope"):
        raise UserError(f"model.position must be 'learned' or 'rope', got {cfg.position!r}")
    if cfg.norm not in ("layernorm", "rmsnorm"):
        raise UserError(f"model.norm must be 'layernorm' or 'rmsnorm', got {cfg.norm!r}")
    if cfg.mlp not in ("gelu", "swiglu"):
        raise UserError(f"model.mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"model.n_head ({cfg.n_head}) must divide model.d_model ({cfg.d_model})")
    n_kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % n_kv:
        raise UserError(f"model.n_kv_head ({n_kv}) must divide model.n_head ({cfg.n_head})")
    if cfg.position == "rope" and (cfg.d_model // cfg.n_head) % 2:
        raise UserError(f"position: rope needs an even head dim, got d_model/n_head = {cfg.d_model // cfg.n_head}")


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (with bias iff cfg.bias) or RMSNorm; parameters `weight` [and `bias`]."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): x / rms(x) * weight, normalised in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, normalised in fp32 (RMSNorm's forward, shared with its sequence-parallel form)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


# ----------------------------------------------------------------------------- RoPE

def rope_cos_sin(T: int, head_dim: int, theta: float, start_pos: int = 0,
                 device: Optional[torch.device] = None,
                 pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, hd) for absolute positions start_pos..start_pos+T-1, in fp32; with
    `pos` (B, T), position ids per token (documents restarting at 0), of shape (B, 1, T, hd).

    Computed on the fly (cheap) rather than stored as a buffer, so that casting the
    model to bf16 never degrades the angles.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if pos is None:
        p = torch.arange(start_pos, start_pos + T, device=device, dtype=torch.float32)
        freqs = torch.outer(p, inv_freq)  # (T, hd/2)
    else:
        freqs = (pos.to(torch.float32).unsqueeze(-1) * inv_freq).unsqueeze(1)  # (B, 1, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd) or (B, 1, T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, h, T, hd) by the angles in cos/sin (T, hd) or (B, 1, T, hd).

    "rotate_half" convention (GPT-NeoX / HF Llama): dim i is paired with dim i + hd/2,
    so HF Llama q/k weights load without permutation.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values of one attention layer: k, v of shape (B, nkv, max_len, hd)."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at positions start_pos..start_pos+T-1; return all keys/values so far."""
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > max_len {self.max_len}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nkv, S, hd), S = end


# ----------------------------------------------------------------------------- block parts

class CausalSelfAttention(nn.Module):
    """Multi-head / grouped-query causal self-attention with a fused qkv projection.

    qkv output layout: [q (nh*hd) | k (nkv*hd) | v (nkv*hd)], each head-major. With
    GQA, query head h reads key/value head h // (nh // nkv) (as HF Llama's repeat_kv).

    `doc` (B, T) document ids make the attention block-causal within documents and `pos`
    (B, T) gives per-token positions to RoPE (`pretrain.model.documents`); `doc_path` is how
    the block-causal attention runs ('sdpa' or 'flex', set by `use_document_path`).
    """

    doc_path = "sdpa"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, start_pos: int = 0,
                doc: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)  # (B, T, (nh + 2*nkv)*hd); T from qkv: a sequence-parallel qkv gathers x's T/tp rows
        B, T = qkv.shape[:2]
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(T, hd, self.rope_theta, start_pos, x.device, pos)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, nkv, S, hd)
        S = k.size(2)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        if S == T:  # no earlier keys: causal, or block-causal within documents
            y = documents.attend(q, k, v, doc, self.doc_path)
        elif T == 1:  # one new token attends to everything before it
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # query i sits at absolute position S - T + i: allow keys j <= S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh*hd)
        return self.dropout(self.proj(y))  # (B, T, C)


def use_document_path(model: nn.Module, path: str) -> int:
    """Set how every attention layer of `model` (plain, tensor-parallel or a pipeline stage) runs
    block-causal attention ('sdpa' or 'flex', `documents.attend`); returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    for layer in layers:
        layer.doc_path = path
    return len(layers)


class MLP(nn.Module):
    """GPT-2 MLP: proj(gelu_tanh(fc(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = resolve_d_ff(cfg)
        self.fc = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))  # (B, T, C)


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = resolve_d_ff(cfg)
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C)


# ----------------------------------------------------------------------------- layers

class Embedding(nn.Module):
    """idx (B, T) -> x (B, T, C): token embedding wte + learned positions wpe (if any) + dropout."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.seq_len = cfg.seq_len
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def positions(self, start_pos: int, T: int, device, pos: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The learned position embeddings (T, C) of positions start_pos.., or (B, T, C) of the
        position ids `pos` (B, T); None with rope."""
        if self.wpe is None:
            return None
        if pos is not None:
            return self.wpe(pos)
        if start_pos + T > self.seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the {self.seq_len} learned positions")
        return self.wpe(torch.arange(start_pos, start_pos + T, device=device))

    def forward(self, idx: torch.Tensor, start_pos: int = 0, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.wte(idx)  # (B, T, C)
        p = self.positions(start_pos, idx.size(1), idx.device, pos)
        return self.dropout(x if p is None else x + p)  # (T, C) broadcast, or (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    With `activation_checkpointing` (a plain attribute, may be toggled) the block's
    activations are recomputed in backward (torch.utils.checkpoint, non-reentrant;
    the RNG state is restored so dropout masks match). Never used with a KV cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation_checkpointing = cfg.activation_checkpointing
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def _forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, start_pos: int = 0,
                 doc: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start_pos, doc, pos)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, start_pos: int = 0,
                doc: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`doc`, `pos` (B, T): document ids and position ids of a packed window (see
        `CausalSelfAttention`), or None."""
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, None, 0, doc, pos, use_reentrant=False)
        return self._forward(x, cache, start_pos, doc, pos)


class Head(nn.Module):
    """x (B, T, C) -> logits (B, T, V): final norm ln_f, then the output projection.

    Untied (cfg.tie_embeddings false): owns `lm_head` (Linear C->V, no bias).
    Tied: owns no output weight. It uses `tied_embedding.wte.weight`, held as a plain
    (unregistered) reference so the weight is counted, saved and optimised once, under
    the embedding. A pipeline stage without that reference (e.g. holding a copy of the
    embedding via DeepSpeed TiedLayerSpec) passes the weight explicitly:
    `head(x, weight=embed.wte.weight)`; an explicit weight always wins.
    (ZeRO-3: the trainer registers the tied weight as an external parameter of the head.)
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, tied_embedding: Optional[Embedding] = None):
        super().__init__()
        self.ln_f = make_norm(cfg)
        self.lm_head = None
        if not cfg.tie_embeddings:
            if tied_embedding is not None:
                raise ValueError("tied_embedding given but cfg.tie_embeddings is false")
            self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        # Bypass nn.Module.__setattr__ so the embedding is not registered as a submodule.
        object.__setattr__(self, "tied_embedding", tied_embedding)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, V); with `targets` (B, T) the mean fp32 loss instead, fused with the
        projection so the logits are never held whole (`pretrain.model.loss`); `denominator`:
        divide the summed token losses by it instead of by this batch's own count."""
        if weight is None:
            if self.lm_head is not None:
                weight = self.lm_head.weight
            elif self.tied_embedding is not None:
                weight = self.tied_embedding.wte.weight
            else:
                raise ValueError("tied Head without an embedding reference: pass weight=embed.wte.weight")
        if targets is not None:
            return linear_cross_entropy(self.ln_f(x), weight, targets, denominator=denominator)
        return F.linear(self.ln_f(x), weight)  # (B, T, V)
