"""Initial weights from an `import-hf` directory: written here, loaded by the trainer.

    <run>/init/model.safetensors   our parameter names (plain GPT), fp32; embedding rows =
                                   the imported model's vocabulary (unpadded)
    <run>/init/init.json           what it is: architecture, model section, vocabulary rows,
                                   bos/eos ids, the source and its config, checksum of the weights
    <run>/init/tokenizer*.json     the imported model's tokenizer files, if it had any

`checkpoint.init_from: <run>/init` makes the trainer build its model (plain, tensor-parallel,
a pipeline stage, ZeRO-3 partitions) from `init_source`'s full tensors instead of random
initial values: each rank keeps its piece of each (`pretrain.parallel.spec`). The vocabulary
rows are zero-padded to the run's padded vocabulary. A checkpoint being resumed is loaded
afterwards and wins. Only JSON and safetensors are read: nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.config.schema import SHAPE_KEYS
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
    if verify and (problem := digest.mismatch(d / WEIGHTS, meta)):
        raise UserError(f"{d / WEIGHTS} {problem} (init.json); re-run pretrain-convert import-hf")
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
    meta = {k: v for k, v in meta.items() if k not in digest.ALGORITHMS}
    meta = {**meta, "format": FORMAT, **digest.file_entry(out / WEIGHTS)}
    store.write_atomic(out / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def mismatches(model_cfg: dict, want: dict) -> list[str]:
    """Human lines for each architecture field of the config's model section that differs from `want`
    (a model section derived from the imported model)."""
    out = []
    m = dict(model_cfg)
    for key in (k for k in SHAPE_KEYS if k not in ("n_kv_head", "d_ff")):  # those two: by value below
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
def init_source(path, cfg, layout, log=print):
    """The full tensors of an init directory as a model-building source: a function
    (plain name, full shape) -> tensor for `parallel.build.build_model`. Checks the config's
    model section against init.json first (UserError naming each mismatching field)."""
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
    pad = padded - int(meta["vocab_rows"])
    log(f"initialised from {init_dir_of(path)} ({meta.get('architecture')}, {meta.get('source')})"
        + (f"; {pad} padding rows of the embedding are zero" if pad else ""))
    return weights_source(sd, padded, f"checkpoint.init_from={path}")


def weights_source(sd: dict, padded: int, where: str):
    """A full plain-GPT state dict as a model-building source: a function (plain name, full
    shape) -> tensor for `parallel.build.build_model`. Vocabulary rows are cut to, or zero-padded
    to, the run's padded vocabulary; learned positions cut to model.seq_len."""
    from pretrain.parallel import spec

    def source(name: str, shape: tuple) -> torch.Tensor:
        if name not in sd:
            raise UserError(f"{where}: the init weights lack {name}")
        t = sd[name]
        if spec.rule_of(name).vocab:
            t = names.pad_rows(t[:padded], padded)
        elif name == "embed.wpe.weight" and t.shape[0] > shape[0]:
            t = t[:shape[0]]  # fewer learned positions than the source model has (model.seq_len)
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
        return t.float()

    return source


def load_init_weights(model: torch.nn.Module, path, cfg, layout, topo=None, log=print) -> None:
    """Copy the init weights into an already built `model` (this rank's plain GPT, ParallelGPT
    or pipeline stage; not ZeRO-3 partitions: the trainer builds from `init_source` instead)."""
    from pretrain.parallel import spec

    source = init_source(path, cfg, layout, log)
    tp_rank = getattr(topo, "tp_rank", 0) if topo is not None else 0
    spec.initialize(model, cfg.model, tp=layout.tp, tp_rank=tp_rank, source=source)
