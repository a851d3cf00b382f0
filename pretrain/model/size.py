"""The model's own sizes: parameter counts by kind and FLOPs per token, from its config alone.

Parameter count (`count_params`) follows the model exactly (a test compares it with
`pretrain.model.gpt.GPT`): per block two norms, a fused qkv projection with
(n_head + 2*n_kv_head)*head_dim outputs, an output projection and the MLP (gelu: fc and
proj; swiglu: gate, up and down); then a final norm, the token embedding (padded
vocabulary), learned positions when model.position is 'learned', and an untied head.
model.bias false removes every linear and norm bias; RMSNorm has no bias.

FLOPs per token (`flops_per_token`) = 6*N + 12*L*d*T, the PaLM / nanoGPT / llm.c
convention (REFERENCE.md, baseline/plain_gpt.py): N is every parameter except the
position embeddings, i.e. every parameter that takes part in a matmul (with tied
embeddings the token embedding is the output head's matrix). For an untied head the
input token embedding is a lookup-only table too and is left out of N as well, so the
head is counted once; this equals `GPT.num_params(non_embedding=True)`. 6N is the
forward (2N) and backward (4N) of the weight matmuls; 12*L*d*T is the attention-score
and weighted-sum matmuls (forward + backward) at full, non-causal cost.
How it differs from the others:
  * HF / Kaplan "6N" ignores attention (the 12*L*d*T term) and excludes the embedding
    and output head, so it reports lower FLOPs (and MFU) than this, most at long T;
  * Megatron-LM's formula (Narayanan et al. 2021, 72*B*T*L*d^2*(1 + T/(6d) + V/(12*L*d)))
    counts the QKV/out/MLP matmuls, attention and logits explicitly, assuming 4d MLPs and
    no GQA (it agrees with this one for GPT-2 shapes up to the biases and norms); with
    activation recomputation it adds the recomputed forward (96 instead of 72), i.e.
    hardware FLOPs, whereas this is model FLOPs (recomputation is not counted).
MFU = tokens/s x flops_per_token / peak FLOP/s (what REFERENCE.md measures with).
"""
from __future__ import annotations

from pretrain.config.schema import ModelConfig

__all__ = ["ffn_dim", "head_dim", "kv_heads", "count_params", "matmul_params", "flops_per_token"]


def ffn_dim(m: ModelConfig) -> int:
    return m.ffn_dim()


def head_dim(m: ModelConfig) -> int:
    return m.d_model // m.n_head


def kv_heads(m: ModelConfig) -> int:
    return m.n_kv_head if m.n_kv_head is not None else m.n_head


def _norm_params(m: ModelConfig) -> int:
    return m.d_model * (2 if (m.norm == "layernorm" and m.bias) else 1)


def _block_params(m: ModelConfig) -> int:
    d, f, hd = m.d_model, ffn_dim(m), head_dim(m)
    q_out = m.n_head * hd
    qkv_out = (m.n_head + 2 * kv_heads(m)) * hd
    attn = d * qkv_out + q_out * d + ((qkv_out + d) if m.bias else 0)
    if m.mlp == "swiglu":
        mlp = 3 * d * f + ((2 * f + d) if m.bias else 0)
    else:
        mlp = 2 * d * f + ((f + d) if m.bias else 0)
    return attn + mlp + 2 * _norm_params(m)


def count_params(model_cfg: ModelConfig, padded_vocab: int) -> dict[str, int]:
    """Parameter counts of the model (tied weights once).

    total; embedding = token embedding + learned positions + untied head;
    non_embedding = total - embedding (blocks and final norm); plus the parts:
    token_embedding, position_embedding, head (0 when tied), per_block, blocks, final_norm.
    """
    m = model_cfg
    wte = padded_vocab * m.d_model
    wpe = m.seq_len * m.d_model if m.position == "learned" else 0
    head = 0 if m.tie_embeddings else padded_vocab * m.d_model
    per_block = _block_params(m)
    blocks = m.n_layer * per_block
    final_norm = _norm_params(m)
    total = wte + wpe + head + blocks + final_norm
    embedding = wte + wpe + head
    return {
        "total": total, "embedding": embedding, "non_embedding": total - embedding,
        "token_embedding": wte, "position_embedding": wpe, "head": head,
        "per_block": per_block, "blocks": blocks, "final_norm": final_norm,
    }


def matmul_params(model_cfg: ModelConfig, padded_vocab: int) -> int:
    """N of the FLOPs formula: all parameters except lookup-only tables (position
    embeddings, and the token embedding when the head is untied)."""
    c = count_params(model_cfg, padded_vocab)
    n = c["total"] - c["position_embedding"]
    if not model_cfg.tie_embeddings:
        n -= c["token_embedding"]
    return n


def flops_per_token(model_cfg: ModelConfig, padded_vocab: int) -> int:
    """Training (model) FLOPs per token: 6*N + 12*L*d*T, N = `matmul_params`."""
    n = matmul_params(model_cfg, padded_vocab)
    m = model_cfg
    return 6 * n + 12 * m.n_layer * m.d_model * m.seq_len
