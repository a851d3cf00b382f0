"""Pipeline parallelism: a DeepSpeed `PipelineModule` built from the plain GPT's own layers.

The pipeline's layer list is `GPT.layers()`: [embedding, block 0 .. block L-1, head]
(L + 2 layers). Stages are split by `parallel.pipeline_partition`:

* 'uniform'    -- DeepSpeed's `partition_uniform` over the L + 2 layers;
* 'parameters' -- DeepSpeed's `partition_balanced` over the per-layer parameter counts of
                  `pretrain.plan.estimate.pipeline_layer_params` (the tied head counted with its copy
                  of the embedding, as DeepSpeed counts a TiedLayerSpec).

These are exactly the functions `--plan` prints the stage split with, so the plan and the
built pipeline agree (checked after construction).

Weights: every rank builds the plain layers on the meta device, shards its stage's layers
(still on the meta device) and allocates and fills only those (`apply.materialize`: each
parameter's initial value is a function of the run's seed and its name, drawn only where this
rank's piece lies). So each stage starts from exactly the weights of the single-process model.

Tied input/output embeddings (model.tie_embeddings): the first stage's embedding and the
last stage's head are DeepSpeed `TiedLayerSpec`s with the key 'embed' and the tied
attribute 'wte.weight': the head holds a copy of the token table, DeepSpeed broadcasts it
from the first stage at start-up and after loading, and all-reduces the two gradients
before every optimizer step (the copy is marked `ds_pipe_replicated`, so gradient norms
count it once). Untied: the head owns `lm_head`.

Loss: on the last stage, in fp32, fused with the output projection as in the single-process
model (`pretrain.model.loss`): the head (`PipeHead`) hands the final-norm hidden states, not
logits, to `PipeLoss`, which projects them onto the vocabulary a chunk of tokens at a time
(vocab-parallel under TP, `vocab_parallel_linear_cross_entropy`), so neither the stage's output
that DeepSpeed keeps until the backward nor anything saved for it is tokens x vocab (issue 20:
-76% on the last stage, docs/PERFORMANCE.md). DeepSpeed's 1F1B schedule runs
through `engine.train_batch(data_iter)` / `engine.eval_batch(...)`, where `data_iter`
yields (inputs, labels); DeepSpeed reads it only on the first stage (inputs) and the last
stage (labels).

Packed documents (`pretrain.model.documents`, data.reset_attention_mask / reset_position_ids):
the first stage computes the document ids and position ids from its tokens, and they travel
with the activations as the tail of a tuple (x, [doc], [pos]) -- integer tensors DeepSpeed sends
as they are (only the first, floating tensor is partitioned over TP ranks and gets gradients).
Stage layers take and return that tuple (`_Carry` subclasses, same parameter names).

Activation checkpointing (model.activation_checkpointing) is per stage: PipelineModule's
`activation_checkpoint_interval=1` over the `Block` layers with torch's non-reentrant
checkpoint (the RNG state is restored for the recomputation).

Checkpoint files (DeepSpeed's, per stage and TP rank): `layer_{i:02d}-model_{tp:02d}-model_states.pt`
hold layer i's state dict with the plain names (embedding: wte/wpe; block: ln_1, attn.qkv,
...; head: ln_f, lm_head or the tied copy wte). `interop.ds_reader` merges them; stage
parameter names map to plain ones by `spec.plain_name`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec

from pretrain import dsadapter
from pretrain.model.gpt import GPT
from pretrain.model.layers import Block, Embedding
from pretrain.parallel import spec
from pretrain.parallel.apply import ParallelHead, materialize, shard_block, shard_embedding
from pretrain.parallel.cross_entropy import vocab_parallel_linear_cross_entropy
from pretrain.parallel.tensor import (VocabParallelEmbedding, copy_to_tensor_model_parallel_region,
                                      gather_from_sequence_parallel_region, get_world_size)
from pretrain.parallel.partition import partition_balanced, partition_uniform, pipeline_layer_params

__all__ = ["GPTPipe", "PipeHead", "PipeLoss", "build_pipeline", "stage_parts", "TIED_KEY"]

TIED_KEY = spec.PIPE_TIED_KEY
TIED_ATTR = "wte.weight"


def stage_parts(cfg, padded_vocab: int, pp: int) -> list[int]:
    """Stage boundaries over the L + 2 pipeline layers (stage s holds [parts[s], parts[s+1]))."""
    counts = [w for _, w in pipeline_layer_params(cfg.model, padded_vocab)]
    if cfg.parallel.pipeline_partition == "uniform":
        return partition_uniform(len(counts), pp)
    return partition_balanced(counts, pp)


# ---------------------------------------------------------------------- layer specs
class _Built(LayerSpec):
    """A layer built (and sharded) beforehand; DeepSpeed's build() hands it over."""

    def __init__(self, module: nn.Module, num_params: int):
        super().__init__(type(module))
        self.module, self.num_params = module, num_params

    def build(self, log=False):
        return self.module


