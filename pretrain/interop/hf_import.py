"""Start a run from a local transformers checkpoint (GPT-2 or Llama family).

    pretrain-convert import-hf --model HF_DIR [--config FILE] --out RUN_DIR [overrides]
    pretrain-train [--config FILE] --config RUN_DIR/init/model.yaml [overrides] \
        train.out_dir=RUN_DIR checkpoint.init_from=RUN_DIR/init        (printed as `next:`)

import-hf reads HF_DIR/config.json and its safetensors weights (a pytorch_model.bin is
refused: we never unpickle a downloaded file), derives the model section from the HF config
(fields left at their defaults; a field set to another value is named, with the value to
set), and writes it to RUN_DIR/init/model.yaml. When the data is prepared it checks the
vocabulary and -- when both are Hugging Face tokenizers -- that the data was tokenized with
the model's tokenizer, and writes RUN_DIR/init/ (see `init_weights.py`). Training then
starts from those weights with a fresh optimizer, at step 0.

The embedding is padded to the run's padded vocabulary with zero rows. Their logits are 0
and take part in the softmax, so the first loss equals transformers' loss on the same batch
exactly only when the padded vocabulary equals the model's (choose model.vocab_multiple so);
otherwise it is close (import-hf says how many rows are padding).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from pretrain.config.schema import SHAPE_KEYS
from pretrain.errors import UserError
from pretrain.interop import names
from pretrain.interop.init_weights import mismatches, write_init

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def read_hf_config(model_dir: Path) -> dict:
    f = model_dir / "config.json"
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir}: no such directory (a local transformers model directory; "
                        "nothing is downloaded)")
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"--model {model_dir}: no config.json; not a transformers model directory") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: unreadable ({e})") from None


def read_hf_weights(model_dir: Path) -> dict:
    """All tensors of model.safetensors or of the shards its index names (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index}: unreadable safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (f" (found {', '.join(pickles[:3])}: pickles are never loaded; convert them where you trust them "
                "with `AutoModelForCausalLM.from_pretrained(d).save_pretrained(d2, safe_serialization=True)`)"
                if pickles else "")
        raise UserError(f"--model {model_dir}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: missing (named by the safetensors index)")
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def _data_tokenizers(cfg) -> list:
    """The data's tokenizers (from the sources' manifests), for the tokenizer check."""
    from pretrain.data.tokenizer import tokenizer_from_manifest

    toks = []
    for p in cfg.data.paths:
        if (Path(p) / "manifest.json").is_file():
            toks.append((p, tokenizer_from_manifest(p)))
    return toks


def _check_tokenizer(model_dir: Path, cfg, allow: bool, log) -> None:
    if cfg.data.synthetic:
        return
    hf_file = model_dir / "tokenizer.json"
    if not hf_file.is_file():
        log(f"note: {model_dir} has no tokenizer.json; cannot check that the data was tokenized with its tokenizer")
        return
    import tokenizers

    try:
        theirs = tokenizers.Tokenizer.from_file(str(hf_file)).get_vocab(with_added_tokens=True)
    except Exception as e:  # the library raises a bare Exception on malformed files
        raise UserError(f"{hf_file}: not a valid tokenizer.json ({e})") from None
    for path, tok in _data_tokenizers(cfg):
        if tok.kind == "hf":
            same = tok.tok.get_vocab(with_added_tokens=True) == theirs
        else:
            same = False
        if not same:
            msg = (f"data.paths {path} was tokenized with {tok.spec or tok.kind!r}, not with the imported model's "
                   f"tokenizer ({hf_file}); its token ids would mean other words. Re-run pretrain-prep with "
                   f"--tokenizer hf:{hf_file}")
            if not allow:
                raise UserError(msg + " (or pass --allow-tokenizer-mismatch)")
            log(f"warning: {msg}")


