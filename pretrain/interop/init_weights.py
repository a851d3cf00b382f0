"""Initial weights from an `import-hf` directory: written here, loaded by the trainer.

    <run>/init/model.safetensors   our parameter names (plain GPT), fp32; embedding rows =
                                   the imported model's vocabulary (unpadded)
    <run>/init/init.json           what it is: architecture, model section, vocabulary rows,
                                   bos/eos ids, the source and its config, sha256 of the weights
    <run>/init/tokenizer*.json     the imported model's tokenizer files, if it had any

`checkpoint.init_from: <run>/init` makes the trainer call `load_init_weights` on the
freshly built model (plain, tensor-parallel, or a pipeline stage) before DeepSpeed wraps
it; the embedding (and untied head) rows are zero-padded to the run's padded vocabulary.
A checkpoint being resumed is loaded afterwards and wins. Only JSON and safetensors are
read: nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain import checkpoint
from pretrain.errors import UserError
from pretrain.interop import names

META = "init.json"
WEIGHTS = "model.safetensors"
FORMAT = "pretrain-init"


def init_dir_of(path) -> Path:
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if (p / "init" / META).is_file() and not (p / META).is_file():
        p = p / "init"  # the run directory import-hf wrote
    if not (p / META).is_file() or not (p / WEIGHTS).is_file():
        raise UserError(f"{path}: not an init directory written by `pretrain-convert import-hf` "
                        f"(expected {META} and {WEIGHTS})")
    return p


def read_init(path, verify: bool = True) -> tuple[dict, dict]:
    """(init.json, our state dict) of an init directory (or its model.safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = init_dir_of(path)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d / META}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{d / META}: not a pretrain init record (format {meta.get('format')!r})")
    if verify and meta.get("sha256") and checkpoint.sha256_file(d / WEIGHTS) != meta["sha256"]:
        raise UserError(f"{d / WEIGHTS} fails its sha256 check (init.json); re-run pretrain-convert import-hf")
    try:
        sd = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{d / WEIGHTS}: not a readable safetensors file ({e})") from None
    return meta, sd


