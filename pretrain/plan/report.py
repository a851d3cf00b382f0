"""The human-readable plan that `pretrain-train --plan` prints, from the figures of
`pretrain.plan.estimate` (parameters, FLOPs, batch plan, layout, memory and checkpoint estimates).
Imports neither torch nor the model, like pretrain.plan.estimate."""
from __future__ import annotations

from typing import Any

from pretrain.config.schema import Config
from pretrain.model.size import count_params, ffn_dim, flops_per_token, head_dim, kv_heads, matmul_params
from pretrain.parallel.partition import pipeline_layer_params, stage_blocks, stage_bounds
from pretrain.plan.estimate import GiB, checkpoint_bytes, host_memory, layout_advice, memory_estimate


def _si(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "-"
    return f"{idx[0]}" if len(idx) == 1 else f"{idx[0]}-{idx[-1]}"


def format_plan(cfg: Config, layout: Any) -> str:
    """The human-readable plan printed by `--plan`: model, batch, layout, pipeline stages, memory."""
    lines = _model(cfg, layout) + [""] + _batch(cfg, layout) + [""] + _layout(cfg, layout)
    if layout.pp > 1:
        lines += [""] + _stages(cfg, layout)
    lines += [""] + _memory(cfg, layout) + layout_advice(cfg, layout)
    return "\n".join(lines)


def _model(cfg: Config, layout: Any) -> list[str]:
    m, V = cfg.model, layout.padded_vocab_size
    c, fpt = count_params(m, V), flops_per_token(m, V)
    mlp = f"{'SwiGLU' if m.mlp == 'swiglu' else 'GELU'} MLP {ffn_dim(m)}"
    attn = f"{m.n_head} heads (head_dim {head_dim(m)})"
    if kv_heads(m) != m.n_head:
        attn += f", {kv_heads(m)} kv heads (GQA)"
    return ["Model",
            f"  {m.n_layer} layers x d_model {m.d_model}, {attn}, {mlp}",
            f"  {'RoPE' if m.position == 'rope' else 'learned'} positions, "
            f"{'RMSNorm' if m.norm == 'rmsnorm' else 'LayerNorm'}, "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings, bias {'on' if m.bias else 'off'}, "
            f"seq_len {m.seq_len}",
            f"  vocabulary: {layout.vocab_size} -> padded {V} (multiple of {m.vocab_multiple} x tp {layout.tp})",
            f"Parameters: {c['total']:,} ({_si(c['total'])}); embedding {c['embedding']:,}, "
            f"non-embedding {c['non_embedding']:,}",
            f"FLOPs per token: {fpt:,} ({_si(fpt)}) = 6N + 12*L*d*T, N = {matmul_params(m, V):,} "
            f"(parameters except lookup-only embeddings)"]


def _batch(cfg: Config, layout: Any) -> list[str]:
    t = cfg.train
    tokens_step = layout.global_batch_size * cfg.model.seq_len
    total_tokens = tokens_step * t.max_steps
    flops = total_tokens * flops_per_token(cfg.model, layout.padded_vocab_size)
    per_step = (f"  micro {layout.micro_batch_size} x accumulation {layout.grad_accum} x data-parallel "
                f"{layout.dp} = global {layout.global_batch_size} sequences = {tokens_step:,} tokens per step")
    return ["Batch", per_step, f"  {t.max_steps:,} steps = {total_tokens:,} tokens ({_si(total_tokens)}), {flops:.3g} FLOPs"]


def _layout(cfg: Config, layout: Any) -> list[str]:
    p = cfg.parallel
    lines = ["Layout",
             f"  world {layout.world_size} = data {layout.dp} x tensor {layout.tp} x pipeline {layout.pp}; "
             f"ZeRO-{layout.zero_stage}{' + optimizer offload' if p.offload_optimizer else ''}, "
             f"{cfg.train.precision}, device {layout.device}"
             f"{', sequence parallel' if p.sequence_parallel else ''}"
             f"{', activation checkpointing' if cfg.model.activation_checkpointing else ''}",
             "  global rank = (pp_idx * dp + dp_idx) * tp + tp_idx  (DeepSpeed axis order: pipe, data, model)"]
    if layout.tp == 1:  # a stage's ranks are contiguous: one line per stage
        for pi in range(layout.pp):
            first, last = layout.rank(pi, 0, 0), layout.rank(pi, layout.dp - 1, 0)
            lines.append(f"  pp {pi}: rank{'s' if last > first else ''} {_ranges(list(range(first, last + 1)))} "
                         f"= dp {_ranges(list(range(layout.dp)))}")
        return lines
    rows = [(pi, di) for pi in range(layout.pp) for di in range(layout.dp)]
    for row in rows if len(rows) <= 32 else rows[:16] + [None] + rows[-8:]:
        if row is None:
            lines.append(f"  ... ({len(rows) - 24} more)")
            continue
        pi, di = row
        ranks = [layout.rank(pi, di, ti) for ti in range(layout.tp)]
        lines.append(f"  pp {pi}, dp {di}: ranks {_ranges(ranks)} (tp 0-{layout.tp - 1})")
    return lines


def _stages(cfg: Config, layout: Any) -> list[str]:
    V, n_st, m_b = layout.padded_vocab_size, layout.pp, layout.grad_accum
    lines = [f"Pipeline stages ({cfg.parallel.pipeline_partition} partition)"]
    names = [n for n, _ in pipeline_layer_params(cfg.model, V)]
    for i, (blocks, (start, stop)) in enumerate(zip(stage_blocks(cfg, V, n_st), stage_bounds(cfg, V, n_st))):
        extra = [n for n in names[start:stop] if not n.startswith("block")]
        lines.append(f"  stage {i}: {len(blocks)} blocks"
                     + (f" ({blocks.start}-{blocks.stop - 1})" if len(blocks) else "")
                     + (f" + {', '.join(extra)}" if extra else ""))
    lines.append(f"  1F1B schedule: {m_b} micro-batches per step, pipeline bubble (pp-1)/(m+pp-1) = "
                 f"{(n_st - 1) / (m_b + n_st - 1):.0%}"
                 + ("; fewer micro-batches than stages: raise train.global_batch_size" if m_b < n_st else ""))
    if cfg.model.tie_embeddings:
        lines.append(f"  tied embeddings: stage {n_st - 1} holds a copy of the token table (gradients all-reduced "
                     f"with stage 0)")
    return lines


def _memory(cfg: Config, layout: Any) -> list[str]:
    mem = memory_estimate(cfg, layout)
    where = f" for pipeline stage {mem['stage']}, the largest" if layout.pp > 1 else ""
    lines = [f"Memory per rank (estimate{where})",
             f"  parameters       {mem['params']:,} per rank before ZeRO sharding"
             + (f" (/ tp {layout.tp})" if layout.tp > 1 else ""),
             f"  weights          {_gib(mem['weights'])}",
             f"  gradients        {_gib(mem['gradients'])}",
             f"  optimizer        {_gib(mem['optimizer'])}"
             + (f"   (+{_gib(mem['optimizer_cpu']).strip()} on the CPU)" if mem["optimizer_cpu"] else "")]
    if mem["buffers"]:
        lines.append(f"  ZeRO-3 gathered  {_gib(mem['buffers'])}   (live full weights, the largest layer's gradient)")
    acts = f"  activations      {_gib(mem['activations'])}   per micro-batch (logits {_gib(mem['logits']).strip()})"
    lines.append(acts + (f" x {mem['in_flight']} in flight" if mem["in_flight"] > 1 else ""))
    lines += [f"  total            {_gib(mem['total'])}",
              f"  (with math attention storing the s x s matrix: {_gib(mem['total_stored_attention']).strip()}, "
              f"activations {_gib(mem['activations_stored_attention']).strip()})"]
    if layout.pp > 1:
        lines.append("  per stage: " + ", ".join(f"{x / GiB:.1f}" for x in mem["per_stage"]) + " GiB")
    lines.append("  (not included: CUDA context/workspaces ~1-3 GiB, allocator fragmentation)")
    ck = checkpoint_bytes(cfg, layout)
    ck_size = f"{ck / 2**20:.1f} MiB" if ck < GiB else _gib(ck).strip()
    lines.append(f"Checkpoint on disk (estimate): {ck_size} per save, all ranks (weights + optimizer state)")
    host = host_memory(cfg, layout)
    lines.append(f"Host memory per rank (estimate): {_gib(host['build']).strip()} at model build, "
                 f"{_gib(host['steady']).strip()} in the steady state"
                 + (" (the parameters live in host memory)" if layout.device == "cpu" else ""))
    return lines
