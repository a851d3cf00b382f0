"""Single-field rules of the config, section by section (`check_fields`), and the allowed values
of the enumerated fields. Cross-field rules and the layout are in `pretrain.config.validate`."""
from __future__ import annotations

import os

from pretrain.config.schema import PRECISION_DTYPES, Config
from pretrain.errors import UserError

ENUMS: dict[str, tuple[str, ...]] = {
    "model.position": ("learned", "rope"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "parallel.pipeline_partition": ("parameters", "uniform"),
    "schedule.kind": ("cosine", "linear", "constant", "wsd"),
    "train.precision": tuple(PRECISION_DTYPES),
    "train.device": ("auto", "cpu", "cuda"),
    "checkpoint.verify": ("full", "sizes"),
    "data.document_attention": ("auto", "sdpa", "flex"),
}
RESUME_CHANGES = ("data", "optim", "schedule")


def _positive(value, key: str, what: str = "a positive integer") -> None:
    if value is None or value <= 0:
        raise UserError(f"{key} must be {what}, got {value}")


def _non_negative(value, key: str) -> None:
    if value < 0:
        raise UserError(f"{key} must be >= 0, got {value}")


def _enum(cfg: Config) -> None:
    for key, allowed in ENUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise UserError(f"{key} must be one of {choices}, got {value!r}")


def check_fields(cfg: Config) -> None:
    """Single-field rules, section by section."""
    _enum(cfg)
    for check in (_model_fields, _data_fields, _parallel_fields, _optim_fields, _schedule_fields, _train_fields,
                  _checkpoint_fields, _logging_fields, _guard_fields, _eval_fields):
        check(cfg)


def _model_fields(cfg: Config) -> None:
    m = cfg.model
    for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_multiple"):
        _positive(getattr(m, key), f"model.{key}")
    for key in ("n_kv_head", "d_ff", "vocab_size"):
        if getattr(m, key) is not None:
            _positive(getattr(m, key), f"model.{key}", "a positive integer or null")
    for key in ("rope_theta", "norm_eps", "init_std"):
        _positive(getattr(m, key), f"model.{key}", "> 0")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")


def _data_fields(cfg: Config) -> None:
    d = cfg.data
    if not all(isinstance(x, str) and x for x in d.paths):
        raise UserError(f"data.paths must be a list of non-empty path strings, got {d.paths!r}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d.weights):
        raise UserError(f"data.weights must be a list of numbers, got {d.weights!r}")
    if not d.train_split:
        raise UserError("data.train_split must not be empty (e.g. 'train')")
    if not d.valid_split:
        raise UserError("data.valid_split must not be empty (e.g. 'valid')")
    if d.eod_token_id is not None and (isinstance(d.eod_token_id, bool) or not isinstance(d.eod_token_id, int)
                                       or d.eod_token_id < 0):
        raise UserError(f"data.eod_token_id must be a token id >= 0 or null, got {d.eod_token_id!r}")
    if d.synthetic and d.eod_token_id is None and d.separates_documents():
        raise UserError("data.reset_attention_mask, reset_position_ids and eod_mask_loss need data.eod_token_id "
                        "with data.synthetic (random tokens have no manifest); set it, e.g. 0")


def _parallel_fields(cfg: Config) -> None:
    p = cfg.parallel
    _positive(p.tensor, "parallel.tensor")
    _positive(p.pipeline, "parallel.pipeline")
    if p.data is not None:
        _positive(p.data, "parallel.data", "a positive integer or null (derived from the world size)")
    if p.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if cfg.train.compile and p.zero_stage == 3:  # pretrain.run.engine.compile_blocks
        raise UserError("train.compile does not work with parallel.zero_stage 3: ZeRO-3 gathers and releases each "
                        "layer's weights in hooks inside the blocks, which torch.compile cannot trace; set "
                        "train.compile=false or use parallel.zero_stage 0-2")
    _positive(p.timeout_minutes, "parallel.timeout_minutes", "> 0")


def _optim_fields(cfg: Config) -> None:
    o = cfg.optim
    _positive(o.lr, "optim.lr", "> 0")
    _non_negative(o.weight_decay, "optim.weight_decay")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise UserError(f"optim.{key} must be in [0, 1), got {getattr(o, key)}")
    _positive(o.eps, "optim.eps", "> 0")
    if o.grad_clip < 0:
        raise UserError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")


def _schedule_fields(cfg: Config) -> None:
    s = cfg.schedule
    _non_negative(s.warmup_steps, "schedule.warmup_steps")
    if s.decay_steps is not None:
        _non_negative(s.decay_steps, "schedule.decay_steps")
    _non_negative(s.min_lr, "schedule.min_lr")
    if not 0.0 < s.wsd_decay_fraction <= 1.0:
        raise UserError(f"schedule.wsd_decay_fraction must be in (0, 1], got {s.wsd_decay_fraction}")


def _train_fields(cfg: Config) -> None:
    t = cfg.train
    if not t.out_dir:
        raise UserError("train.out_dir must not be empty (e.g. runs/my-run)")
    for key in ("max_steps", "micro_batch_size", "eval_steps"):
        _positive(getattr(t, key), f"train.{key}")
    if t.max_consecutive_skips is not None:
        _positive(t.max_consecutive_skips, "train.max_consecutive_skips", "a positive integer or null")
    if t.global_batch_size is not None:
        _positive(t.global_batch_size, "train.global_batch_size", "a positive integer or null")
    _non_negative(t.eval_interval, "train.eval_interval")


def _checkpoint_fields(cfg: Config) -> None:
    c = cfg.checkpoint
    _non_negative(c.interval, "checkpoint.interval")
    _positive(c.keep_last, "checkpoint.keep_last")
    if not c.resume:
        raise UserError("checkpoint.resume must be 'auto', 'none' or a checkpoint directory, got ''")
    if c.resume not in ("auto", "none") and not os.path.isdir(c.resume):
        raise UserError(f"checkpoint.resume: checkpoint directory '{c.resume}' does not exist; "
                        f"use 'auto' (newest checkpoint of the run), 'none', or an existing directory")
    bad = [x for x in c.allow_changes if x not in RESUME_CHANGES]
    if bad:
        raise UserError(f"checkpoint.allow_changes: {bad} not allowed; list any of {', '.join(RESUME_CHANGES)}")
    if c.init_optimizer and not c.init_from:
        raise UserError("checkpoint.init_optimizer needs checkpoint.init_from (the checkpoint whose optimizer "
                        "state to load)")
    if c.dir is not None and not c.dir:
        raise UserError("checkpoint.dir must be a directory or null (= <train.out_dir>/checkpoints)")


def _guard_fields(cfg: Config) -> None:
    g = cfg.guard
    for key in ("spike_sigma", "rollback_after", "max_rollbacks", "step_timeout", "straggler_threshold"):
        _non_negative(getattr(g, key), f"guard.{key}")
    for key in ("spike_window", "startup_timeout", "straggler_windows"):
        _positive(getattr(g, key), f"guard.{key}")
    if g.step_timeout and g.startup_timeout < g.step_timeout:
        raise UserError(f"guard.startup_timeout ({g.startup_timeout:g} s) must be >= guard.step_timeout "
                        f"({g.step_timeout:g} s): the first step is the slowest")
    if g.spike_sigma and g.spike_window < 2:
        raise UserError(f"guard.spike_window must be >= 2 to measure a spread, got {g.spike_window}")


def _eval_fields(cfg: Config) -> None:
    e = cfg.eval
    if not all(isinstance(t, str) and t for t in e.tasks):
        raise UserError(f"eval.tasks must be a list of lm-eval task names, got {e.tasks!r}")
    _non_negative(e.interval, "eval.interval")
    if e.limit is not None:
        _positive(e.limit, "eval.limit", "a positive integer or null (all documents)")
    if e.include_path is not None and not os.path.isdir(e.include_path):
        raise UserError(f"eval.include_path: '{e.include_path}' is not a directory (of lm-eval task YAMLs)")
    if e.tasks and cfg.data.synthetic:
        raise UserError("eval.tasks needs the data's tokenizer: not with data.synthetic=true (set eval.tasks=[])")
    if e.tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise UserError("eval.tasks needs lm-evaluation-harness: pip install 'pretrain[eval]' (or set eval.tasks=[])")


def _logging_fields(cfg: Config) -> None:
    lg = cfg.logging
    _positive(lg.interval, "logging.interval")
    if lg.peak_flops is not None:
        _positive(lg.peak_flops, "logging.peak_flops", "> 0 FLOP/s or null")
