"""What may differ between a checkpoint and the run that loads it, and the messages that say what did.

Resuming the same run (`check_resume`):
    model shape        refused, naming each changed key (the padding of the vocabulary: the
                       model.vocab_multiple that keeps it)
    train.precision    refused (the optimizer state is kept per precision)
    data, optim.*,     refused unless `checkpoint.allow_changes` lists the section; then each
    schedule.*         change is printed. train.max_steps may change freely (printed when it
                       moves a decay that follows it)
Continued pretraining (`check_init`, checkpoint.init_from): only the model shape must match.
"""
from __future__ import annotations

from pathlib import Path

from pretrain.config.schema import Config, to_dict
from pretrain.errors import UserError

PATH_FIELDS = (("data", "cache_dir"), ("train", "out_dir"), ("checkpoint", "dir"), ("checkpoint", "init_from"))


def resolved_config(cfg: Config) -> dict:
    """The config as saved in a checkpoint: every path absolute, so it means the same from any directory."""
    c = to_dict(cfg)
    c["data"]["paths"] = [str(Path(p).resolve()) for p in c["data"]["paths"]]
    for section, key in PATH_FIELDS:
        if c[section][key]:
            c[section][key] = str(Path(c[section][key]).resolve())
    if c["checkpoint"]["resume"] not in ("auto", "none"):
        c["checkpoint"]["resume"] = str(Path(c["checkpoint"]["resume"]).resolve())
    return c


def _diff(section: str, old: dict, new: dict) -> list[str]:
    return [f"{section}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def shape_changes(saved: dict, want: dict) -> list[str]:
    return [f"model.{k if k != 'padded_vocab_size' else 'vocab_size (padded)'} is {saved.get(k)!r} in the "
            f"checkpoint, {want.get(k)!r} in the config" for k in sorted(set(saved) | set(want))
            if saved.get(k) != want.get(k)]


def shape_message(where: str, shape: dict, want: dict, tp: int) -> str:
    rows, new_rows = shape.get("padded_vocab_size"), want["padded_vocab_size"]
    if {**shape, "padded_vocab_size": new_rows} != want or not rows:
        return (f"{where} holds a model of shape other than the config's: {'; '.join(shape_changes(shape, want))}; restore the "
                "model section or set checkpoint.resume=none")
    # Only the padding differs (model.vocab_multiple x parallel.tensor): padding rows are trained
    # and take part in the softmax, so they cannot be cut or added without changing the loss.
    fix = (f"set model.vocab_multiple={rows // tp} to keep {rows}" if rows % tp == 0 else
           f"no model.vocab_multiple keeps {rows} at parallel.tensor {tp}: use a tensor degree dividing {rows}")
    return (f"{where} has a padded vocabulary of {rows} rows, this run {new_rows} (model.vocab_multiple x "
            f"parallel.tensor); the padding rows are part of the model: {fix}")


def data_changes(saved: dict, data) -> list[str]:
    """Which data source changed, from the per-source record (older checkpoints: the fingerprints)."""
    if saved.get("data_fingerprint") == data.fingerprint:
        return []
    old, new = saved.get("data_sources"), data.sources()
    if not old:
        return [f"the data differ (fingerprint {saved.get('data_fingerprint')} vs {data.fingerprint})"]
    out = []
    a, b = old.get("sources") or {}, new.get("sources") or {}
    for path in sorted(set(a) | set(b)):
        if path not in b:
            out.append(f"data.paths: {path} removed")
        elif path not in a:
            out.append(f"data.paths: {path} added")
        elif a[path] != b[path]:
            out.append(f"data.paths: {path} has other contents (re-prepared?)")
    for key in sorted((set(old) | set(new)) - {"sources"}):
        if old.get(key) != new.get(key):
            name = key if key != "weights" else "weights (blend)"
            out.append(f"data.{name} {old.get(key)!r} -> {new.get(key)!r}")
    return out or [f"the data differ (fingerprint {saved.get('data_fingerprint')} vs {data.fingerprint})"]


def check_resume(saved: dict, cfg: Config, shape: dict, tp: int, data, where: str) -> list[str]:
    """UserError when the run may not resume from `saved`; else the lines to print about allowed changes."""
    if saved.get("model_shape") != shape:
        raise UserError(shape_message(where, saved.get("model_shape") or {}, shape, tp))
    old_cfg = saved.get("config") or {}
    old_prec = (old_cfg.get("train") or {}).get("precision")
    if old_prec and old_prec != cfg.train.precision:
        raise UserError(f"{where} was trained with train.precision={old_prec}, this run asks for "
                        f"{cfg.train.precision}: the optimizer state differs by precision; set train.precision="
                        f"{old_prec} to resume, or start a new train.out_dir with checkpoint.init_from={where.removeprefix('checkpoint ')}")
    now = to_dict(cfg)
    changes = {"data": data_changes(saved, data),
               "optim": _diff("optim", old_cfg.get("optim") or now["optim"], now["optim"]),
               "schedule": _diff("schedule", old_cfg.get("schedule") or now["schedule"], now["schedule"])}
    allowed = set(cfg.checkpoint.allow_changes)
    refused = [k for k, v in changes.items() if v and k not in allowed]
    if refused:
        lines = "; ".join(x for k in refused for x in changes[k])
        return_fix = f"checkpoint.allow_changes=[{','.join(sorted(allowed | set(refused)))}]"
        raise UserError(f"{where} was trained with other {' and '.join(refused)} settings: {lines}; set "
                        f"{return_fix} to resume with the change, restore the settings, or start a new "
                        "train.out_dir (checkpoint.init_from for continued pretraining)")
    out = [f"resuming with a change: {x}" for k in ("data", "optim", "schedule") for x in changes[k]]
    old_max = (old_cfg.get("train") or {}).get("max_steps")
    if old_max and old_max != cfg.train.max_steps and cfg.schedule.decay_steps is None:
        out.append(f"note: train.max_steps {old_max} -> {cfg.train.max_steps} moves the end of the learning-rate "
                   "decay (schedule.decay_steps is null)")
    return out


def check_init(saved: dict, cfg: Config, shape: dict, where: str) -> None:
    """checkpoint.init_from: the model must have the same shape (the padded vocabulary may differ)."""
    old = {k: v for k, v in (saved.get("model_shape") or {}).items() if k != "padded_vocab_size"}
    new = {k: v for k, v in shape.items() if k != "padded_vocab_size"}
    if old != new:
        raise UserError(f"{where} holds a model of another shape: {'; '.join(shape_changes(old, new))}; "
                        "set the model section to the checkpoint's")
    vocab = saved.get("vocab_size")
    if vocab and int(vocab) > shape["padded_vocab_size"]:
        raise UserError(f"{where} has a vocabulary of {vocab}, this run's embedding only "
                        f"{shape['padded_vocab_size']} rows; set model.vocab_size: {vocab}")
