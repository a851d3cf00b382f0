"""Analytic run planning: memory per rank, checkpoint size and layout advice.

Nothing here builds a model or touches a device; `--plan` prints `format_plan(cfg, layout)`.

Parameter counts and FLOPs per token live in `pretrain.model.size`, the pipeline split in
`pretrain.parallel.partition`.

Memory (`memory_estimate`): bytes per rank under the ZeRO stage and precision, checked
against measured ranks by tools/bench_memory.py (docs/PERFORMANCE.md).
  weights + gradients + optimizer per parameter: fp32 4 + 4 + 8 (Adam moments); mixed
  precision (bf16/fp16) 2 + 2 + 12 (fp32 master weights and moments). ZeRO-1 shards the
  optimizer state over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the
  weights. What DeepSpeed actually allocates on top (measured, DeepSpeed 0.19):
  * ZeRO-1/2 in fp32 keep a separate fp32 master partition: 12 bytes per parameter / dp
    (ZeRO-3 fp32 steps its fp32 partitions in place: 8);
  * ZeRO-2's gradient partition comes with its reduce bucket (reduce_bucket_size elements,
    5e8), so a rank holds min(P, P/dp + bucket) gradients;
  * ZeRO-3 keeps gathered full weights alive up to stage3_max_live_parameters (1e9 in our
    config: a whole stage below that size), and the largest layer's gradient (usually the
    embedding's) exists whole before its reduce-scatter.
  Tensor parallelism divides each stage's parameters by tp, pipeline parallelism gives each
  stage its own layers.
Host memory per rank (`host_memory`): at model build, the process baseline (torch and
DeepSpeed imported) plus one full fp32 parameter (each is drawn whole, then sliced:
`pretrain.parallel.spec`) plus, when the parameters live on the CPU, this rank's fp32
pieces (ZeRO-3: its partitions plus the one layer being partitioned); in the steady state
the baseline plus, on the CPU, the whole device estimate below, or on a GPU the offloaded
optimizer. Checked against measured ranks by tools/bench_build.py (docs/PERFORMANCE.md).
Activations per micro-batch follow Korthikanti et al. 2022 (see REFERENCE.md):
s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit precision, s*b*h*(10 + 24/t + 5*a*s/(h*t))
with tensor parallelism t, s*b*h/t*(34 + 5*a*s/h) with sequence parallelism, and 2*s*b*h
(/t with sequence parallelism) per layer with full recomputation
(model.activation_checkpointing) plus one layer's full activations while it is recomputed.
fp32 doubles them (measured: 68 bytes per s*b*h per layer, fp32, no dropout). The 5*a*s/h
term is the stored attention matrix: the model's SDPA (flash / memory-efficient on GPU,
the flash kernel on CPU) does not store it, so `total` leaves it out and
`total_stored_attention` is the upper bound for a math-attention fallback. The loss is fused
with the output projection and computed in chunks (`_loss_bytes`), on a pipeline's last
stage too. Under pipeline parallelism (1F1B) stage i keeps up to
min(pp - i, grad_accum) micro-batches in flight. Not included: CUDA context and kernels'
workspaces (~1-3 GiB), allocator fragmentation.
"""
from __future__ import annotations

import math
from typing import Any

from pretrain.config.deepspeed import deepspeed_config
from pretrain.config.schema import LOSS_CHUNK_ELEMENTS, Config, ModelConfig
from pretrain.model.size import count_params, ffn_dim, head_dim, kv_heads
from pretrain.parallel.partition import pipeline_layer_params, stage_bounds

__all__ = ["memory_estimate", "host_memory", "layout_advice", "checkpoint_bytes"]

GiB = 2**30
# RSS of a rank with torch and DeepSpeed imported and the process group up, before the model
# (measured: 0.32-0.33 GiB on the CPU ranks of tools/bench_build.py; a CUDA context adds more).
HOST_BASELINE = int(0.35 * GiB)