def derive_model(cfg, want: dict, hf_vocab: int) -> list[str]:
    """Fill the config's model section from the imported model: a field still at its default takes
    the checkpoint's value (a field set to something else is left for `mismatches` to refuse).
    Returns the fields it set, as `model.k=v`."""
    from pretrain.config.schema import ModelConfig

    defaults, set_ = asdict(ModelConfig()), []
    for key, value in want.items():
        if key == "seq_len":  # a training choice: only learned positions cap it (at the model's table)
            if want["position"] != "learned" or cfg.model.seq_len <= value:
                continue
        if getattr(cfg.model, key) == defaults[key] and getattr(cfg.model, key) != value:
            setattr(cfg.model, key, value)
            set_.append(f"model.{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return set_


def _data_ready(cfg) -> tuple[bool, int | None]:
    """(whether data.paths holds prepared data, its vocabulary). Importing needs no data yet."""
    from pretrain.data.manifest import data_vocab_size

    if cfg.data.synthetic:
        return True, None
    if not cfg.data.paths:
        return False, None
    try:
        return True, data_vocab_size(cfg.data.paths)
    except UserError:
        return False, None


def import_hf(model_dir: str, config: str | None, out: str, overrides=(), allow_tokenizer_mismatch: bool = False,
              force: bool = False, log=print) -> Path:
    """Write `<out>/init/` from the transformers model in `model_dir` for the run config `config`.

    The model section is derived from the checkpoint (fields left at their defaults take its
    values) and written to `<out>/init/model.yaml`, which the printed `next:` command loads after
    `config`, with the same overrides. Prepared data is optional: without it the vocabulary and
    tokenizer checks are left to the data (`pretrain-prep --tokenizer hf:MODEL_DIR/tokenizer.json`).
    """
    import shlex

    from pretrain.config.load import load_config

    src = Path(model_dir)
    hf_cfg = read_hf_config(src)
    arch, want, hf_vocab = names.model_from_hf_config(hf_cfg)
    cfg = load_config(config, list(overrides))
    derived = derive_model(cfg, want, hf_vocab)
    _check_model_section(cfg, want, src, config)
    padded = _check_run(cfg, hf_vocab, derived, src, allow_tokenizer_mismatch, log)
    run = Path(out)
    init = _fresh_init_dir(run, force)
    model_yaml = _write_import(src, init, cfg, arch, want, hf_cfg, hf_vocab, log)
    if derived:
        log(f"model section from {src}/config.json: {' '.join(derived)} (in {model_yaml})")
    if padded > hf_vocab:
        log(f"note: the run pads the vocabulary to {padded}: {padded - hf_vocab} zero rows whose logits (0) join the "
            "softmax, so the first loss is close to, not equal to, transformers'. For exact equality choose "
            f"model.vocab_multiple so that the padded vocabulary is {hf_vocab}.")
    cmd = ["pretrain-train", *(["--config", config] if config else []), "--config", str(model_yaml),
           *overrides, f"train.out_dir={run}", f"checkpoint.init_from={init}"]
    log("next: " + shlex.join(cmd))
    return init


def _check_model_section(cfg, want: dict, src: Path, config: str | None) -> None:
    """The config's model section must be the imported model's (fields it sets itself)."""
    bad = mismatches(asdict(cfg.model), want)
    if bad:
        keys = (*SHAPE_KEYS, "norm_eps", "rope_theta")
        wanted = " ".join(f"model.{k}={want[k] if isinstance(want[k], str) else json.dumps(want[k])}"
                          for k in keys if k in want)
        raise UserError(f"{config or 'the config'}: the model section does not match {src}/config.json: "
                        + "; ".join(bad) + f" (the imported model is: {wanted}; or leave these fields out: "
                        "import-hf derives them)")


def _check_run(cfg, hf_vocab: int, derived: list, src: Path, allow_tokenizer_mismatch: bool, log) -> int:
    """Vocabulary (every data token id has a row, every imported row fits), the rest of the config
    for its own run, and the data's tokenizer when the data is there; returns the padded vocabulary."""
    import copy

    from pretrain.config.validate import padded_vocab, resolve

    ready, data_vocab = _data_ready(cfg)
    if data_vocab is not None and data_vocab > hf_vocab:
        raise UserError(f"the data's vocabulary ({data_vocab}) is larger than the imported model's ({hf_vocab}); "
                        "was it tokenized with another tokenizer?")
    if cfg.model.vocab_size is None and data_vocab is None:
        cfg.model.vocab_size = hf_vocab
        derived.append(f"model.vocab_size={hf_vocab}")
    rows = max(data_vocab or 0, cfg.model.vocab_size or 0)
    if rows < hf_vocab:
        raise UserError(f"the run's vocabulary ({rows}: model.vocab_size={cfg.model.vocab_size}, data "
                        f"{data_vocab}) is smaller than the imported model's {hf_vocab} rows; set "
                        f"model.vocab_size: {hf_vocab}")
    par = cfg.parallel
    probe = cfg
    if not ready:  # the rest of the config must be valid for its own run; the data comes later
        probe = copy.deepcopy(cfg)
        probe.data.synthetic = True
    resolve(probe, (par.data or 1) * par.tensor * par.pipeline, data_vocab)
    if ready:
        _check_tokenizer(src, cfg, allow_tokenizer_mismatch, log)
    else:
        tok = f" --tokenizer hf:{src / 'tokenizer.json'}" if (src / "tokenizer.json").is_file() else ""
        log(f"note: no prepared data at data.paths {cfg.data.paths} yet: prepare it with pretrain-prep{tok}, "
            "so that its token ids are the model's")
    return padded_vocab(rows, cfg.model.vocab_multiple, par.tensor)


def _fresh_init_dir(run: Path, force: bool) -> Path:
    """`<run>/init`, refused where the run has checkpoints (resume would ignore the import) or an
    earlier import, unless `force`."""
    init, ckpts = run / "init", run / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("step_*/manifest.json")) and not force:
        raise UserError(f"{run} already has checkpoints: checkpoint.resume=auto would resume them and ignore the "
                        "imported weights; choose a new --out (or --force)")
    if init.exists() and not force:
        raise UserError(f"{init} exists (an earlier import); choose a new --out or pass --force to replace it")
    if init.exists():
        shutil.rmtree(init)
    return init


def _write_import(src: Path, init: Path, cfg, arch: str, want: dict, hf_cfg: dict, hf_vocab: int, log) -> Path:
    """The weights, tokenizer files, init.json and model.yaml of the import; returns model.yaml."""
    import yaml

    sd = names.from_hf(read_hf_weights(src), arch, want)
    tok_files = []
    init.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, init / f)
            tok_files.append(f)
    meta = {"architecture": names.ARCHITECTURES[arch], "source": str(src.resolve()), "model": want,
            "vocab_rows": hf_vocab, "bos_token_id": hf_cfg.get("bos_token_id"),
            "eos_token_id": hf_cfg.get("eos_token_id"), "tokenizer_files": tok_files, "hf_config": hf_cfg}
    write_init(init, sd, meta)
    model_yaml = init / "model.yaml"  # the model section this import was checked against
    model_yaml.write_text(f"# written by pretrain-convert import-hf: the model section of {src}\n"
                          + yaml.safe_dump({"model": asdict(cfg.model)}, sort_keys=False))
    n = sum(t.numel() for t in sd.values())
    log(f"imported {names.ARCHITECTURES[arch]} ({n:,} parameters, vocabulary {hf_vocab}) from {src} into {init}")
    return model_yaml
