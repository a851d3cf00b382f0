"""Cross-field validation and the resolved process layout.

`resolve(cfg, world_size, data_vocab_size)` is a pure function: it runs on every rank
BEFORE any process group exists (and in `--plan`, with no GPUs at all), and raises
`UserError` for every invalid combination, each message naming the field(s) and the fix.
It returns a `Layout`: the derived numbers everything else uses (batch plan, parallel
degrees, vocabulary padding, device).
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.fields import ENUMS, check_fields  # noqa: F401 (ENUMS re-exported)
from pretrain.config.schema import Config
from pretrain.errors import UserError

__all__ = ["Layout", "resolve", "padded_vocab", "tokens_per_step", "ENUMS", "DEEPSPEED_OWNED_KEYS"]


# DeepSpeed keys generated from our own fields: setting them in the `deepspeed:` passthrough
# would silently disagree with the rest of the system, so they are rejected with a pointer.
DEEPSPEED_OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size, which sets accumulation = global / (micro x data-parallel)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload_optimizer",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "the optim section, since the trainer builds its own AdamW",
    "scheduler": "the schedule section, since the trainer sets the learning rate every step",
}


@dataclass(frozen=True)
class Layout:
    """The resolved job layout. Global rank of (pipe, data, model) coordinates follows
    DeepSpeed's axis order: rank = (pp_idx * dp + dp_idx) * tp + tp_idx."""

    world_size: int
    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    vocab_size: int
    """Vocabulary of the data (token ids are < this). For synthetic data or an unknown data
    vocabulary: model.vocab_size."""
    padded_vocab_size: int
    """Rows of the embedding table: max(model.vocab_size, data vocab) rounded up to
    model.vocab_multiple * tp."""
    zero_stage: int
    device: str = "cpu"
    """The resolved device: 'cpu' or 'cuda' (train.device 'auto' resolved on this machine)."""

    def rank(self, pp_idx: int, dp_idx: int, tp_idx: int) -> int:
        """Global rank of a (pipeline stage, data-parallel index, tensor-parallel index)."""
        return (pp_idx * self.dp + dp_idx) * self.tp + tp_idx

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_idx, dp_idx, tp_idx) of a global rank; inverse of `rank`."""
        tp_idx = rank % self.tp
        dp_idx = (rank // self.tp) % self.dp
        pp_idx = rank // (self.tp * self.dp)
        return pp_idx, dp_idx, tp_idx


def padded_vocab(vocab: int, multiple: int, tp: int) -> int:
    """`vocab` rounded up to a multiple of multiple * tp."""
    m = multiple * tp
    return -(-vocab // m) * m


def _cuda_available() -> bool:
    import torch  # lazy: pretrain.config stays importable without paying for torch

    return bool(torch.cuda.is_available())



def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.d_model % m.n_head:
        raise UserError(f"model.n_head ({m.n_head}) must divide model.d_model ({m.d_model}); "
                        f"change one of them")
    kv = m.n_kv_head if m.n_kv_head is not None else m.n_head
    if m.n_head % kv:
        raise UserError(f"model.n_kv_head ({kv}) must divide model.n_head ({m.n_head}); "
                        f"use a divisor of {m.n_head} or null for multi-head attention")
    head_dim = m.d_model // m.n_head
    if m.position == "rope" and head_dim % 2:
        raise UserError(f"model.position 'rope' needs an even head dimension, but d_model/n_head = "
                        f"{m.d_model}/{m.n_head} = {head_dim}; change model.d_model or model.n_head")


def _check_data(cfg: Config, data_vocab_size: int | None) -> int:
    """Data rules; returns the data vocabulary (or model.vocab_size when it is unknown)."""
    m, d = cfg.model, cfg.data
    if d.synthetic:
        if m.vocab_size is None:
            raise UserError("data.synthetic needs model.vocab_size (random tokens are drawn from it); "
                            "set model.vocab_size, e.g. 50257")
        return m.vocab_size
    if not d.paths:
        raise UserError("data.paths is empty; list prepared data directories (pretrain-prep output) "
                        "or set data.synthetic: true with model.vocab_size")
    if d.weights:
        if len(d.weights) != len(d.paths):
            raise UserError(f"data.weights has {len(d.weights)} entries but data.paths has "
                            f"{len(d.paths)}; give one weight per path, or [] for token-count weights")
        if any(w < 0 for w in d.weights):
            raise UserError(f"data.weights must be >= 0, got {d.weights}")
        if not any(w > 0 for w in d.weights):
            raise UserError("data.weights are all 0; give at least one source a positive weight")
    if data_vocab_size is not None:
        if data_vocab_size <= 0:
            raise UserError(f"the data's vocabulary size must be positive, got {data_vocab_size}")
        if m.vocab_size is not None and m.vocab_size < data_vocab_size:
            raise UserError(f"the data's vocabulary ({data_vocab_size}) does not fit model.vocab_size "
                            f"({m.vocab_size}); set model.vocab_size >= {data_vocab_size} or null")
        return data_vocab_size
    if m.vocab_size is None:
        raise UserError("model.vocab_size is null and the data's vocabulary is unknown; "
                        "prepare the data first or set model.vocab_size")
    return m.vocab_size


def _check_deepspeed_passthrough(cfg: Config) -> None:
    ds = cfg.deepspeed
    for key, owner in DEEPSPEED_OWNED_KEYS.items():
        node = ds
        parts = key.split(".")
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise UserError(f"deepspeed.{key} is generated from {owner}; remove it from the "
                            f"deepspeed: section and set that instead")


def resolve(cfg: Config, world_size: int, data_vocab_size: int | None = None, *,
            cuda_available: bool | None = None) -> Layout:
    """Validate `cfg` for a job of `world_size` processes; return its `Layout`.

    data_vocab_size: the vocabulary of the prepared data (from its manifest), or None when
    unknown (synthetic data, or --plan without data: model.vocab_size is used).
    cuda_available: None = ask torch (used for train.device 'auto' and the fp16-on-CPU rule).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise UserError(f"world size must be a positive integer, got {world_size}")
    check_fields(cfg)
    _check_model(cfg)
    _check_wandb(cfg)
    device = _device(cfg, cuda_available)
    dp, tp, pp = _degrees(cfg, world_size)
    global_batch, accum = _batch_plan(cfg, dp)
    _check_schedule(cfg)
    vocab = _check_data(cfg, data_vocab_size)
    padded = padded_vocab(max(vocab, cfg.model.vocab_size or 0), cfg.model.vocab_multiple, tp)
    _check_deepspeed_passthrough(cfg)
    return Layout(world_size=world_size, dp=dp, tp=tp, pp=pp, micro_batch_size=cfg.train.micro_batch_size,
                  grad_accum=accum, global_batch_size=global_batch, vocab_size=vocab,
                  padded_vocab_size=padded, zero_stage=cfg.parallel.zero_stage, device=device)


