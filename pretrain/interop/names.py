"""Which transformers architecture a model is, and the tensor mapping both ways.

Pure functions on plain dicts and tensors: nothing here imports transformers.

Mapping rules (ours -> transformers), decided per model section:

    GPT2LMHeadModel   position learned, norm layernorm, mlp gelu (tanh approximation =
                      HF "gelu_new"). Also exported exactly, though import gives back the
                      GPT-2 defaults: bias false (HF GPT-2 always has biases: written as
                      zeros) and grouped-query attention (n_kv_head < n_head: the k/v heads
                      are repeated into full multi-head attention, which computes the same).
    LlamaForCausalLM  position rope, norm rmsnorm, mlp swiglu, any n_kv_head. bias true maps
                      to attention_bias = mlp_bias = true (the norms have no bias either way).

Everything else has no transformers equivalent and is refused with the reason: learned
positions with rmsnorm or swiglu, rope with layernorm or a gelu (non-gated) MLP. (GPT-NeoX
has rope + layernorm, but a parallel residual and per-head interleaved qkv; not a target.)

Common to both: tie_embeddings <-> tie_word_embeddings, norm_eps <-> layer_norm_epsilon /
rms_norm_eps, d_ff <-> n_inner / intermediate_size, seq_len -> n_positions /
max_position_embeddings, rope_theta <-> rope_theta (and rope_parameters). Our fused qkv
rows are [q | k | v], HF GPT-2's c_attn columns are the same (Conv1D stores weights
transposed: ours = theirs.T), Llama's are separate q_proj / k_proj / v_proj. Our RoPE is the
rotate_half pairing of HF Llama, so q/k need no permutation. The padded embedding rows
(beyond the real vocabulary) are dropped on export and zero-filled on import.
"""
from __future__ import annotations

import math

import torch

from pretrain.errors import UserError

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}

def d_ff_of(m: dict) -> int:
    """The MLP width the model uses: `ModelConfig.ffn_dim` of this (saved) model section."""
    from pretrain.config.schema import ModelConfig

    return ModelConfig(**{k: v for k, v in m.items() if k in ModelConfig.__dataclass_fields__}).ffn_dim()


def n_kv_of(m: dict) -> int:
    return int(m.get("n_kv_head") or m["n_head"])


def architecture(m: dict) -> str:
    """GPT2 or LLAMA for a model section (dict); UserError with the reason when neither fits."""
    gpt2_needs = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}
    llama_needs = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    for arch, needs in ((GPT2, gpt2_needs), (LLAMA, llama_needs)):
        if all(m.get(k) == v for k, v in needs.items()):
            return arch

    def off(needs):
        return ", ".join(f"{k}={m.get(k)!r} (needs {v!r})" for k, v in needs.items() if m.get(k) != v)

    raise UserError(
        f"this model (position={m.get('position')!r}, norm={m.get('norm')!r}, mlp={m.get('mlp')!r}) has no "
        f"transformers equivalent: GPT2LMHeadModel is learned positions + layernorm + gelu [here: "
        f"{off(gpt2_needs)}]; LlamaForCausalLM is rope + rmsnorm + swiglu [here: {off(llama_needs)}]")


