"""The GPT model (no DeepSpeed / torch.distributed): layers, full model, param groups, sampling."""
from pretrain.model.gpt import GPT, loss_fn, param_groups
from pretrain.model.layers import Block, Embedding, Head, KVCache, resolve_d_ff
from pretrain.model.sampling import generate, sample_logits

__all__ = ["GPT", "loss_fn", "param_groups", "Block", "Embedding", "Head", "KVCache", "resolve_d_ff",
           "generate", "sample_logits"]
