"""Configuration schema: one dataclass per YAML section, a docstring per field.

The docstring under each field is the user documentation: `docs/CONFIG.md` is
generated from it (`python -m pretrain.config.docs`), and a test checks the
committed file is current. Field types are enforced when loading YAML and dotted
overrides (see `load.py`); cross-field rules live in `validate.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Logits per chunk of the fused output-projection + cross-entropy loss (pretrain.model.loss;
# 128 MiB in fp32). A fixed size, not a config field: here so that the torch-free --plan
# (pretrain.plan.estimate) and the loss read the same number.
LOSS_CHUNK_ELEMENTS = 2**25

# The model-section fields that fix the shapes of the parameters (with the padded vocabulary, and
# seq_len for learned positions): what a checkpoint records as its model shape, and what an
# imported model must match.
SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "position", "norm", "mlp", "bias", "tie_embeddings")

# train.precision -> the torch dtype's name (torch-free here: the planner and validation run without torch).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ModelConfig:
    """The GPT architecture. Defaults are GPT-2 (learned positions, LayerNorm, GELU, biases, tied embeddings)."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of attention (query) heads; must divide d_model."""
    n_kv_head: Optional[int] = None
    """Key/value heads for grouped-query attention; must divide n_head. null = n_head (multi-head attention)."""
    d_model: int = 768
    """Residual stream width (hidden size)."""
    d_ff: Optional[int] = None
    """MLP hidden width. null = 4*d_model for gelu, or 8/3*d_model rounded up to a multiple of 256 for swiglu."""
    vocab_size: Optional[int] = None
    """Vocabulary size. null = taken from the data manifest; must be >= the data's vocabulary.
    Padded up to a multiple of vocab_multiple x parallel.tensor."""
    vocab_multiple: int = 128
    """Pad the embedding table to a multiple of this (times the tensor-parallel degree) for fast matmuls."""
    seq_len: int = 1024
    """Training sequence length; also the number of learned positions (max context)."""
    position: str = "learned"
    """Position encoding: 'learned' (GPT-2 absolute positions) or 'rope' (rotary)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (position: rope only)."""
    norm: str = "layernorm"
    """Normalisation: 'layernorm' or 'rmsnorm'."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    mlp: str = "gelu"
    """MLP type: 'gelu' (GELU with tanh approximation, GPT-2) or 'swiglu' (Llama)."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2: true, Llama: false)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head weight."""
    dropout: float = 0.0
    """Dropout on attention output, MLP output and embeddings (0 for pretraining at scale)."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual output projections use init_std/sqrt(2*n_layer)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""

    def ffn_dim(self) -> int:
        """The MLP hidden width: d_ff, else 4*d_model (gelu) or 8/3*d_model rounded up to 256 (swiglu)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-int(8 * self.d_model / 3) // 256) * 256
        return 4 * self.d_model


@dataclass
class DataConfig:
    """Where the token shards are and how samples are drawn from them."""

    paths: list = field(default_factory=list)
    """Data sources: manifest directories written by pretrain-prep, or Megatron prefixes (path without .bin/.idx)."""
    weights: list = field(default_factory=list)
    """Blend weights, one per path (normalised). Empty = proportional to each source's token count."""
    train_split: str = "train"
    """Split of each manifest used for training."""
    valid_split: str = "valid"
    """Split of data.paths used for validation (when valid_paths is empty). A source without it is left
    out of validation with a warning; missing in every source = validation is skipped with a warning."""
    valid_paths: list = field(default_factory=list)
    """Validation data kept apart from data.paths (Megatron's --valid-data-path, NeoX's valid_data_paths):
    pretrain-prep outputs (every split of each is read) or Megatron prefixes. Empty = valid_split of data.paths."""
    test_split: str = "test"
    """Split of data.paths evaluated once at the end of the run (test/loss), where present (test_paths empty)."""
    test_paths: list = field(default_factory=list)
    """Test data kept apart from data.paths (Megatron's --test-data-path), evaluated once at the end of
    the run; read like valid_paths. Empty = test_split of data.paths."""
    seed: int = 1234
    """Seed of the sample-index shuffle (independent of the model seed)."""
    cache_dir: Optional[str] = None
    """Where sample indices are cached. null = <train.out_dir>/index_cache."""
    synthetic: bool = False
    """Use random tokens instead of shards (benchmarks and smoke tests); needs model.vocab_size."""
    reset_attention_mask: bool = False
    """Block-causal attention: a token attends only to the tokens of its own document in a packed
    window of seq_len + 1 tokens cut across documents (EOD tokens separate them). Megatron's
    --reset-attention-mask, torchtitan's block_causal mask; GPT-NeoX has none (docs/DATA.md,
    "Packing and documents")."""
    reset_position_ids: bool = False
    """Positions restart at 0 at each document of a window, for learned and RoPE positions.
    Megatron's --reset-position-ids (GPT-NeoX has none)."""
    eod_mask_loss: bool = False
    """No loss where the input token is EOD (its target is the next document's first token).
    Megatron's --eod-mask-loss, GPT-NeoX's eod_mask_loss. The training loss is then the mean over the
    unmasked tokens of the whole global batch, the same in every layout and micro-batch split."""
    eod_token_id: Optional[int] = None
    """The token id that ends each document, for the three options above (an EOD belongs to the
    document it ends). null = the eos_id that pretrain-prep appended to every document (from the
    data's manifest). Needed for Megatron prefixes without a manifest and for data.synthetic; with a
    manifest it must equal its eos_id. Refused before step 1: data prepared with --no-eos, sources
    with different EOD ids, an EOD that is also the BOS prep put before every document, or a
    padding/unknown/mask token (docs/DATA.md, "Packing and documents")."""
    document_attention: str = "auto"
    """How block-causal attention runs: 'auto' (FlexAttention on CUDA, SDPA with a boolean mask
    elsewhere), 'sdpa' or 'flex'. Logged once at start-up."""

    def separates_documents(self) -> bool:
        """Whether any of reset_attention_mask, reset_position_ids, eod_mask_loss is on (they need the EOD)."""
        return bool(self.reset_attention_mask or self.reset_position_ids or self.eod_mask_loss)