# ----------------------------------------------------------------------------- ours -> HF
def hf_config(m: dict, vocab: int, bos_id: int | None = None, eos_id: int | None = None,
              dtype: str = "float32") -> dict:
    """config.json of the transformers model for model section `m` with `vocab` rows."""
    arch = architecture(m)
    common = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": int(vocab),
              "tie_word_embeddings": bool(m["tie_embeddings"]), "torch_dtype": dtype,
              "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
              "initializer_range": float(m.get("init_std", 0.02))}
    if arch == GPT2:
        drop = float(m.get("dropout", 0.0))
        return {**common, "n_layer": m["n_layer"], "n_head": m["n_head"], "n_embd": m["d_model"],
                "n_inner": d_ff_of(m), "n_positions": m["seq_len"], "n_ctx": m["seq_len"],
                "layer_norm_epsilon": float(m["norm_eps"]), "activation_function": "gelu_new",
                "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    theta = float(m["rope_theta"])
    return {**common, "hidden_size": m["d_model"], "intermediate_size": d_ff_of(m),
            "num_hidden_layers": m["n_layer"], "num_attention_heads": m["n_head"],
            "num_key_value_heads": n_kv_of(m), "head_dim": m["d_model"] // m["n_head"],
            "hidden_act": "silu", "max_position_embeddings": m["seq_len"], "rms_norm_eps": float(m["norm_eps"]),
            "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "rope_scaling": None, "attention_bias": bool(m["bias"]), "mlp_bias": bool(m["bias"]),
            "attention_dropout": 0.0, "pretraining_tp": 1}


def _expand_kv(w: torch.Tensor, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """Fused qkv rows [q | k (nkv heads) | v (nkv heads)] -> [q | k (nh heads) | v (nh heads)].

    Query head h reads kv head h // (nh // nkv) (as `repeat_interleave` in our attention)."""
    q, k, v = w.split([nh * hd, nkv * hd, nkv * hd], dim=0)
    rep = nh // nkv

    def expand(t):
        return t.reshape(nkv, hd, *t.shape[1:]).repeat_interleave(rep, dim=0).reshape(nh * hd, *t.shape[1:])

    return torch.cat([q, expand(k), expand(v)], dim=0)


def to_hf(sd: dict, m: dict, vocab: int) -> dict:
    """Our (plain, full) state dict -> transformers tensor names, embedding rows cut to `vocab`."""
    arch = architecture(m)
    L, C, nh, nkv = m["n_layer"], m["d_model"], m["n_head"], n_kv_of(m)
    hd = C // nh
    need = ["embed.wte.weight", "head.ln_f.weight"] + ([] if m["tie_embeddings"] else ["head.lm_head.weight"])
    missing = [k for k in need if k not in sd]
    if missing:
        raise UserError(f"the checkpoint's weights lack {missing}: not a model of this shape")
    if sd["embed.wte.weight"].shape[0] < vocab:
        raise UserError(f"the embedding has {sd['embed.wte.weight'].shape[0]} rows, fewer than the "
                        f"vocabulary to export ({vocab})")
    out, used = {}, set()

    def get(name):
        if name not in sd:
            raise UserError(f"the checkpoint's weights lack {name!r}: not a model of this shape")
        used.add(name)
        return sd[name]

    def opt(name, like_rows=None):  # a bias, or zeros when the model has none (GPT-2 only)
        if name in sd:
            used.add(name)
            return sd[name]
        return torch.zeros(like_rows, dtype=torch.float32)

    if arch == GPT2:
        p = "transformer."
        out[p + "wte.weight"] = get("embed.wte.weight")[:vocab]
        out[p + "wpe.weight"] = get("embed.wpe.weight")
        for i in range(L):
            o, h = f"blocks.{i}.", f"{p}h.{i}."
            qkv_w = get(o + "attn.qkv.weight")
            qkv_b = opt(o + "attn.qkv.bias", qkv_w.shape[0])
            if nkv != nh:
                qkv_w, qkv_b = _expand_kv(qkv_w, nh, nkv, hd), _expand_kv(qkv_b, nh, nkv, hd)
            for ln in ("ln_1", "ln_2"):
                out[f"{h}{ln}.weight"] = get(f"{o}{ln}.weight")
                out[f"{h}{ln}.bias"] = opt(f"{o}{ln}.bias", C)
            out[h + "attn.c_attn.weight"] = qkv_w.t()
            out[h + "attn.c_attn.bias"] = qkv_b
            for ours, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                w = get(f"{o}{ours}.weight")
                out[f"{h}{theirs}.weight"] = w.t()
                out[f"{h}{theirs}.bias"] = opt(f"{o}{ours}.bias", w.shape[0])
        out[p + "ln_f.weight"] = get("head.ln_f.weight")
        out[p + "ln_f.bias"] = opt("head.ln_f.bias", C)
    else:
        p = "model."
        out[p + "embed_tokens.weight"] = get("embed.wte.weight")[:vocab]
        for i in range(L):
            o, h = f"blocks.{i}.", f"{p}layers.{i}."
            out[h + "input_layernorm.weight"] = get(o + "ln_1.weight")
            out[h + "post_attention_layernorm.weight"] = get(o + "ln_2.weight")
            sizes = [nh * hd, nkv * hd, nkv * hd]
            for kind in ("weight", "bias") if m["bias"] else ("weight",):
                q, k, v = get(f"{o}attn.qkv.{kind}").split(sizes, dim=0)
                out[f"{h}self_attn.q_proj.{kind}"] = q
                out[f"{h}self_attn.k_proj.{kind}"] = k
                out[f"{h}self_attn.v_proj.{kind}"] = v
                out[f"{h}self_attn.o_proj.{kind}"] = get(f"{o}attn.proj.{kind}")
                for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                    out[f"{h}mlp.{theirs}.{kind}"] = get(f"{o}mlp.{ours}.{kind}")
        out[p + "norm.weight"] = get("head.ln_f.weight")
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = get("head.lm_head.weight")[:vocab]
    extra = sorted(set(sd) - used)
    if extra:
        raise UserError(f"the checkpoint has weights the {ARCHITECTURES[arch]} mapping does not use: {extra[:5]}; "
                        "its config and weights disagree")
    return {k: v.detach().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- HF -> ours
def _theta(c: dict) -> float:
    rp = c.get("rope_parameters") or {}
    rs = c.get("rope_scaling") or {}
    kind = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if kind != "default":
        raise UserError(f"rope scaling {kind!r} has no equivalent here (model.position rope is plain RoPE)")
    return float(rp.get("rope_theta") or c.get("rope_theta") or 10000.0)


def model_from_hf_config(c: dict) -> tuple[str, dict, int]:
    """(architecture, our model-section fields, vocabulary rows) of a transformers config.json."""
    mt = c.get("model_type")
    if mt == GPT2:
        act = c.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"GPT-2 activation_function {act!r}: model.mlp gelu is the tanh approximation "
                            "(gelu_new); an exact-erf gelu would not give the same outputs")
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights") is False:
            raise UserError("GPT-2 with scale_attn_by_inverse_layer_idx / without scale_attn_weights has no "
                            "equivalent here (attention is scaled by 1/sqrt(head_dim))")
        d = int(c["n_embd"])
        m = {"n_layer": int(c["n_layer"]), "n_head": int(c["n_head"]), "n_kv_head": None, "d_model": d,
             "d_ff": int(c.get("n_inner") or 4 * d), "position": "learned", "norm": "layernorm", "mlp": "gelu",
             "bias": True, "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
             "norm_eps": float(c.get("layer_norm_epsilon", 1e-5)), "seq_len": int(c.get("n_positions", 1024))}
        return GPT2, m, int(c["vocab_size"])
    if mt == LLAMA:
        if c.get("hidden_act", "silu") != "silu":
            raise UserError(f"Llama hidden_act {c.get('hidden_act')!r}: model.mlp swiglu uses silu")
        if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
            raise UserError(f"Llama with attention_bias={c.get('attention_bias')} but mlp_bias={c.get('mlp_bias')}: "
                            "model.bias switches both together")
        d, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
        if c.get("head_dim") not in (None, d // nh) or d % nh:
            raise UserError(f"Llama head_dim {c.get('head_dim')} != hidden_size / num_attention_heads "
                            f"({d}/{nh}): not expressible with model.d_model / model.n_head")
        nkv = int(c.get("num_key_value_heads") or nh)
        m = {"n_layer": int(c["num_hidden_layers"]), "n_head": nh, "n_kv_head": nkv, "d_model": d,
             "d_ff": int(c["intermediate_size"]), "position": "rope", "norm": "rmsnorm", "mlp": "swiglu",
             "bias": bool(c.get("attention_bias", False)),
             "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
             "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "rope_theta": _theta(c),
             "seq_len": int(c.get("max_position_embeddings", 2048))}
        return LLAMA, m, int(c["vocab_size"])
    raise UserError(f"transformers model_type {mt!r} is not supported: import-hf reads GPT-2 (gpt2) and "
                    "Llama (llama) checkpoints")


def _strip(sd: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def _getter(src: dict, used: set, layout: str):
    """src[name], recorded in `used`; a UserError naming the tensor when the checkpoint lacks it."""
    def get(name):
        if name not in src:
            raise UserError(f"the HF checkpoint has no tensor {name!r} ({layout} layout expected)")
        used.add(name)
        return src[name]
    return get


def from_hf(hf: dict, arch: str, m: dict) -> dict:
    """transformers tensors -> our plain state dict (embedding rows = the HF vocabulary).

    `m` is the model section from `model_from_hf_config`. UserError on a missing or
    unexpected tensor (names them).
    """
    L, C, nh, nkv = m["n_layer"], m["d_model"], m["n_head"], n_kv_of(m)
    hd = C // nh
    sd, used = {}, set()

    if arch == GPT2:
        src = _strip(hf, "transformer.")
        ignore = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older checkpoints
        get = _getter(src, used, "GPT-2")

        sd["embed.wte.weight"] = get("wte.weight")
        sd["embed.wpe.weight"] = get("wpe.weight")
        for i in range(L):
            h, o = f"h.{i}.", f"blocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[f"{o}{ln}.weight"], sd[f"{o}{ln}.bias"] = get(f"{h}{ln}.weight"), get(f"{h}{ln}.bias")
            for theirs, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                                 ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
                sd[f"{o}{ours}.weight"] = get(f"{h}{theirs}.weight").t()
                sd[f"{o}{ours}.bias"] = get(f"{h}{theirs}.bias")
        sd["head.ln_f.weight"], sd["head.ln_f.bias"] = get("ln_f.weight"), get("ln_f.bias")
    else:
        src = _strip(hf, "model.")
        ignore = ("rotary_emb.inv_freq",)
        get = _getter(src, used, "Llama")

        sd["embed.wte.weight"] = get("embed_tokens.weight")
        for i in range(L):
            h, o = f"layers.{i}.", f"blocks.{i}."
            sd[o + "ln_1.weight"] = get(h + "input_layernorm.weight")
            sd[o + "ln_2.weight"] = get(h + "post_attention_layernorm.weight")
            for kind in ("weight", "bias") if m["bias"] else ("weight",):
                sd[f"{o}attn.qkv.{kind}"] = torch.cat([get(f"{h}self_attn.{x}_proj.{kind}") for x in "qkv"], dim=0)
                sd[f"{o}attn.proj.{kind}"] = get(f"{h}self_attn.o_proj.{kind}")
                for theirs, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    sd[f"{o}mlp.{ours}.{kind}"] = get(f"{h}mlp.{theirs}.{kind}")
        sd["head.ln_f.weight"] = get("norm.weight")

    lm = "lm_head.weight"
    if not m["tie_embeddings"]:
        sd["head.lm_head.weight"] = get(lm)
    elif lm in src:
        used.add(lm)  # a tied copy some checkpoints store anyway
        if not torch.equal(src[lm], sd["embed.wte.weight"]):
            raise UserError("tie_word_embeddings is true but lm_head.weight differs from the token embedding")
    extra = sorted(k for k in src if k not in used and not k.endswith(ignore))
    if extra:
        raise UserError(f"the HF checkpoint has tensors this architecture does not use: {extra[:5]}"
                        f"{' ...' if len(extra) > 5 else ''}")
    shapes = {"embed.wte.weight": (None, C), "blocks.0.attn.qkv.weight": ((nh + 2 * nkv) * hd, C)}
    for k, (rows, cols) in shapes.items():
        if k in sd and (sd[k].dim() != 2 or sd[k].shape[1] != cols or (rows and sd[k].shape[0] != rows)):
            raise UserError(f"HF tensor for {k} has shape {tuple(sd[k].shape)}, the config implies "
                            f"({rows or 'vocab'}, {cols})")
    return {k: v.contiguous() for k, v in sd.items()}


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (the padded vocabulary)."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise UserError(f"{t.shape[0]} embedding rows do not fit a padded vocabulary of {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def same_float(a, b) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def export_warnings(model_section: dict) -> list[str]:
    """Valid but surprising choices of a model section, printed before training starts (also by
    --plan): a model that trains but that `pretrain-convert export-hf` will refuse."""
    try:
        architecture(model_section)
    except UserError as e:
        return [f"warning: {e}. It trains, but `pretrain-convert export-hf` will refuse it"]
    return []