def _check_wandb(cfg: Config) -> None:
    if cfg.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("logging.wandb is true but wandb is not installed; pip install 'pretrain[wandb]' "
                            "(or wandb), or set logging.wandb false")


def _device(cfg: Config, cuda_available: bool | None) -> str:
    """'cpu' or 'cuda' for train.device (auto: cuda when there is one); fp16 needs a GPU."""
    t = cfg.train
    if t.device == "cpu":
        device = "cpu"
    else:
        has_cuda = _cuda_available() if cuda_available is None else cuda_available
        if t.device == "cuda" and not has_cuda:
            raise UserError("train.device is 'cuda' but no CUDA device is available; "
                            "use train.device 'auto' or 'cpu'")
        device = "cuda" if has_cuda else "cpu"
    if t.precision == "fp16" and device == "cpu":
        why = "train.device is 'cpu'" if t.device == "cpu" else "no CUDA device is available"
        raise UserError(f"train.precision 'fp16' needs a GPU ({why}); use train.precision bf16 or fp32")
    return device


def _degrees(cfg: Config, world_size: int) -> tuple[int, int, int]:
    """(data, tensor, pipeline) degrees for `world_size`, checked against the model and ZeRO."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor, p.pipeline
    if p.data is None:
        if world_size % (tp * pp):
            raise UserError(f"the world size ({world_size}) is not divisible by parallel.tensor ({tp}) x "
                            f"parallel.pipeline ({pp}) = {tp * pp}; launch a multiple of {tp * pp} "
                            f"processes or change the parallel degrees")
        dp = world_size // (tp * pp)
    else:
        dp = p.data
        if dp * tp * pp != world_size:
            raise UserError(f"parallel.data ({dp}) x parallel.tensor ({tp}) x parallel.pipeline ({pp}) = "
                            f"{dp * tp * pp}, but the world size is {world_size}; launch {dp * tp * pp} "
                            f"processes or set parallel.data null to derive it")
    _check_tensor(cfg, tp)
    if m.n_layer < pp:
        raise UserError(f"model.n_layer ({m.n_layer}) must be >= parallel.pipeline ({pp}): every stage "
                        f"needs at least one block; lower parallel.pipeline")
    if pp > 1 and p.zero_stage >= 2:
        raise UserError("ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism; "
                        "use parallel.zero_stage 0 or 1 (or parallel.pipeline 1)")
    if p.offload_optimizer and p.zero_stage < 2:
        raise UserError(f"parallel.offload_optimizer needs parallel.zero_stage 2 or 3 "
                        f"(got {p.zero_stage}); raise the stage or set offload_optimizer false")
    return dp, tp, pp


def _check_tensor(cfg: Config, tp: int) -> None:
    """Heads, kv heads, MLP width and (sequence parallelism) seq_len must split over `tp` ranks."""
    m = cfg.model
    kv = m.n_kv_head if m.n_kv_head is not None else m.n_head
    if tp > 1:
        if m.n_head % tp:
            raise UserError(f"model.n_head ({m.n_head}) must be divisible by parallel.tensor ({tp}); "
                            f"use a tensor-parallel degree that divides the head count")
        if kv % tp:
            raise UserError(f"model.n_kv_head ({kv}) must be divisible by parallel.tensor ({tp}); "
                            f"use more kv heads or a smaller tensor-parallel degree")
        if m.ffn_dim() % tp:  # the same d_ff default the model uses
            raise UserError(f"the MLP width ({m.ffn_dim()}, model.d_ff) must be divisible by "
                            f"parallel.tensor ({tp}); set model.d_ff to a multiple of {tp}")
    if cfg.parallel.sequence_parallel:
        if tp == 1:
            raise UserError("parallel.sequence_parallel needs parallel.tensor > 1; "
                            "set sequence_parallel false or raise the tensor-parallel degree")
        if m.seq_len % tp:
            raise UserError(f"parallel.sequence_parallel splits model.seq_len ({m.seq_len}) over "
                            f"parallel.tensor ({tp}); use a seq_len divisible by {tp}")


def _batch_plan(cfg: Config, dp: int) -> tuple[int, int]:
    """(global batch, gradient accumulation) from train.micro_batch_size / global_batch_size."""
    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if global_batch is None:
        return micro * dp, 1
    if global_batch % (micro * dp):
        step = micro * dp
        lo, hi = (global_batch // step) * step, (global_batch // step + 1) * step
        near = f"{lo} or {hi}" if lo else f"{hi}"
        raise UserError(f"train.global_batch_size ({global_batch}) must be a multiple of "
                        f"train.micro_batch_size ({micro}) x data-parallel size ({dp}) = {step}; "
                        f"use e.g. {near}, or change train.micro_batch_size")
    return global_batch, global_batch // (micro * dp)


def _check_schedule(cfg: Config) -> None:
    s, t = cfg.schedule, cfg.train
    if s.warmup_steps > t.max_steps:
        raise UserError(f"schedule.warmup_steps ({s.warmup_steps}) must be <= train.max_steps "
                        f"({t.max_steps}); shorten the warmup")
    if s.min_lr > cfg.optim.lr:
        raise UserError(f"schedule.min_lr ({s.min_lr}) must be <= optim.lr ({cfg.optim.lr})")


def tokens_per_step(cfg: Config, layout: Layout) -> int:
    """Tokens consumed by one optimizer step (global batch x sequence length)."""
    return layout.global_batch_size * cfg.model.seq_len

