"""Sample text from a checkpoint: `python -m pretrain.generate --checkpoint RUN_DIR --prompt TEXT`.

Uses the tokenizer recorded in the run's data manifest and the model's KV cache.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pretrain import checkpoint
from pretrain.config.load import config_from_dict
from pretrain.errors import UserError, cli_entry
from pretrain.model.gpt import GPT
from pretrain.model.sampling import generate


def load_model(tag_dir, device: torch.device) -> tuple[GPT, dict]:
    state = checkpoint.read_state(tag_dir)
    cfg = config_from_dict(state["config"], source=str(tag_dir / checkpoint.STATE))
    model = GPT(cfg.model, state["model_shape"]["padded_vocab_size"])
    weights = checkpoint.load_model_weights(tag_dir)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # A tied head has no tensor of its own in some saves; anything else missing is an error.
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k.startswith("head."))]
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); was it written by another version?")
    return model.to(device).eval(), state


def load_tokenizer_for(state: dict, override: str | None, tag_dir):
    """--tokenizer SPEC, else the checkpoint's own copy of the run's tokenizer."""
    from pretrain.data.tokenizer import load_tokenizer, tokenizer_from_manifest

    if override:
        return load_tokenizer(override)
    tdir = checkpoint.tokenizer_dir(tag_dir, state)
    if not tdir:
        raise UserError(f"{tag_dir}: this run has no recorded tokenizer (synthetic data?); pass --tokenizer SPEC")
    return tokenizer_from_manifest(tdir)


def sample_text(tag_dir, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
                tokenizer: str | None = None, device: str = "cpu") -> str:
    dev = torch.device(device)
    tok = load_tokenizer_for(checkpoint.read_state(tag_dir), tokenizer, tag_dir)  # before the weights: fail fast
    model, state = load_model(tag_dir, dev)
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.eos_id if tok.eos_id is not None else 0]
    idx = torch.tensor([ids[-model.cfg.seq_len + 1:]], dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=gen, eos_id=tok.eos_id, valid_vocab=tok.vocab_size)
    new = [t for t in out[0, idx.size(1):].tolist() if t != tok.eos_id]
    return prompt + tok.decode(new)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ dir, or a step_* dir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override the recorded tokenizer (byte, hf:PATH, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    tag_dir = checkpoint.resolve_tag_dir(a.checkpoint)
    print(sample_text(tag_dir, a.prompt, a.max_new_tokens, a.temperature, a.top_k or None, a.top_p,
                      a.seed, a.tokenizer, a.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
