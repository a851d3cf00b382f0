"""Autoregressive generation with a KV cache: prefill the prompt, then one token at a time.

Context limit: the model conditions on at most `model.cfg.seq_len` tokens (learned
positions stop there; RoPE models were trained no further). Generation therefore
*stops* when prompt + generated tokens reach seq_len: the result may be shorter than
T0 + max_new_tokens. A prompt longer than seq_len is an error (crop it yourself, e.g.
`idx[:, -seq_len:]`).

Sampling per step on the last position's fp32 logits: temperature 0 = greedy (argmax);
otherwise logits / temperature, then top-k, then top-p (nucleus), then a multinomial
draw with the optional `generator` (same generator state -> same tokens).
"""
from __future__ import annotations

from typing import Optional

import torch


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V) -> (B, 1) LongTensor."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass of the tokens ranked above it already reaches top_p
        # (the most likely token is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1), weights need not sum to 1


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
             *, use_cache: bool = True, valid_vocab: Optional[int] = None) -> torch.Tensor:
    """Continue the prompts idx (B, T0) -> (B, T0 + n) with n <= max_new_tokens.

    model: a `GPT` (needs .cfg.seq_len, .make_cache and forward(idx, cache=, start_pos=)).
    eos_id: a row that produced eos_id keeps emitting eos_id; generation ends early once
    every row has. use_cache=False recomputes the full sequence each step (reference
    path, same results). valid_vocab: mask logits of ids >= valid_vocab (the padding of
    the embedding table) so they are never produced. The model is put in eval mode for
    the call and restored afterwards.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a non-empty (B, T0) tensor, got shape {tuple(idx.shape)}")
    seq_len = model.cfg.seq_len
    B, T0 = idx.shape
    if T0 > seq_len:
        raise ValueError(f"prompt of {T0} tokens is longer than the model context seq_len={seq_len}")
    n_new = max(0, min(max_new_tokens, seq_len - T0))

    was_training = model.training
    model.eval()
    try:
        out = idx
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = model.make_cache(B, max_len=seq_len, device=idx.device) if use_cache else None
        new, pos = idx, 0  # tokens not yet in the cache, and their first position
        for _ in range(n_new):
            if use_cache:
                logits = model(new, cache=cache, start_pos=pos)  # (B, T_new, V)
                pos += new.size(1)
            else:
                logits = model(out)  # (B, T, V)
            logits = logits[:, -1, :]  # (B, V)
            if valid_vocab is not None:
                logits = logits.clone()
                logits[:, valid_vocab:] = float("-inf")
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished[:, None], eos_id)
                finished |= nxt[:, 0] == eos_id
            out = torch.cat([out, nxt], dim=1)
            new = nxt
            if eos_id is not None and bool(finished.all()):
                break
        return out
    finally:
        model.train(was_training)
