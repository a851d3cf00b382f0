"""The parameter spec (pretrain.parallel.spec): every parameter of every model variant has a
rule, sharding and merging invert each other, groups follow the rule in every layout, initial
weights depend on (seed, name) only, and no other module restates a split dim or a decay rule.
No processes are spawned here."""
from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.config.schema import ModelConfig
from pretrain.model import params
from pretrain.model.gpt import GPT
from pretrain.parallel import spec

ROOT = Path(__file__).resolve().parents[1]
V = 128
VARIANTS = {
    "gpt2": ModelConfig(n_layer=2, d_model=32, n_head=4, seq_len=16),
    "llama-gqa-untied": ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, seq_len=16, position="rope",
                                    norm="rmsnorm", mlp="swiglu", d_ff=64, bias=False, tie_embeddings=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_has_a_rule_and_a_layer(variant):
    m = VARIANTS[variant]
    model = GPT(m, V, device="meta")
    for name, p in model.named_parameters():
        rule = spec.rule_of(name)
        if rule.tp_dim is not None:
            assert rule.tp_dim < p.dim(), name
        assert rule.vocab == (name in ("embed.wte.weight", "head.lm_head.weight")), name
        layer = spec.layer_of(name, m.n_layer)
        assert name.startswith(spec.layer_prefix(layer, m.n_layer)), name
    with pytest.raises(KeyError, match="not a parameter"):
        spec.rule_of("blocks.0.attn.unknown.weight")


@pytest.mark.parametrize("variant, tp", [("gpt2", 2), ("gpt2", 4), ("llama-gqa-untied", 2)])
def test_local_pieces_merge_back_to_the_full_tensors(variant, tp):
    m = VARIANTS[variant]
    torch.manual_seed(0)
    full = GPT(m, V).state_dict()
    shards = [{n: spec.local_piece(n, t, m, tp, r) for n, t in full.items()} for r in range(tp)]
    for n, t in full.items():
        dim = spec.rule_of(n).tp_dim
        if dim is None:
            assert all(s[n] is t for s in shards), n  # replicated: the tensor itself
        else:
            assert spec.full_shape(n, shards[0][n].shape, tp) == tuple(t.shape), n
    merged = spec.merge_state(shards, m)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[n], full[n]) for n in full)


def test_qkv_pieces_hold_their_heads():
    m = VARIANTS["llama-gqa-untied"]  # 4 query heads, 2 kv heads, head_dim 8
    hd, tp = 8, 2
    rows = torch.arange((4 + 2 * 2) * hd, dtype=torch.float32)[:, None]
    piece = spec.local_piece("blocks.1.attn.qkv.weight", rows, m, tp, 1)[:, 0].long().tolist()
    q, k, v = list(range(2 * hd, 4 * hd)), list(range(5 * hd, 6 * hd)), list(range(7 * hd, 8 * hd))
    assert piece == q + k + v  # rank 1: query heads 2-3 and the kv head (1) they read


def test_pipeline_names_map_to_plain_names():
    L = 3
    assert spec.plain_name("blocks.2.mlp.fc.weight", L) == "blocks.2.mlp.fc.weight"
    assert spec.plain_name("0.wte.weight", L) == "embed.wte.weight"
    assert spec.plain_name("3.attn.qkv.bias", L) == "blocks.2.attn.qkv.bias"
    assert spec.plain_name("4.ln_f.weight", L) == "head.ln_f.weight"
    assert spec.plain_name("tied_modules.embed.wpe.weight", L) == "embed.wpe.weight"
    assert spec.plain_name("tied_modules.embed.ln_f.bias", L) == "head.ln_f.bias"
    # the last stage's copy of the tied table is the table
    assert spec.plain_name("tied_modules.embed.wte.weight", L) == "embed.wte.weight"
    assert spec.plain_name("4.wte.weight", L) == "embed.wte.weight"


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_vocab_parallel_table_is_grouped_as_an_embedding(weight_decay):
    """The groups follow the names, not module types: a vocab-parallel table (and a pipeline's
    copy of it) is an embedding, also with weight_decay 0 (where the old rule put it with the
    decayed matrices)."""
    from pretrain.parallel.tensor import VocabParallelEmbedding

    m = VARIANTS["gpt2"]
    model = GPT(m, V, device="meta")
    model.embed.wte = VocabParallelEmbedding(V, m.d_model, None, init_method=None, device="meta")
    optim = SimpleNamespace(weight_decay=weight_decay, decay_norms_and_biases=False, decay_embeddings=False)
    groups = spec.optimizer_groups(model, optim, m.n_layer)
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0  # [decayed (by wd), not decayed]
    assert "embed.wte.weight" in groups[1]["names"] and "embed.wpe.weight" in groups[1]["names"]
    assert "embed.wte.weight" not in groups[0]["names"] and "blocks.0.attn.qkv.weight" in groups[0]["names"]
    stage = [("tied_modules.embed.wte.weight", model.embed.wte.weight), ("1.attn.qkv.weight",
                                                                        model.blocks[0].attn.qkv.weight)]
    by_wd = {g["weight_decay"]: g["names"] for g in params.param_groups(stage, 0.1, plain=lambda n: spec.plain_name(n, m.n_layer))}
    assert by_wd == {0.1: ["1.attn.qkv.weight"], 0.0: ["tied_modules.embed.wte.weight"]}


