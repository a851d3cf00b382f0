"""This rank's model for a layout, built without the full model: the one entry point.

    build_model(cfg, layout, topo, device) -> plain GPT | ParallelGPT | pipeline stage

Every variant is first built on the meta device; then only this rank's piece is allocated,
directly on `device`, and filled from the parameter spec (`pretrain.parallel.spec`): each
parameter's initial value is a function of (seed, name), drawn in tiles from generators seeded
by (seed, name, tile), of which a rank draws only those covering its piece. The seed is one
draw of torch's default generator, so `torch.manual_seed(s)` before `build_model` gives the
same weights in every layout.

* tensor parallelism (`apply.ParallelGPT`): this rank's slices;
* pipeline parallelism (`pipeline.build_pipeline`): this stage's layers only;
* ZeRO-3 with data parallelism: the layers are allocated one at a time (unwritten) and
  handed to `deepspeed.zero.Init(module=layer)`, which keeps this rank's partition of each
  parameter; only then is the partition filled, drawing only its own values, so a rank's
  cost is its share. `deepspeed.initialize` then finds the model already partitioned.

Layering: spec <- model <- apply <- pipeline <- build (each imports only those to its left).
"""
from __future__ import annotations

import resource
from typing import Optional

import torch
import torch.nn as nn

from pretrain import dsadapter
from pretrain.config.schema import PRECISION_DTYPES
from pretrain.model.gpt import GPT
from pretrain.parallel import spec
from pretrain.parallel.apply import ParallelGPT, materialize
from pretrain.parallel.pipeline import build_pipeline

__all__ = ["build_model", "memory_line", "optimizer_group_names"]



def build_model(cfg, layout, topo, device=None, source: Optional[spec.Source] = None,
                documents=None) -> nn.Module:
    """The model of this rank for `layout` on `device` (default: torch's default device).
    Call under the run's seed: every variant draws the same full weights. `source`: full
    tensors by plain name instead of the initial values (imported weights). `documents`: the
    run's packed-document options (`pretrain.model.documents.Documents`): a pipeline carries
    the segments between stages, and every attention layer takes its path."""
    device = torch.get_default_device() if device is None else torch.device(device)
    model = _build(cfg, layout, topo, device, source, documents)
    if documents is not None:
        from pretrain.model.layers import use_document_path

        use_document_path(model, documents.path)
    return model


def _build(cfg, layout, topo, device, source, documents) -> nn.Module:
    seed = spec.draw_seed()
    if layout.pp > 1:
        return build_pipeline(cfg, layout, topo, device, seed, source, documents)
    V = layout.padded_vocab_size
    if layout.tp > 1:
        model = ParallelGPT(cfg.model, V, topo.tp_group, cfg.parallel.sequence_parallel, device="meta")
    else:
        model = GPT(cfg.model, V, device="meta")
    if layout.zero_stage == 3 and layout.dp > 1:
        return _partitioned(model, cfg, layout, topo, device, seed, source)
    return materialize(model, cfg.model, topo.tp_group, device, seed, source=source)  # tp_group: None at tp 1


def _partitioned(model: nn.Module, cfg, layout, topo, device, seed: int, source) -> nn.Module:
    """ZeRO-3, one layer at a time: allocate it (values undefined), partition it
    (`deepspeed.zero.Init(module=...)`, no broadcast), then fill this rank's partitions
    (`spec.initialize` draws only the tiles covering them)."""
    from pretrain.config.deepspeed import deepspeed_config

    ds_config = deepspeed_config(cfg, layout)
    dtype = getattr(torch, PRECISION_DTYPES[cfg.train.precision])
    for i, layer in enumerate(model.layers()):
        if not any(True for _ in layer.parameters()):
            continue  # a tied head owns no parameter
        _allocate(layer.to(dtype), device)  # the engine expects ZeRO-3 parameters in the training precision
        dsadapter.partition_zero3(layer, data_parallel_group=topo.dp_group, config=ds_config, mpu=topo.mpu(),
                                  dtype=dtype)
        spec.initialize(layer, cfg.model, seed, tp=topo.tp, tp_rank=topo.tp_rank,
                        prefix=spec.layer_prefix(i, cfg.model.n_layer), source=source)
    return model


def _allocate(module: nn.Module, device) -> None:
    """Allocate a meta-device `module` on `device` without writing it (pages a rank never
    reads stay unmapped); its parameters' marks (tensor_model_parallel, ...) are kept."""
    marks = {n: dict(vars(p)) for n, p in module.named_parameters()}
    module.to_empty(device=device)  # new Parameter objects
    for n, p in module.named_parameters():
        vars(p).update(marks[n])


def optimizer_group_names(model: nn.Module, cfg, topo) -> dict[str, list[list[str]]]:
    """{'mp_rank_XX': the module names of each optimizer group of that model-parallel rank}
    (the names of `spec.optimizer_groups`, the groups `engine.build_engine` gives the optimizer), for every
    model-parallel rank: what a checkpoint records so that readers match optimizer state
    by name. Collective (every rank calls it)."""
    import torch.distributed as dist

    names = [g["names"] for g in spec.optimizer_groups(model, cfg.optim, cfg.model.n_layer)]
    mine = (topo.pp_rank * topo.tp + topo.tp_rank, topo.dp_rank, names)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {f"mp_rank_{mp:02d}": n for mp, dp, n in sorted(every, key=lambda e: e[:2]) if dp == 0}


def memory_line(rank: int, device: torch.device) -> str:
    """'rank R after model build: host RSS x GiB (peak y GiB), device ...' for this process."""
    gib = 2**30
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    line = f"rank {rank} after model build: host RSS {rss / gib:.2f} GiB (peak {peak / gib:.2f} GiB)"
    if device.type == "cuda":
        line += (f", {device} allocated {torch.cuda.memory_allocated(device) / gib:.2f} GiB "
                 f"(peak {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB)")
    else:
        line += ", no accelerator (parameters in host memory)"
    return line
