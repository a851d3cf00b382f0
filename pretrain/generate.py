"""Sample text from a checkpoint: `python -m pretrain.generate --checkpoint RUN_DIR --prompt TEXT`.

Uses the tokenizer recorded in the run's data manifest and the model's KV cache.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pretrain.checkpoint import store
from pretrain.config.load import config_from_dict
from pretrain.data.tokenizer import checkpoint_tokenizer
from pretrain.errors import HelpFormatter, UserError, cli_entry
from pretrain.interop.ds_reader import load_model_weights
from pretrain.model.gpt import GPT
from pretrain.model.sampling import generate, sample_logits


def load_model(tag_dir, device: torch.device) -> tuple[GPT, dict]:
    state = store.read_state(tag_dir)
    cfg = config_from_dict(state["config"], source=str(tag_dir / store.STATE))
    model = GPT(cfg.model, state["model_shape"]["padded_vocab_size"])
    weights = load_model_weights(tag_dir)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A tied head has no tensor of its own in some saves; anything else missing is an error.
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k.startswith("head."))]
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); was it written by another version?")
    return model.to(device).eval(), state


def heal_prompt(tok, prompt: str, ids: list[int]) -> tuple[list[int], str, list[int] | None]:
    """Token healing for a prompt that ends in whitespace ("def ").

    A byte-level BPE spells a word with its leading space ("Ġname"), so "def " encodes as
    [def, Ġ]: a lone space token the model rarely saw before a word, and it degenerates.
    Drop that token and let the first new token start with the same whitespace instead.
    Returns (ids, the prompt text kept, allowed first-token ids or None when nothing changed).
    """
    if len(ids) < 2 or not prompt[-1:].isspace():
        return ids, prompt, None
    tail = tok.decode(ids[-1:])
    if not tail or tail.strip() or not prompt.endswith(tail):
        return ids, prompt, None
    allowed = [i for i in range(tok.vocab_size) if i != tok.eos_id
               and len(piece := tok.decode([i])) > len(tail) and piece.startswith(tail)]
    if not allowed:  # e.g. the byte tokenizer: a space is the only way to write a space
        return ids, prompt, None
    return ids[:-1], prompt[:-len(tail)], allowed


def sample_texts(tag_dir, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
                 tokenizer: str | None = None, device: str = "cpu", num_samples: int = 1) -> list[str]:
    """`num_samples` continuations of `prompt`, drawn as one batch (reproducible for a seed)."""
    dev = torch.device(device)
    tok = checkpoint_tokenizer(store.tokenizer_dir(tag_dir, store.read_state(tag_dir)), tokenizer, tag_dir)  # fail fast
    model, state = load_model(tag_dir, dev)
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.eos_id if tok.eos_id is not None else 0]
    ids, kept, allowed = heal_prompt(tok, prompt, ids)
    idx = torch.tensor([ids[-model.cfg.seq_len + 1:]] * num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    first = idx[:, :0]
    if allowed is not None and max_new_tokens > 0:  # the healed first token, then the rest as usual
        with torch.no_grad():
            logits = model(idx)[:, -1, :].float()
        mask = torch.full_like(logits, float("-inf"))
        mask[:, allowed] = 0.0
        first = sample_logits(logits + mask, temperature, top_k, top_p, gen)
        idx, max_new_tokens = torch.cat([idx, first], dim=1), max_new_tokens - 1
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=gen, eos_id=tok.eos_id, valid_vocab=tok.vocab_size)
    start = idx.size(1) - first.size(1)
    return [kept + tok.decode([t for t in row[start:].tolist() if t != tok.eos_id]) for row in out]


def sample_text(tag_dir, prompt: str, max_new_tokens: int = 100, **kw) -> str:
    """One continuation of `prompt` (see `sample_texts`)."""
    return sample_texts(tag_dir, prompt, max_new_tokens, **kw)[0]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-generate", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ dir, or a step_* dir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override the recorded tokenizer (byte, hf:PATH, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-samples", "-n", type=int, default=1, help="samples to draw (one batch)")
    return p.parse_args(argv)


def check_args(a) -> None:
    """One line naming the option and its valid range, before any model is loaded."""
    import math

    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if a.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {a.num_samples}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise UserError(f"--temperature {a.temperature}: must be a finite number >= 0 (0 = greedy)")
    if a.top_k < 0:
        raise UserError(f"--top-k {a.top_k}: must be >= 0 (0 = off)")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UserError(f"--top-p {a.top_p}: must be in (0, 1] (1 = off)")
    try:
        dev = torch.device(a.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {a.device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise UserError(f"--device {a.device}: no CUDA device is available here (torch {torch.__version__}); "
                            "use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {a.device}: only {n} CUDA device(s) here (cuda:0-cuda:{n - 1})")
    elif dev.type != "cpu":
        raise UserError(f"--device {a.device}: only cpu and cuda are supported")


@cli_entry
def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    check_args(a)
    tag_dir = store.resolve_tag_dir(a.checkpoint)
    texts = sample_texts(tag_dir, a.prompt, a.max_new_tokens, a.temperature, a.top_k or None, a.top_p,
                         a.seed, a.tokenizer, a.device, a.num_samples)
    for i, text in enumerate(texts):
        print(text if len(texts) == 1 else f"--- sample {i + 1} of {len(texts)} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