def test_plain_param_groups_are_the_specs():
    m = VARIANTS["llama-gqa-untied"]
    model = GPT(m, V, device="meta")
    for kw in ({}, {"decay_embeddings": True}, {"decay_norms_and_biases": True}):
        ours = params.param_groups(model.named_parameters(), 0.1, **kw)
        optim = SimpleNamespace(weight_decay=0.1, **{"decay_embeddings": False, "decay_norms_and_biases": False, **kw})
        theirs = spec.optimizer_groups(model, optim, m.n_layer)
        assert [[id(p) for p in g["params"]] for g in ours] == [[id(p) for p in g["params"]] for g in theirs]


def test_initial_weights_depend_on_seed_and_name_only():
    m = VARIANTS["gpt2"]
    a = GPT(m, V, seed=5).state_dict()
    deeper = GPT(replace(m, n_layer=3), V, seed=5).state_dict()  # one more block: the others unchanged
    other = GPT(m, V, seed=6).state_dict()
    for n, t in a.items():
        if spec.rule_of(n).init != "residual":  # residual std depends on n_layer
            assert torch.equal(deeper[n], t), n
        if spec.rule_of(n).init in ("normal", "residual"):
            assert not torch.equal(other[n], t), n
    rule_std = {"normal": m.init_std, "residual": m.init_std / (2 * m.n_layer) ** 0.5}
    for n, t in a.items():
        init = spec.rule_of(n).init
        if init in rule_std:
            assert abs(t.std().item() - rule_std[init]) < 0.25 * rule_std[init], n
        else:
            assert torch.equal(t, torch.full_like(t, 1.0 if init == "ones" else 0.0)), n
    # under a manual seed, the default generator gives the seed: one draw, in any model
    torch.manual_seed(1)
    b = GPT(m, V).state_dict()
    torch.manual_seed(1)
    assert GPT(m, V, seed=spec.draw_seed()).state_dict().keys() == b.keys()
    torch.manual_seed(1)
    c = GPT(m, V, seed=spec.draw_seed()).state_dict()
    assert all(torch.equal(b[n], c[n]) for n in b)


# ----------------------------------------------------------------------------- one place
_OLD_HELPERS = ("tp_partition_dim", "merge_tp_shards", "parallel_param_groups", "_decayed", "_local_piece",
                "_plain_name", "plain_layers", "_pipeline_weights")
# Parameter-name patterns that state a split dimension or a group rule (spec.RULES' subjects).
_RULE_NAMES = re.compile(r"(attn\.proj|mlp\.(fc|gate|up|proj|down)|lm_head)\b")


def _sources():
    for path in sorted((ROOT / "pretrain").rglob("*.py")):
        if (path.parent.name, path.name) in (("parallel", "spec.py"), ("model", "params.py")):
            continue  # the table (model/params.py) and the split plan acting on it (parallel/spec.py)
        yield path, path.read_text()


def test_the_spec_is_the_only_place_of_split_dims_and_decay_rules():
    for path, text in _sources():
        tree = ast.parse(text)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & set(_OLD_HELPERS), f"{path}: {defined & set(_OLD_HELPERS)}"
        for node in ast.walk(tree):
            # no regular expression over parameter names of the kind the spec's rules match
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("compile", "search", "match"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        assert not _RULE_NAMES.search(arg.value), f"{path}:{node.lineno}: {arg.value}"
            # no decision on a module or tensor type for the optimizer groups
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if "weight_decay" in keys and "params" in keys and path.name != "gpt.py":
                    raise AssertionError(f"{path}:{node.lineno}: builds optimizer groups itself")
        # isinstance(..., nn.Embedding) / p.dim() >= 2 group rules are gone
        assert "isinstance(m, nn.Embedding)" not in text and "p.dim() >= 2" not in text, path