class _BuiltTied(TiedLayerSpec):
    def __init__(self, module: nn.Module, num_params: int):
        super().__init__(TIED_KEY, type(module), tied_weight_attr=[TIED_ATTR])
        self.module, self.num_params = module, num_params

    def build(self, log=False):
        return self.module


class _Remote(LayerSpec):
    """A layer of another stage: only its type and size are known here."""

    def __init__(self, typename, num_params: int):
        super().__init__(typename)
        self.num_params = num_params

    def build(self, log=False):
        raise RuntimeError(f"{self.typename.__name__} belongs to another pipeline stage")


class _RemoteTied(TiedLayerSpec):
    def __init__(self, typename, num_params: int):
        super().__init__(TIED_KEY, typename, tied_weight_attr=[TIED_ATTR])
        self.num_params = num_params

    def build(self, log=False):
        raise RuntimeError(f"{self.typename.__name__} belongs to another pipeline stage")


class _Carry:
    """A pipeline layer of a run with packed documents: it takes and returns the tuple
    (x, [doc], [pos]) that travels between stages; `extras` names what is in the tail."""

    extras: tuple = ()

    def _unpack(self, inputs) -> tuple:
        x, *tail = inputs if isinstance(inputs, tuple) else (inputs,)
        got = dict(zip(self.extras, tail))
        return x, got.get("doc"), got.get("pos"), tuple(tail)


class _CarryEmbedding(_Carry):
    """The first stage's embedding: tokens -> (x, [doc], [pos]), the segments computed on the device."""

    documents = None

    def forward(self, idx):
        doc, pos = self.documents.segments(idx)
        x = super().forward(idx, 0, pos)
        return (x, *(t for t in (doc, pos) if t is not None))


class _CarryBlock(_Carry):
    def forward(self, inputs):
        x, doc, pos, tail = self._unpack(inputs)
        return (super().forward(x, doc=doc, pos=pos), *tail)


_CARRY_CLASSES: dict = {}


def _carrying(module: nn.Module, mixin: type, **attrs) -> nn.Module:
    """Turn `module` (an Embedding, ParallelEmbedding or Block) into its carrying subclass in
    place: same parameters and names, tuple in and out."""
    base = type(module)
    cls = _CARRY_CLASSES.get((base, mixin))
    if cls is None:
        cls = _CARRY_CLASSES[(base, mixin)] = type(f"Pipe{base.__name__}", (mixin, base), {})
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


class PipeHead(ParallelHead):
    """The last stage's head: final norm and the tensor-parallel region op, without the output
    projection. Its output, the hidden states (B, T, C) -- what DeepSpeed keeps until the
    backward -- goes to `PipeLoss`, which calls `loss` with the labels."""

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, tuple):  # (x, doc, pos) of packed documents: the head needs x only
            x = x[0]
        h = self.ln_f(x)
        if self.sequence_parallel:  # (B, T/tp, C) -> (B, T, C); backward reduce-scatters
            return gather_from_sequence_parallel_region(h, self.group, tensor_parallel_output_grad=True)
        return copy_to_tensor_model_parallel_region(h, self.group)  # backward: all-reduce of the gradient

    def loss(self, h: torch.Tensor, labels: torch.Tensor, denominator=None) -> torch.Tensor:
        """Mean fp32 cross entropy of this rank's logits `h @ weight.T`, fused and chunked: the
        (B, T, V/tp) logits are never held whole (the single-process head's loss, vocab-parallel)."""
        return vocab_parallel_linear_cross_entropy(h, self._weight(), labels, self.group, denominator=denominator)