@dataclass
class ParallelConfig:
    """How the job is laid out over processes. data x tensor x pipeline = world size."""

    tensor: int = 1
    """Tensor-parallel degree (Megatron-style column/row-parallel blocks)."""
    pipeline: int = 1
    """Pipeline-parallel degree (DeepSpeed PipelineModule stages)."""
    data: Optional[int] = None
    """Data-parallel degree. null = world_size / (tensor * pipeline)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3. Pipeline parallelism allows 0 or 1."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO 2/3 only)."""
    sequence_parallel: bool = False
    """Shard norm/dropout activations along the sequence across tensor-parallel ranks."""
    pipeline_partition: str = "parameters"
    """How layers are split into stages: 'parameters' (balance parameter counts) or 'uniform' (layers)."""
    timeout_minutes: float = 30.0
    """Collective timeout: a dead peer makes the survivors fail after this long instead of hanging."""


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 6e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices."""
    decay_norms_and_biases: bool = False
    """Also decay biases and norm gains (usually not)."""
    decay_embeddings: bool = False
    """Also decay the token/position embeddings (usually not)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then a decay to min_lr."""

    kind: str = "cosine"
    """After warmup: 'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to optim.lr."""
    decay_steps: Optional[int] = None
    """Steps over which the decay runs (after warmup). null = train.max_steps - warmup_steps."""
    min_lr: float = 0.0
    """Floor of the decay (absolute learning rate)."""
    wsd_decay_fraction: float = 0.2
    """wsd only: the final fraction of decay_steps spent decaying linearly to min_lr."""


@dataclass
class TrainConfig:
    """The training run itself."""

    out_dir: str = "runs/default"
    """Run directory: checkpoints, TensorBoard logs, resolved config."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks = micro_batch_size x grad accumulation x data-parallel size.
    null = micro_batch_size x data-parallel size (no accumulation)."""
    precision: str = "bf16"
    """'fp32', 'bf16' (autocast-free DeepSpeed bf16) or 'fp16' (dynamic loss scaling, GPU only)."""
    device: str = "auto"
    """'auto' (GPU when available), 'cpu' or 'cuda'."""
    seed: int = 42
    """Model initialisation and dropout seed."""
    eval_interval: int = 0
    """Validate every this many steps (0 = only at the end)."""
    eval_steps: int = 10
    """Micro-batches per rank in a validation pass."""
    max_consecutive_skips: Optional[int] = None
    """Stop with a checkpoint of the last good state after this many skipped steps in a row.
    null = streaks are left to guard.rollback_after (and stop after guard.max_rollbacks)."""
    compile: bool = False
    """torch.compile each transformer block (plain, tensor- and pipeline-parallel models; refused with ZeRO-3)."""


@dataclass
class CheckpointConfig:
    """Checkpoints: DeepSpeed shards plus our own JSON state, committed atomically."""

    interval: int = 0
    """Save every this many steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Committed checkpoints to keep; older ones are deleted after a new one commits, once a newer kept
    one is fsynced (the previous save at each periodic save; with 1, the new one before its commit)."""
    resume: str = "auto"
    """'auto' (the newest checkpoint that verifies and loads, see verify; none committed: start fresh),
    'none', or a checkpoint directory."""
    dir: Optional[str] = None
    """Checkpoint directory. null = <train.out_dir>/checkpoints."""
    init_from: Optional[str] = None
    """Start from these model weights instead of a random initialisation (continued pretraining): a
    run directory, checkpoints/ directory or step_* directory of ours (any parallel layout, merged and
    re-split for this run), or a directory written by `pretrain-convert import-hf` (or its
    model.safetensors). The step, the schedule and the data position start at 0 in the new run; the
    data may be new. A checkpoint of this run being resumed takes precedence. null = random initialisation."""
    init_optimizer: bool = False
    """With init_from = one of our checkpoints: also load its optimizer state (Adam moments and step
    count) instead of starting Adam fresh. Through `pretrain-convert reshard` when the layout differs."""
    verify: str = "full"
    """What is checked before a checkpoint is loaded (resume and init_from): 'full' checks every file
    its manifest.json lists, model and optimizer shards, state.json, RNG states and tokenizer copy:
    its size, its xxh3_128 checksum recorded at save (sha256 in older checkpoints) and its structure
    (zip and pickle of a .pt, JSON); the files are split over the ranks, and a failure on any rank
    makes resume skip the checkpoint for the previous one, with a warning naming the file.
    'sizes' (an opt-out for huge checkpoints on slow storage) skips the checksums: a flipped byte
    inside a tensor is then loaded and trained on without a word."""
    async_save: bool = True
    """Write, hash and commit checkpoints in the background: training waits only for the copy of the
    state off the device. The next save, a stop and the exit wait for the previous commit. false:
    training waits for the whole save, and state already in host memory is written from where it
    lives, with no snapshot copy."""
    allow_changes: list = field(default_factory=list)
    """Sections that may differ from the checkpoint being resumed: any of 'data', 'optim', 'schedule'.
    The trainer prints each change. Resuming with changed data keeps the sample position (the new
    data is read from the number of samples already consumed). Empty = such a resume is refused."""


