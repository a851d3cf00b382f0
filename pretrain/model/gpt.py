"""Decoder-only GPT: GPT-2 by default, Llama-style options from ModelConfig.

    idx (B, T) -> Embedding -> Block x n_layer -> Head -> logits (B, T, V)

Options: position learned|rope, norm layernorm|rmsnorm, mlp gelu|swiglu, grouped-query
attention (n_kv_head), tied or untied output head, biases on/off, dropout, activation
checkpointing. No DeepSpeed and no torch.distributed here: parallel wrappers reuse the
layers from `GPT.layers()`.

Parameter names (state_dict keys) and their HF equivalents
(GPT-2 Conv1D weights are stored transposed in HF: ours = theirs.T):

    ours                          HF GPT2 (transformer.*)   HF Llama (model.*)
    embed.wte.weight              wte.weight                embed_tokens.weight
    embed.wpe.weight              wpe.weight                (rope: absent)
    blocks.{i}.ln_1.{weight,bias} h.{i}.ln_1                layers.{i}.input_layernorm
    blocks.{i}.attn.qkv.{w,b}     h.{i}.attn.c_attn         cat([q_proj, k_proj, v_proj], dim 0)
    blocks.{i}.attn.proj.{w,b}    h.{i}.attn.c_proj         layers.{i}.self_attn.o_proj
    blocks.{i}.ln_2.{weight,bias} h.{i}.ln_2                layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.fc.{w,b}       h.{i}.mlp.c_fc            (swiglu) mlp.gate / mlp.up =
    blocks.{i}.mlp.proj.{w,b}     h.{i}.mlp.c_proj            gate_proj / up_proj, mlp.down = down_proj
    head.ln_f.{weight,bias}       ln_f                      norm
    head.lm_head.weight           (tied: absent)            lm_head.weight (untied only)

The fused qkv output is [q (n_head*hd) | k (n_kv_head*hd) | v (n_kv_head*hd)]. RoPE uses
the rotate_half (GPT-NeoX / HF Llama) pairing, so HF Llama q/k weights need no permutation.
With tied embeddings the output head uses embed.wte.weight; there is no head.lm_head key.

Initialisation (GPT-2): normal(0, init_std) for linear and embedding weights, zero biases,
unit norm gains, and std init_std/sqrt(2*n_layer) for the residual output projections
(attn.proj, mlp.proj / mlp.down), as `pretrain.model.params` states per name. The layers
are built on the meta device, then each parameter is filled from its own generator, seeded
by (seed, name): `GPT(cfg, V, seed=s)` is a function of s, and without a seed one value
is drawn from torch's default generator (so `torch.manual_seed` makes construction
deterministic). Every parallel layout builds the same weights the same way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config.schema import ModelConfig
from pretrain.model.layers import Block, Embedding, Head, KVCache, check_config
from pretrain.model import params


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions, computed in fp32. logits (B, T, V), targets (B, T).

    Targets equal to -100 are ignored (F.cross_entropy's ignore_index).
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


class GPT(nn.Module):
    """The whole model. `vocab_size` is the (already padded) embedding-table size.

    `device`: where the parameters live (default: torch's default device); "meta" leaves
    them unallocated and uninitialised (for builders that materialise pieces themselves).
    `seed`: the initial weights' seed (default: drawn from torch's default generator).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, device=None, seed: Optional[int] = None):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.vocab_size = vocab_size
        with torch.device("meta"):
            self.embed = Embedding(cfg, vocab_size)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.head = Head(cfg, vocab_size, tied_embedding=self.embed if cfg.tie_embeddings else None)
        device = torch.get_default_device() if device is None else torch.device(device)
        if device.type != "meta":
            self.to_empty(device=device)
            params.initialize(self, cfg, params.draw_seed() if seed is None else seed)

    def layers(self) -> list[nn.Module]:
        """[embed, *blocks, head]: applying them in sequence is the forward pass (without loss)."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[list[KVCache]] = None, start_pos: int = 0, *, doc: Optional[torch.Tensor] = None,
                pos: Optional[torch.Tensor] = None, denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V), or the mean fp32 loss when targets (B, T) are given.

        With `cache` (from `make_cache`), idx holds the tokens at absolute positions
        start_pos..start_pos+T-1; their keys/values are appended to the cache and they
        attend to everything cached before them.
        Packed documents (`pretrain.model.documents`): `doc` (B, T) document ids make attention
        block-causal, `pos` (B, T) position ids restart positions; `denominator` divides the
        summed token losses instead of their count (the trainer's global-batch mean).
        """
        x = self.embed(idx, start_pos, pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i], start_pos, doc, pos)  # (B, T, C)
        if targets is None:
            return self.head(x)  # (B, T, V)
        return self.head(x, targets=targets, denominator=denominator)  # = loss_fn(self.head(x), targets), in chunks

    def make_cache(self, batch_size: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> list[KVCache]:
        """One empty KVCache per block, for up to max_len (default seq_len) positions.

        dtype/device default to those of the model's parameters.
        """
        p = next(self.parameters())
        cfg = self.cfg
        return [KVCache(batch_size, cfg.n_kv_head or cfg.n_head, max_len or cfg.seq_len, cfg.d_model // cfg.n_head,
                        dtype=dtype or p.dtype, device=device or p.device) for _ in self.blocks]

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of (unique) parameters.

        non_embedding=True leaves out the lookup-only tables: the position embedding wpe, and
        the token embedding wte when untied (tied, wte is also the output matmul and is kept).
        This is nanoGPT's / the baseline's N for FLOPs: 6N + 12*L*d*T per token.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.embed.wpe is not None:
                n -= self.embed.wpe.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.embed.wte.weight.numel()
        return n