def write_init(out: Path, sd: dict, meta: dict) -> Path:
    """Write `<out>/model.safetensors` then `<out>/init.json` (last: it is the commit record)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    meta = {**meta, "format": FORMAT, "sha256": checkpoint.sha256_file(out / WEIGHTS)}
    checkpoint.write_atomic(out / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def mismatches(model_cfg: dict, want: dict) -> list[str]:
    """Human lines for each architecture field of the config's model section that differs from `want`
    (a model section derived from the imported model)."""
    out = []
    m = dict(model_cfg)
    for key in ("n_layer", "n_head", "d_model", "position", "norm", "mlp", "bias", "tie_embeddings"):
        if m.get(key) != want.get(key):
            out.append(f"model.{key} is {m.get(key)!r}, the imported model has {want.get(key)!r}")
    if names.n_kv_of(m) != names.n_kv_of(want):
        out.append(f"model.n_kv_head is {m.get('n_kv_head')!r} (= {names.n_kv_of(m)} kv heads), the imported "
                   f"model has {names.n_kv_of(want)}")
    if m.get("mlp") == want.get("mlp") and names.d_ff_of(m) != names.d_ff_of(want):
        out.append(f"model.d_ff is {m.get('d_ff')!r} (= {names.d_ff_of(m)}), the imported model has "
                   f"{names.d_ff_of(want)}")
    if not names.same_float(m.get("norm_eps"), want.get("norm_eps")):
        out.append(f"model.norm_eps is {m.get('norm_eps')!r}, the imported model has {want.get('norm_eps')!r}")
    if want.get("position") == "rope" and m.get("position") == "rope" and \
            not names.same_float(m.get("rope_theta"), want.get("rope_theta")):
        out.append(f"model.rope_theta is {m.get('rope_theta')!r}, the imported model has {want.get('rope_theta')!r}")
    if want.get("position") == "learned" and m.get("position") == "learned" and \
            int(m.get("seq_len")) > int(want.get("seq_len")):
        out.append(f"model.seq_len is {m.get('seq_len')}, the imported model has only {want.get('seq_len')} "
                   "learned positions")
    return out


# ----------------------------------------------------------------------------- loading
def _plain_name(name: str, model, n_layer: int, first_stage: bool) -> str:
    """The plain-GPT name of a live parameter (pipeline stages name layers by index)."""
    from pretrain.model.gpt import GPT

    if isinstance(model, GPT):  # plain and tensor-parallel GPT keep the plain names
        return name
    from pretrain.parallel.pipeline import TIED_KEY, layer_prefix

    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        if key != TIED_KEY:
            raise UserError(f"unexpected tied module {key!r} in the pipeline")
        if first_stage:
            return "embed." + rest
        return "embed.wte.weight" if rest == "wte.weight" else "head." + rest
    if not head.isdigit():
        raise UserError(f"cannot place pipeline parameter {name!r}")
    return layer_prefix(int(head), n_layer) + rest


def _local_piece(name: str, full: torch.Tensor, shape: torch.Size, m, tp: int, tp_rank: int) -> torch.Tensor:
    """This tensor-parallel rank's piece of the full plain tensor `name`."""
    if tuple(full.shape) == tuple(shape):
        return full
    if name == "embed.wpe.weight" and full.shape[0] >= shape[0] and tuple(full.shape[1:]) == tuple(shape[1:]):
        return full[:shape[0]]  # fewer learned positions than the imported model has (model.seq_len)
    from pretrain.parallel.apply import qkv_permutation, tp_partition_dim

    dim = tp_partition_dim(name)
    if dim is None or tp == 1:
        raise UserError(f"init weights: {name} has shape {tuple(full.shape)}, the model expects {tuple(shape)}")
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        full = full[qkv_permutation(m.n_head, m.n_kv_head or m.n_head, m.d_model // m.n_head, tp)]
    piece = full.chunk(tp, dim=dim)[tp_rank]
    if tuple(piece.shape) != tuple(shape):
        raise UserError(f"init weights: {name} slice has shape {tuple(piece.shape)}, the model expects {tuple(shape)}")
    return piece


def load_init_weights(model: torch.nn.Module, path, cfg, layout, topo=None, log=print) -> dict:
    """Copy the init weights into `model` (this rank's plain GPT, ParallelGPT or pipeline stage).

    Checks the config's model section against init.json first (UserError naming each
    mismatching field). Returns init.json.
    """
    from dataclasses import asdict

    meta, sd = read_init(path)
    bad = mismatches(asdict(cfg.model), meta["model"])
    if bad:
        raise UserError(f"checkpoint.init_from={path}: the config does not match the imported model: "
                        + "; ".join(bad))
    padded = layout.padded_vocab_size
    if int(meta["vocab_rows"]) > padded:
        raise UserError(f"checkpoint.init_from={path}: the imported model has {meta['vocab_rows']} vocabulary "
                        f"rows, this run's embedding only {padded}; set model.vocab_size: {meta['vocab_rows']}")
    copy_weights(model, sd, cfg, layout, topo, f"checkpoint.init_from={path}")
    if topo is None or topo.rank == 0:
        pad = padded - int(meta["vocab_rows"])
        log(f"initialised from {init_dir_of(path)} ({meta.get('architecture')}, {meta.get('source')})"
            + (f"; {pad} padding rows of the embedding are zero" if pad else ""))
    return meta


def copy_weights(model: torch.nn.Module, sd: dict, cfg, layout, topo, where: str) -> None:
    """Copy the full plain-GPT state dict `sd` into `model` (this rank's plain GPT, ParallelGPT or
    pipeline stage); embedding rows are zero-padded, or cut to, the run's padded vocabulary."""
    padded = layout.padded_vocab_size
    for k in ("embed.wte.weight", "head.lm_head.weight"):
        if k in sd:
            sd[k] = names.pad_rows(sd[k][:padded], padded)
    tp = layout.tp
    tp_rank = getattr(topo, "tp_rank", 0) if topo is not None else 0
    first = bool(getattr(topo, "is_first_stage", True)) if topo is not None else True
    L = cfg.model.n_layer
    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            plain = _plain_name(name, model, L, first)
            if plain not in sd:
                missing.append(plain)
                continue
            p.copy_(_local_piece(plain, sd[plain], p.shape, cfg.model, tp, tp_rank).to(p.dtype))
    if missing:
        raise UserError(f"{where}: the init weights lack {missing[:4]}")