# --------------------------------------------------------------------------- memory
def _activation_bytes_per_layer(cfg: Config, micro: int, tp: int, fused: bool = False) -> tuple[float, float]:
    """(stored bytes per layer, one layer's full activations while recomputed) for one
    micro-batch. fused=True drops the 5*a*s/h attention-matrix term (flash attention)."""
    m, p = cfg.model, cfg.parallel
    s, b, h, a, t = m.seq_len, micro, m.d_model, m.n_head, tp
    sbh = s * b * h
    attn = 0.0 if fused else 5 * a * s / h
    if t == 1:
        full = sbh * (34 + attn)
    elif p.sequence_parallel:
        full = sbh / t * (34 + attn)
    else:
        full = sbh * (10 + 24 / t + attn / t)
    scale = 2.0 if cfg.train.precision == "fp32" else 1.0  # the formula assumes 16-bit activations
    full *= scale
    if m.activation_checkpointing:
        stored = 2 * sbh * scale / (t if p.sequence_parallel else 1)
        return stored, full
    return full, 0.0


def _loss_bytes(cfg: Config, layout: Any) -> float:
    """Activation bytes of the loss on the stage holding the output head. The loss is fused with
    the head's projection (`pretrain.model.loss`; a pipeline's last stage too, its head handing
    the loss hidden states): it keeps the fp32 gradient of the head weight (V x d / t) and of its
    input (s x b x d) for the backward, plus up to three transient fp32 chunks of logits (the
    chunk, its softmax, its gradient)."""
    m, tp = cfg.model, layout.tp
    n_logits = m.seq_len * layout.micro_batch_size * layout.padded_vocab_size / tp
    return (4 * layout.padded_vocab_size * m.d_model / tp + 4 * m.seq_len * layout.micro_batch_size * m.d_model
            + 3 * 4 * min(LOSS_CHUNK_ELEMENTS, n_logits))


def memory_estimate(cfg: Config, layout: Any) -> dict[str, Any]:
    """Estimated bytes per rank on the busiest pipeline stage (see the module docstring).

    Keys: params (parameters held by one rank before ZeRO sharding), weights, gradients,
    optimizer (device), optimizer_cpu (host, when offloading), buffers (ZeRO-3's gathered
    layer), activations (one micro-batch, logits included, no stored attention matrix),
    logits, in_flight (micro-batches alive at once), total (device: weights + gradients +
    optimizer + buffers + activations x in_flight), stage, per_stage (totals), and
    activations_stored_attention / total_stored_attention: the same when the attention
    implementation stores the s x s matrix (math SDPA).
    """
    m = cfg.model
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    mixed = cfg.train.precision in ("bf16", "fp16")
    zero = layout.zero_stage
    w_b, g_b = (2, 2) if mixed else (4, 4)
    o_b = 12 if mixed or zero in (1, 2) else 8  # + fp32 master partition (DeepSpeed ZeRO-1/2 also in fp32)
    shard_w = dp if zero >= 3 else 1
    shard_o = dp if zero >= 1 else 1
    zcfg = deepspeed_config(cfg, layout).get("zero_optimization", {})  # the sizes the engine gets
    bucket = zcfg.get("reduce_bucket_size", 0)  # ZeRO-2: beside the gradient partition
    max_live = zcfg.get("stage3_max_live_parameters", 0)  # ZeRO-3: gathered weights kept alive

    layers = pipeline_layer_params(m, layout.padded_vocab_size)
    if pp == 1:
        bounds = [(0, len(layers))]
        c = count_params(m, layout.padded_vocab_size)  # one copy of a tied embedding
        layers = layers[:-1] + [("head", c["final_norm"] + c["head"])]
    else:
        bounds = stage_bounds(cfg, layout.padded_vocab_size, pp)

    stored, recompute = _activation_bytes_per_layer(cfg, layout.micro_batch_size, tp, fused=True)
    stored_a, recompute_a = _activation_bytes_per_layer(cfg, layout.micro_batch_size, tp)
    logit_bytes = _loss_bytes(cfg, layout)

    stages = []
    for i, (start, stop) in enumerate(bounds):
        names = [n for n, _ in layers[start:stop]]
        stage_params = sum(w for _, w in layers[start:stop])
        params = math.ceil(stage_params / tp)
        n_blocks = sum(1 for n in names if n.startswith("block"))
        logits = logit_bytes if "head" in names else 0.0
        acts = n_blocks * stored + (recompute if n_blocks else 0) + logits
        acts_a = n_blocks * stored_a + (recompute_a if n_blocks else 0) + logits
        in_flight = min(pp - i, layout.grad_accum) if pp > 1 else 1
        weights = w_b * math.ceil(params / shard_w)
        if zero >= 3:
            grads = g_b * math.ceil(params / dp)
        elif zero == 2:
            grads = g_b * min(params, math.ceil(params / dp) + bucket)
        else:
            grads = g_b * params
        optim = o_b * math.ceil(params / shard_o)
        optim_cpu = 0
        if cfg.parallel.offload_optimizer:
            optim, optim_cpu = 0, optim
        # ZeRO-3 keeps gathered weights alive up to stage3_max_live_parameters (1e9, our config),
        # and the largest layer's gradient exists whole before its reduce-scatter.
        largest = math.ceil(max(w for _, w in layers[start:stop]) / tp)
        buffers = w_b * min(params, max_live) + g_b * largest if zero >= 3 and dp > 1 else 0
        states = weights + grads + optim + buffers
        total = states + acts * in_flight
        total_a = states + acts_a * in_flight
        stages.append({
            "stage": i, "params": params, "blocks": n_blocks, "weights": weights,
            "gradients": grads, "optimizer": optim, "optimizer_cpu": optim_cpu, "buffers": buffers,
            "activations": int(math.ceil(acts)), "logits": int(math.ceil(logits)),
            "activations_stored_attention": int(math.ceil(acts_a)),
            "in_flight": in_flight, "total": int(math.ceil(total)),
            "total_stored_attention": int(math.ceil(total_a)),
        })
    worst = max(stages, key=lambda st: st["total"])
    out = dict(worst)
    out["per_stage"] = [st["total"] for st in stages]
    return out


