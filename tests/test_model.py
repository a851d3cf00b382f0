"""GPT model: parity with the plain-PyTorch baseline, every ModelConfig option, init, param groups."""
from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pretrain.config.schema import ModelConfig
from pretrain.errors import UserError
from pretrain.model import GPT, loss_fn, param_groups, resolve_d_ff
from pretrain.model.layers import apply_rope, rope_cos_sin

BASELINE = Path(__file__).resolve().parents[1].parent / "shared" / "baseline" / "plain_gpt.py"
V = 96  # (already padded) vocab of the small test models
SMALL = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16)


def _baseline_module():
    if not BASELINE.is_file():
        pytest.skip(f"baseline not found at {BASELINE} (expected ../shared/baseline next to the repo)")
    spec = importlib.util.spec_from_file_location("plain_gpt_baseline", BASELINE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _baseline_name(ours: str) -> str | None:
    """Our parameter name -> the baseline's (None: no counterpart)."""
    rename = {"embed.wte.": "wte.", "embed.wpe.": "wpe.", "head.ln_f.": "lnf.", ".ln_1.": ".ln1.",
              ".ln_2.": ".ln2.", ".attn.qkv.": ".qkv.", ".attn.proj.": ".proj.", ".mlp.fc.": ".fc.",
              ".mlp.proj.": ".out."}
    for a, b in rename.items():
        ours = ours.replace(a, b)
    return ours


def _batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, V, (B, cfg.seq_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def test_matches_baseline_loss_and_grads():
    base_mod = _baseline_module()
    cfg = replace(SMALL, n_layer=3, d_model=48, n_head=6, seq_len=24)
    torch.manual_seed(0)
    base = base_mod.GPT(cfg.n_layer, cfg.d_model, cfg.n_head, V, cfg.seq_len)
    with torch.no_grad():  # the baseline zero-inits biases / unit-inits norms: make them non-trivial
        for n, p in base.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = GPT(cfg, V)
    base_params = dict(base.named_parameters())
    ours = dict(model.named_parameters())
    assert set(_baseline_name(n) for n in ours) == set(base_params)  # head.weight is wte (tied)
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(base_params[_baseline_name(n)])
    x, y = _batch(cfg)
    loss_base = base(x, y)
    loss_ours = model(x, y)
    assert abs(loss_ours.item() - loss_base.item()) < 1e-6
    loss_base.backward()
    loss_ours.backward()
    for n, p in ours.items():
        torch.testing.assert_close(p.grad, base_params[_baseline_name(n)].grad, rtol=1e-5, atol=1e-6, msg=n)
    # logits path agrees with the loss path
    assert abs(loss_fn(model(x), y).item() - loss_ours.item()) < 1e-7
    # and the baseline's FLOPs N equals our non-embedding count
    n_base = sum(p.numel() for p in base.parameters()) - base.wpe.weight.numel()
    assert model.num_params(non_embedding=True) == n_base


def expected_params(cfg: ModelConfig, vocab: int) -> int:
    """Closed-form parameter count of GPT(cfg, vocab)."""
    d, L, b = cfg.d_model, cfg.n_layer, int(cfg.bias)
    hd = d // cfg.n_head
    nkv = cfg.n_kv_head or cfg.n_head
    if cfg.d_ff is not None:
        ff = cfg.d_ff
    elif cfg.mlp == "swiglu":
        ff = math.ceil(int(8 * d / 3) / 256) * 256
    else:
        ff = 4 * d
    norm = d * (1 + b) if cfg.norm == "layernorm" else d
    q_out, kv_out = cfg.n_head * hd, 2 * nkv * hd
    attn = d * (q_out + kv_out) + b * (q_out + kv_out) + q_out * d + b * d
    if cfg.mlp == "swiglu":
        mlp = 3 * d * ff + b * (2 * ff + d)
    else:
        mlp = 2 * d * ff + b * (ff + d)
    emb = vocab * d + (cfg.seq_len * d if cfg.position == "learned" else 0)
    head = norm + (0 if cfg.tie_embeddings else vocab * d)
    return emb + L * (2 * norm + attn + mlp) + head


OPTIONS = {
    "gpt2": {},
    "rope": dict(position="rope", rope_theta=500.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "swiglu_dff": dict(mlp="swiglu", d_ff=40),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "untied": dict(tie_embeddings=False),
    "nobias": dict(bias=False),
    "dropout": dict(dropout=0.1),
    "ckpt": dict(activation_checkpointing=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False,
                  activation_checkpointing=True),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_builds_runs_and_counts(name):
    cfg = replace(SMALL, **OPTIONS[name])
    torch.manual_seed(0)
    model = GPT(cfg, V)
    assert model.num_params() == expected_params(cfg, V) == sum(p.numel() for p in model.parameters())
    x, y = _batch(cfg)
    loss = model(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(V)) < 0.5  # small init: near-uniform predictions
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    assert model(x).shape == (x.size(0), cfg.seq_len, V)
    names = set(dict(model.named_parameters()))
    assert ("embed.wpe.weight" in names) == (cfg.position == "learned")
    assert ("head.lm_head.weight" in names) == (not cfg.tie_embeddings)
    assert ("blocks.0.mlp.gate.weight" in names) == (cfg.mlp == "swiglu")
    assert any(n.endswith(".bias") for n in names) == cfg.bias


def test_d_ff_defaults():
    assert resolve_d_ff(ModelConfig(d_model=768)) == 3072
    assert resolve_d_ff(ModelConfig(d_model=768, mlp="swiglu")) == 2048  # 8*768/3 = 2048 exactly
    assert resolve_d_ff(ModelConfig(d_model=4096, mlp="swiglu")) == 11008  # Llama-7B
    assert resolve_d_ff(ModelConfig(d_model=64, mlp="swiglu")) == 256
    assert resolve_d_ff(ModelConfig(d_model=64, mlp="swiglu", d_ff=100)) == 100


@pytest.mark.parametrize("bad", [dict(n_head=5), dict(n_kv_head=3), dict(position="alibi"), dict(norm="bn"),
                                 dict(mlp="relu"), dict(position="rope", n_head=32, d_model=96)])
def test_bad_config_is_user_error(bad):
    with pytest.raises(UserError):
        GPT(replace(SMALL, **bad), V)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_identical(dropout):
    cfg = replace(SMALL, dropout=dropout, position="rope", mlp="swiglu")
    torch.manual_seed(1)
    plain = GPT(cfg, V)
    ckpt = copy.deepcopy(plain)
    for b in ckpt.blocks:
        b.activation_checkpointing = True
    x, y = _batch(cfg)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks
        loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=0, atol=0, msg=n)


def test_init_statistics_and_determinism():
    cfg = ModelConfig(n_layer=8, n_head=4, d_model=256, seq_len=64, init_std=0.02)
    torch.manual_seed(7)
    model = GPT(cfg, 512)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)  # 0.005
    for n, p in model.named_parameters():
        if n.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert abs(p.std().item() - resid) / resid < 0.03, n
            assert abs(p.mean().item()) < 5 * resid / math.sqrt(p.numel()), n
        elif n.endswith(("qkv.weight", "fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) / 0.02 < 0.03, n
        elif n.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, n
        else:  # norm gains
            assert n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) and torch.all(p == 1), n
    cfg_sw = replace(cfg, n_layer=2, mlp="swiglu", bias=False, norm="rmsnorm")
    sw = GPT(cfg_sw, 512)
    assert abs(sw.blocks[0].mlp.down.weight.std().item() - 0.01) / 0.01 < 0.03
    assert abs(sw.blocks[0].mlp.gate.weight.std().item() - 0.02) / 0.02 < 0.03
    # deterministic given the seed
    torch.manual_seed(7)
    again = GPT(cfg, 512)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_layers_compose_to_forward_and_head_weight_argument():
    for opts in ({}, dict(tie_embeddings=False, position="rope")):
        cfg = replace(SMALL, **opts)
        torch.manual_seed(0)
        model = GPT(cfg, V)
        x, _ = _batch(cfg)
        layers = model.layers()
        assert layers[0] is model.embed and layers[-1] is model.head and len(layers) == cfg.n_layer + 2
        h = x
        for layer in layers:
            h = layer(h)
        torch.testing.assert_close(h, model(x), rtol=0, atol=0)
    # tied: the head holds no weight of its own; a pipeline stage can pass the (copied) weight
    cfg = SMALL
    torch.manual_seed(0)
    model = GPT(cfg, V)
    assert "head.lm_head.weight" not in model.state_dict()
    assert all(not k.startswith("head.") or k.startswith("head.ln_f.") for k in model.state_dict())
    from pretrain.model import Head
    lone = Head(cfg, V)  # tied head on another stage: no reference, weight passed in
    lone.load_state_dict(model.head.state_dict())
    h = torch.randn(2, 5, cfg.d_model)
    w = model.embed.wte.weight.detach().clone()
    torch.testing.assert_close(lone(h, weight=w), model.head(h))
    with pytest.raises(ValueError):
        lone(h)
    # deepcopy keeps the tie pointing at the copy's embedding
    dup = copy.deepcopy(model)
    assert dup.head.tied_embedding is dup.embed


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = replace(SMALL, n_head=4, n_kv_head=2, position="rope")
    torch.manual_seed(0)
    gqa = GPT(cfg, V)
    mha = GPT(replace(cfg, n_kv_head=None), V)
    hd, nh, nkv = cfg.d_model // cfg.n_head, cfg.n_head, cfg.n_kv_head
    sd = gqa.state_dict()
    new = {}
    for k, t in sd.items():
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            q, kk, v = t.split([nh * hd, nkv * hd, nkv * hd], dim=0)

            def rep(z):  # kv head j serves query heads j*r .. j*r+r-1
                return z.reshape(nkv, hd, *z.shape[1:]).repeat_interleave(nh // nkv, dim=0).reshape(nh * hd, *z.shape[1:])
            t = torch.cat([q, rep(kk), rep(v)], dim=0)
        new[k] = t
    mha.load_state_dict(new)
    x, _ = _batch(cfg)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_reference_and_is_relative():
    T, hd, theta = 7, 8, 10000.0
    x = torch.randn(2, 3, T, hd)
    cos, sin = rope_cos_sin(T, hd, theta, start_pos=5)
    ours = apply_rope(x, cos, sin)
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(5, 5 + T).float(), inv_freq)  # (T, hd/2)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(ours, torch.cat([z.real, z.imag], dim=-1), rtol=1e-5, atol=1e-5)
    # attention scores only see relative positions: shifting every position changes nothing
    q = torch.randn(1, 1, 4, hd)
    k = torch.randn(1, 1, 4, hd)
    s0 = apply_rope(q, *rope_cos_sin(4, hd, theta, 0)) @ apply_rope(k, *rope_cos_sin(4, hd, theta, 0)).transpose(-1, -2)
    s9 = apply_rope(q, *rope_cos_sin(4, hd, theta, 9)) @ apply_rope(k, *rope_cos_sin(4, hd, theta, 9)).transpose(-1, -2)
    torch.testing.assert_close(s0, s9, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [{}, dict(tie_embeddings=False, norm="rmsnorm", bias=False, position="rope")])
def test_param_groups(opts):
    cfg = replace(SMALL, **opts)
    model = GPT(cfg, V)
    names = {id(p): n for n, p in model.named_parameters()}

    def split(groups):
        assert all(g["params"] for g in groups)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(names)  # each parameter exactly once
        by_wd = {}
        for g in groups:
            by_wd.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
        return by_wd.get(0.1, set()), by_wd.get(0.0, set())

    decay, no_decay = split(param_groups(model.named_parameters(), 0.1))
    for n in no_decay:
        assert n.endswith(".bias") or "ln_" in n or n.startswith("embed."), n
    for n in decay:
        assert n.endswith(".weight") and "ln_" not in n and not n.startswith("embed."), n
    assert "embed.wte.weight" in no_decay
    assert ("head.lm_head.weight" in decay) == (not cfg.tie_embeddings)
    assert any("attn.qkv.weight" in n for n in decay) and any("ln_1" in n for n in no_decay)

    decay, no_decay = split(param_groups(model.named_parameters(), 0.1, decay_embeddings=True))
    assert {n for n in decay if n.startswith("embed.")} == {n for n in names.values() if n.startswith("embed.")}
    assert all(not n.startswith("embed.") for n in no_decay)
    groups = param_groups(model.named_parameters(), 0.1, decay_norms_and_biases=True, decay_embeddings=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1  # empty no-decay group dropped
    split(groups)
    torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-3)  # accepted by AdamW


def test_model_imports_no_deepspeed_or_distributed():
    import ast

    import pretrain.model.gpt as gpt_mod
    import pretrain.model.layers as layers_mod
    import pretrain.model.sampling as sampling_mod
    for mod in (gpt_mod, layers_mod, sampling_mod):
        src = Path(mod.__file__).read_text()
        assert len(src.splitlines()) < 400, mod.__name__
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("deepspeed", "torch.distributed")), (mod.__name__, name)