class PipeLoss:
    """The last stage's loss: fp32 mean cross entropy of the head's hidden states, projected and
    reduced by the stage's `PipeHead` (`head`, set by `build_pipeline` on the last stage).

    `factor` (set by the trainer's fault injection, `pretrain.faults.loss_factor`) multiplies the
    loss for one step: NaN, or a spike. `denominator` (set by the trainer each step with
    data.eod_mask_loss): the global-batch token mean's divisor, as `GPT.forward`'s."""

    def __init__(self, group):
        self.group = group
        self.head: PipeHead | None = None
        self.factor = 1.0
        self.denominator = None
        self.__name__ = "PipeLoss"

    def __call__(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.head.loss(h, labels, self.denominator)
        if self.factor != 1.0:
            loss = loss * self.factor
        return loss


class GPTPipe(dsadapter.pipeline_module_base()):
    """DeepSpeed's PipelineModule on the job's one `Topology` grid, with plan-consistent partitioning
    (each layer counted by its spec's `num_params`, see `dsadapter.pipeline_module_base`)."""

    def __init__(self, specs: list, topo, loss: PipeLoss, partition_method: str,
                 activation_checkpointing: bool, block_name: str = Block.__name__):
        kwargs = {}
        if activation_checkpointing:
            kwargs = {"activation_checkpoint_interval": 1,
                      "activation_checkpoint_func": functools.partial(torch.utils.checkpoint.checkpoint,
                                                                      use_reentrant=False),
                      "checkpointable_layers": [block_name]}
        # Our grid, not one PipelineModule would build from the topology: the TP layers, the
        # trainer and DeepSpeed share one set of process groups.
        super().__init__(specs, grid=topo.grid, topology=topo.topo, loss_fn=loss, partition_method=partition_method,
                         **kwargs)


def build_pipeline(cfg, layout, topo, device=None, seed: int | None = None, source=None,
                   documents=None) -> GPTPipe:
    """This rank's pipeline stage, allocated on `device` (default: torch's default device).
    `seed`: the initial weights' (default: drawn from torch's default generator, as `GPT`);
    `source`: full tensors by plain name instead (imported weights); `documents`: the run's
    `pretrain.model.documents.Documents` (segments travel with the activations)."""
    m = cfg.model
    V, L, pp = layout.padded_vocab_size, m.n_layer, layout.pp
    if pp < 2:
        raise ValueError("build_pipeline needs parallel.pipeline >= 2")
    counts = [w for _, w in pipeline_layer_params(m, V)]
    parts = stage_parts(cfg, V, pp)
    lo, hi = parts[topo.pp_rank], parts[topo.pp_rank + 1]
    group, sp, tied = topo.tp_group, cfg.parallel.sequence_parallel, m.tie_embeddings
    ckpt = m.activation_checkpointing
    seed = spec.draw_seed() if seed is None else seed
    device = torch.get_default_device() if device is None else torch.device(device)
    carry = documents is not None and documents.segmented
    extras = tuple(name for name, on in (("doc", carry and documents.mask), ("pos", carry and documents.positions))
                   if on)
    block_name = Block.__name__

    specs: list = []
    for i, layer in enumerate(GPT(m, V, device="meta").layers()):
        if i == 0:
            module = shard_embedding(layer, group, sp)
            if carry:
                _carrying(module, _CarryEmbedding, documents=documents, extras=extras)
            kind = Embedding
        elif i <= L:
            module = shard_block(layer, group, sp)
            if ckpt:
                module.activation_checkpointing = False  # the pipeline checkpoints whole blocks
            if carry:
                block_name = type(_carrying(module, _CarryBlock, extras=extras)).__name__
            kind = Block
        else:
            wte = None
            if tied:  # the last stage's copy of the token table
                if get_world_size(group) == 1:
                    wte = nn.Embedding(V, m.d_model, device="meta")
                else:
                    wte = VocabParallelEmbedding(V, m.d_model, group, init_method=None, device="meta")
            module = head = PipeHead(layer, group, sp, wte=wte)
            kind = PipeHead
        is_tied = tied and (i == 0 or i == L + 1)
        if lo <= i < hi:
            materialize(module, m, group, device, seed, prefix=spec.layer_prefix(i, L), source=source)
            specs.append(_BuiltTied(module, counts[i]) if is_tied else _Built(module, counts[i]))
        else:
            specs.append(_RemoteTied(kind, counts[i]) if is_tied else _Remote(kind, counts[i]))

    loss = PipeLoss(group)
    if lo <= L + 1 < hi:  # the last stage: the loss projects with its head's weight
        loss.head = head
    pipe = GPTPipe(specs, topo, loss, cfg.parallel.pipeline_partition, ckpt, block_name)
    if list(pipe.parts) != list(parts):
        raise RuntimeError(f"DeepSpeed partitioned the pipeline as {pipe.parts}, the plan says {parts}")
    if dsadapter.pipeline_grid(pipe) is not topo.grid:
        raise RuntimeError("the pipeline module did not adopt the job's topology grid")
    # DeepSpeed marks *every* parameter of a non-owning tied module as a replica (skipped by
    # gradient norms); only the tied table is one. The head's own ln_f (and lm_head) count.
    for module, tied in dsadapter.pipe_tied_weights(pipe):
        shared = {id(t) for t in tied}
        for p in module.parameters():
            if id(p) not in shared:
                dsadapter.mark_pipe_replica(p, False)
    return pipe
