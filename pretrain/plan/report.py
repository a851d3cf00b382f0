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
    """The human-readable plan printed by `--plan`."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    V = layout.padded_vocab_size
    c = count_params(m, V)
    fpt = flops_per_token(m, V)
    tokens_step = layout.global_batch_size * m.seq_len
    lines: list[str] = []
    add = lines.append

    mlp = f"{'SwiGLU' if m.mlp == 'swiglu' else 'GELU'} MLP {ffn_dim(m)}"
    attn = f"{m.n_head} heads (head_dim {head_dim(m)})"
    if kv_heads(m) != m.n_head:
        attn += f", {kv_heads(m)} kv heads (GQA)"
    add("Model")
    add(f"  {m.n_layer} layers x d_model {m.d_model}, {attn}, {mlp}")
    add(f"  {'RoPE' if m.position == 'rope' else 'learned'} positions, "
        f"{'RMSNorm' if m.norm == 'rmsnorm' else 'LayerNorm'}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings, bias {'on' if m.bias else 'off'}, "
        f"seq_len {m.seq_len}")
    add(f"  vocabulary: {layout.vocab_size} -> padded {V} (multiple of {m.vocab_multiple} x tp {layout.tp})")
    add(f"Parameters: {c['total']:,} ({_si(c['total'])}); embedding {c['embedding']:,}, "
        f"non-embedding {c['non_embedding']:,}")
    add(f"FLOPs per token: {fpt:,} ({_si(fpt)}) = 6N + 12*L*d*T, N = {matmul_params(m, V):,} "
        f"(parameters except lookup-only embeddings)")
    add("")
    add("Batch")
    add(f"  micro {layout.micro_batch_size} x accumulation {layout.grad_accum} x data-parallel {layout.dp} "
        f"= global {layout.global_batch_size} sequences = {tokens_step:,} tokens per step")
    total_tokens = tokens_step * t.max_steps
    add(f"  {t.max_steps:,} steps = {total_tokens:,} tokens ({_si(total_tokens)}), "
        f"{total_tokens * fpt:.3g} FLOPs")
    add("")
    add("Layout")
    add(f"  world {layout.world_size} = data {layout.dp} x tensor {layout.tp} x pipeline {layout.pp}; "
        f"ZeRO-{layout.zero_stage}{' + optimizer offload' if p.offload_optimizer else ''}, "
        f"{t.precision}, device {layout.device}"
        f"{', sequence parallel' if p.sequence_parallel else ''}"
        f"{', activation checkpointing' if m.activation_checkpointing else ''}")
    add("  global rank = (pp_idx * dp + dp_idx) * tp + tp_idx  (DeepSpeed axis order: pipe, data, model)")
    if layout.tp == 1:  # a stage's ranks are contiguous: one line per stage
        for pi in range(layout.pp):
            first, last = layout.rank(pi, 0, 0), layout.rank(pi, layout.dp - 1, 0)
            add(f"  pp {pi}: rank{'s' if last > first else ''} {_ranges(list(range(first, last + 1)))} "
                f"= dp {_ranges(list(range(layout.dp)))}")
    else:
        rows = [(pi, di) for pi in range(layout.pp) for di in range(layout.dp)]
        shown = rows if len(rows) <= 32 else rows[:16] + [None] + rows[-8:]
        for row in shown:
            if row is None:
                add(f"  ... ({len(rows) - 24} more)")
                continue
            pi, di = row
            ranks = [layout.rank(pi, di, ti) for ti in range(layout.tp)]
            add(f"  pp {pi}, dp {di}: ranks {_ranges(ranks)} (tp 0-{layout.tp - 1})")
    if layout.pp > 1:
        add("")
        add(f"Pipeline stages ({p.pipeline_partition} partition)")
        bounds = stage_bounds(cfg, V, layout.pp)
        names = [n for n, _ in pipeline_layer_params(m, V)]
        for i, (blocks, (start, stop)) in enumerate(zip(stage_blocks(cfg, V, layout.pp), bounds)):
            extra = [n for n in names[start:stop] if not n.startswith("block")]
            add(f"  stage {i}: {len(blocks)} blocks"
                + (f" ({blocks.start}-{blocks.stop - 1})" if len(blocks) else "")
                + (f" + {', '.join(extra)}" if extra else ""))
        m_b, n_st = layout.grad_accum, layout.pp
        add(f"  1F1B schedule: {m_b} micro-batches per step, pipeline bubble (pp-1)/(m+pp-1) = "
            f"{(n_st - 1) / (m_b + n_st - 1):.0%}"
            + ("; fewer micro-batches than stages: raise train.global_batch_size" if m_b < n_st else ""))
        if m.tie_embeddings:
            add(f"  tied embeddings: stage {n_st - 1} holds a copy of the token table (gradients all-reduced "
                f"with stage 0)")
    add("")
    mem = memory_estimate(cfg, layout)
    where = f" for pipeline stage {mem['stage']}, the largest" if layout.pp > 1 else ""
    add(f"Memory per rank (estimate{where})")
    add(f"  parameters       {mem['params']:,} per rank before ZeRO sharding"
        + (f" (/ tp {layout.tp})" if layout.tp > 1 else ""))
    add(f"  weights          {_gib(mem['weights'])}")
    add(f"  gradients        {_gib(mem['gradients'])}")
    add(f"  optimizer        {_gib(mem['optimizer'])}"
        + (f"   (+{_gib(mem['optimizer_cpu']).strip()} on the CPU)" if mem["optimizer_cpu"] else ""))
    if mem["buffers"]:
        add(f"  ZeRO-3 gathered  {_gib(mem['buffers'])}   (live full weights, the largest layer's gradient)")
    acts = f"  activations      {_gib(mem['activations'])}   per micro-batch (logits {_gib(mem['logits']).strip()})"
    if mem["in_flight"] > 1:
        acts += f" x {mem['in_flight']} in flight"
    add(acts)
    add(f"  total            {_gib(mem['total'])}")
    add(f"  (with math attention storing the s x s matrix: {_gib(mem['total_stored_attention']).strip()}, "
        f"activations {_gib(mem['activations_stored_attention']).strip()})")
    if layout.pp > 1:
        add("  per stage: " + ", ".join(f"{x / GiB:.1f}" for x in mem["per_stage"]) + " GiB")
    add("  (not included: CUDA context/workspaces ~1-3 GiB, allocator fragmentation)")
    ck = checkpoint_bytes(cfg, layout)
    ck_size = f"{ck / 2**20:.1f} MiB" if ck < GiB else _gib(ck).strip()
    add(f"Checkpoint on disk (estimate): {ck_size} per save, all ranks (weights + optimizer state)")
    host = host_memory(cfg, layout)
    add(f"Host memory per rank (estimate): {_gib(host['build']).strip()} at model build, "
        f"{_gib(host['steady']).strip()} in the steady state"
        + (" (the parameters live in host memory)" if layout.device == "cpu" else ""))
    for note in layout_advice(cfg, layout):
        add(note)
    return "\n".join(lines)
