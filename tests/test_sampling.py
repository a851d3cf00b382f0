"""KV-cache forward and generation: cache == full recomputation, sampling reproducibility, limits."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pretrain.config.schema import ModelConfig
from pretrain.model import GPT, generate, sample_logits

V = 80
CONFIGS = {
    "gpt2": ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=40, init_std=0.3),
    "rope_gqa": ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=40, init_std=0.3,
                            position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}


def _model(name, **over):
    torch.manual_seed(0)
    return GPT(replace(CONFIGS[name], **over), V).eval()


def _prompt(B=2, T=5, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_forward_matches_full_forward(name):
    model = _model(name)
    idx = _prompt(T=12)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        # prefill 5, then a chunk of 4 (offset causal mask), then one token at a time
        cache = model.make_cache(2)
        parts = [model(idx[:, :5], cache=cache, start_pos=0), model(idx[:, 5:9], cache=cache, start_pos=5)]
        parts += [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_with_cache_equals_recomputation(name):
    model = _model(name)
    idx = _prompt()
    fast = generate(model, idx, max_new_tokens=20, temperature=0)
    slow = generate(model, idx, max_new_tokens=20, temperature=0, use_cache=False)
    assert fast.shape == (2, 25)
    assert torch.equal(fast[:, :5], idx)
    assert torch.equal(fast, slow)
    assert len(fast[:, 5:].unique()) > 3  # a non-degenerate continuation
    # single-prompt (1, T0) too
    assert torch.equal(generate(model, idx[:1], 10, temperature=0), fast[:1, :15])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampling_reproducible_and_top_k_1_is_greedy(name):
    model = _model(name)
    idx = _prompt()

    def run(seed, **kw):
        return generate(model, idx, 15, generator=torch.Generator().manual_seed(seed), **kw)

    for kw in (dict(top_k=10), dict(top_p=0.9), dict(top_k=20, top_p=0.8, temperature=0.7), {}):
        a, b = run(3, **kw), run(3, **kw)
        assert torch.equal(a, b), kw
        assert torch.equal(a, run(3, use_cache=False, **kw)), kw  # same draws without the cache
    assert not torch.equal(run(3), run(4))  # different seeds differ (full-vocab sampling, 30 draws)
    greedy = generate(model, idx, 15, temperature=0)
    assert torch.equal(run(5, top_k=1), greedy)
    assert torch.equal(run(5, top_p=1e-6), greedy)


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_logits(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # probs: top two tokens (3, 2) hold ~0.87 of the mass; top_p=0.8 keeps exactly those
    draws = {sample_logits(logits, top_p=0.8, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    assert sample_logits(logits, temperature=0).item() == 3
    assert sample_logits(logits.repeat(3, 1), temperature=0).shape == (3, 1)


def test_stops_at_context_length():
    model = _model("gpt2")  # learned positions: seq_len is a hard limit
    idx = _prompt(T=30)
    out = generate(model, idx, max_new_tokens=100, temperature=0)
    assert out.shape == (2, 40)  # stopped when the context was full
    assert torch.equal(out, generate(model, idx, 100, temperature=0, use_cache=False))
    assert generate(model, _prompt(T=40), 5).shape == (2, 40)
    with pytest.raises(ValueError):
        generate(model, _prompt(T=41), 5)


def test_eos_and_valid_vocab_and_mode_restored():
    model = _model("rope_gqa")
    idx = _prompt()
    greedy = generate(model, idx, 20, temperature=0)
    eos = int(greedy[0, 8])  # row 0 produces it at step 4
    out = generate(model, idx, 20, temperature=0, eos_id=eos)
    first = [(row[5:] == eos).nonzero()[0].item() if (row[5:] == eos).any() else None for row in greedy]
    for r, f in enumerate(first):
        if f is not None:
            assert torch.all(out[r, 5 + f:] == eos)  # padded with eos after finishing
            assert torch.equal(out[r, :5 + f], greedy[r, :5 + f])
    if all(f is not None for f in first):
        assert out.size(1) == 5 + max(first) + 1  # stopped early once every row finished
    # padded vocabulary ids are never produced
    out = generate(model, idx, 30, top_k=None, generator=torch.Generator().manual_seed(0), valid_vocab=10)
    assert int(out[:, 5:].max()) < 10
    model.train()
    generate(model, idx, 2)
    assert model.training


def test_prompt_ending_in_a_space_is_healed(tmp_path):
    """A byte-level BPE encodes "def " as [def, ' ']; generation drops the lone space token and
    makes the first new token start with the space instead (the quickstart's prompt)."""
    from pretrain.data.tokenizer import train_bpe
    from pretrain.generate import heal_prompt

    code = ["def f(x):\n    return x\n", "import os\nimport sys\n", "def g(self, y):\n    pass\n"] * 50
    tok = train_bpe(code, 300, str(tmp_path / "tokenizer.json"))
    for prompt in ("def ", "import "):
        ids = tok.encode(prompt)
        assert tok.decode(ids[-1:]) == " "  # the trap
        healed, kept, allowed = heal_prompt(tok, prompt, ids)
        assert healed == tok.encode(prompt[:-1]) and kept == prompt[:-1]
        pieces = [tok.decode([i]) for i in allowed]
        assert pieces and all(p.startswith(" ") and len(p) > 1 for p in pieces)
        assert any(p[1:2].isalpha() for p in pieces)
    assert heal_prompt(tok, "def", tok.encode("def"))[2] is None  # nothing to heal