@dataclass
class LoggingConfig:
    """Console, TensorBoard, metrics.jsonl and (optionally) Weights & Biases."""

    interval: int = 10
    """Print a console line and write TensorBoard scalars every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <train.out_dir>/tensorboard."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU. null = looked up from the device name (CPU: no MFU)."""
    wandb: bool = False
    """Also log the scalars to Weights & Biases (`pip install 'pretrain[wandb]'`; WANDB_MODE=offline
    writes the run under <train.out_dir>/wandb without a network, `wandb sync` uploads it later)."""
    wandb_project: str = "pretrain"
    """W&B project name (logging.wandb only); the run is named after train.out_dir."""


@dataclass
class EvalConfig:
    """Downstream evaluation with lm-evaluation-harness on the live model, in any layout
    (docs/EVAL.md; needs `pip install 'pretrain[eval]'`). Bootstrap off; every RNG is restored
    after, so the losses are those of a run without it."""

    tasks: list = field(default_factory=list)
    """lm-eval task (or group) names; empty = none. A task that cannot load (offline, a missing
    file) warns once and is dropped; training goes on."""
    interval: int = 0
    """Evaluate every this many steps, and at the end (0 = only at the end, when tasks are set)."""
    limit: Optional[int] = None
    """Documents per task (lm-eval's --limit); null = all."""
    include_path: Optional[str] = None
    """A directory of task YAMLs for tasks from local files (e.g. configs/eval, shipped offline)."""


@dataclass
class GuardConfig:
    """A long run looking after itself (docs/GUARD.md): spiking updates skipped, streaks of skipped
    steps rolled back past their data, hangs and slow ranks named. The equivalent settings of
    Megatron, OLMo-core and torchtitan are in docs/GUARD.md."""

    spike_sigma: float = 6.0
    """Skip an update whose loss or global gradient norm is more than this many standard deviations
    above the mean of the rolling window (decided on the device, by every rank alike). 0 = off.
    OLMo-core: SkipStepAdamW sigma_factor; Megatron: --check-for-spiky-loss."""
    spike_window: int = 128
    """Steps in the rolling window; no spike is called until half of it is filled, and skipped
    steps stay out of it. OLMo-core: rolling_interval_length."""
    rollback_after: int = 8
    """After this many skipped steps in a row (spikes or non-finite), every rank reloads the last
    committed checkpoint and skips the samples read since it (recorded in
    <train.out_dir>/guard/skipped_samples.json, honoured by every later resume). 0 = never.
    BigScience: --skip-train-iteration-range (by hand); Megatron: --iterations-to-skip."""
    max_rollbacks: int = 3
    """Stop with a non-zero exit, instead of rolling back, once the run has rolled back this many times."""
    step_timeout: float = 900.0
    """Seconds without a completed step (saves and validation excluded) before every rank writes
    its stacks to <train.out_dir>/hang/rank<N>.txt and exits non-zero. 0 = off.
    torchtitan: comm.train_timeout_seconds; Megatron: --distributed-timeout-minutes."""
    startup_timeout: float = 3600.0
    """The same allowance for the first step after a start or resume (model build, compile).
    torchtitan: comm.init_timeout_seconds."""
    straggler_threshold: float = 0.2
    """Name a rank on the console when its busy time per step is the slowest and more than this
    fraction above the median for straggler_windows logging windows running. Megatron: --log-straggler."""
    straggler_windows: int = 3
    """Logging windows in a row a rank must be the straggler before it is named."""


@dataclass
class Config:
    """A whole run. Every section is optional in YAML; omitted keys take these defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict = field(default_factory=dict)
    """Extra DeepSpeed config keys merged over the generated config (for keys we do not model)."""


def to_dict(cfg: Any) -> Any:
    """A plain nested dict (YAML/JSON-serialisable) of a config dataclass."""
    from dataclasses import asdict

    return asdict(cfg)