def checkpoint_bytes(cfg: Config, layout: Any) -> int:
    """Estimated size of one checkpoint on disk, all ranks together: the weights in the training
    dtype plus the optimizer state (the fp32 master copy where DeepSpeed keeps one, and Adam's
    two moments), with the per-byte counts of `memory_estimate`."""
    mixed = cfg.train.precision in ("bf16", "fp16")
    w_b = 2 if mixed else 4
    o_b = 12 if mixed or layout.zero_stage in (1, 2) else 8
    return count_params(cfg.model, layout.padded_vocab_size)["total"] * (w_b + o_b)


def _largest_param(m: ModelConfig, padded_vocab: int) -> int:
    """Elements of the largest single parameter (drawn whole at build time)."""
    d, f, hd = m.d_model, ffn_dim(m), head_dim(m)
    return max(padded_vocab * d, (m.n_head + 2 * kv_heads(m)) * hd * d, d * f, m.seq_len * d)


def host_memory(cfg: Config, layout: Any) -> dict[str, int]:
    """Estimated host bytes per rank on the busiest pipeline stage: {'build': peak while the model
    is built, 'steady': while training} (see the module docstring)."""
    m, dp, tp, pp = cfg.model, layout.dp, layout.tp, layout.pp
    V = layout.padded_vocab_size
    on_cpu = layout.device == "cpu"
    draw = 4 * _largest_param(m, V)
    layers = pipeline_layer_params(m, V)
    if pp == 1:
        c = count_params(m, V)
        layers = layers[:-1] + [("head", c["final_norm"] + c["head"])]
        bounds = [(0, len(layers))]
    else:
        bounds = stage_bounds(cfg, V, pp)
    build = 0
    for start, stop in bounds:
        params = math.ceil(sum(w for _, w in layers[start:stop]) / tp)
        held = 0
        if on_cpu:
            if layout.zero_stage == 3 and dp > 1:  # partitions, and one whole layer being partitioned
                held = 4 * math.ceil(params / dp) + 4 * math.ceil(max(w for _, w in layers[start:stop]) / tp)
            else:
                held = 4 * params
        build = max(build, held)
    mem = memory_estimate(cfg, layout)
    steady = mem["total"] + mem["optimizer_cpu"] if on_cpu else mem["optimizer_cpu"]
    return {"build": HOST_BASELINE + draw + build, "steady": HOST_BASELINE + steady}


def layout_advice(cfg: Config, layout: Any) -> list[str]:
    """Measured advice about a valid but slow choice (printed by --plan and at training start)."""
    out = []
    if (layout.dp == 1 and layout.zero_stage in (1, 2) and cfg.train.precision == "fp32"
            and not cfg.parallel.offload_optimizer):
        out.append(f"note: parallel.zero_stage {layout.zero_stage} with one data-parallel rank shards nothing; in "
                   "fp32, parallel.zero_stage 0 skips DeepSpeed's flat-buffer copies and is faster "
                   "(figures: docs/PERFORMANCE.md, Training throughput)")
    return out
