"""The DeepSpeed engine: the one place that calls `deepspeed.initialize`.

We hand DeepSpeed a plain torch AdamW (with our parameter groups) and the config that
`pretrain.config.deepspeed` generates; the learning rate is set by the trainer each
step from `pretrain.run.schedule`. The optimizer is wrapped in `GuardedAdamW`, which makes
the non-finite guard uniform across ZeRO stages: DeepSpeed skips overflowing steps
for fp16, but not for fp32 ZeRO-0, where one NaN would reach the weights.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from pretrain import dsadapter
from pretrain.config.deepspeed import deepspeed_config
from pretrain.config.schema import Config
from pretrain.config.validate import Layout
from pretrain.run.third_party import quiet_third_party


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a whole optimizer step when any rank saw a non-finite loss or gradient,
    deciding on the device (no device-to-host copy).

    The trainer calls `begin_step(loss)` before each optimizer step. DeepSpeed then calls
    `step()` once (ZeRO-0) or once per parameter group / sub-group with `param_groups` narrowed
    to it (ZeRO 1-3). The first call takes the one verdict of the step, for every group and
    rank: a 0-d float tensor (1 = skip) handed to torch's fused AdamW as `found_inf`, so the
    kernel leaves weights, moments and step counts as they were; later calls reuse it. With
    `spikes` (guard.spike_sigma) a finite loss or norm far above its rolling window skips too;
    `reason` says why (pretrain.run.guard).

    The verdict reads the global gradient norm: under ZeRO 1-3 DeepSpeed's own
    (`norm_source`, computed over every group and rank before its first call); otherwise this
    call's gradients (all groups are in it), with one all-reduce of [loss flag, squared norm].
    With `clip` > 0 it also clips (on the device) and reports that norm; the engine uses that
    for ZeRO-0 fp32, where DeepSpeed reports no norm.

    Model parallelism (DeepSpeed's rule): with replicated gradients (ZeRO-0) a parameter's
    squared gradient norm counts on every TP rank if it is TP-sharded (`tensor_model_parallel`)
    and only on TP rank 0 otherwise, and a pipeline-tied copy (`ds_pipe_replicated`) not at
    all; the sum over the world is then divided by the data-parallel size (every replica
    holds the same reduced gradients). With flat partitions the plain sum is reported.
    """

    def __init__(self, params, *, clip: float = 0.0, partitioned: bool = False, tp_rank: int = 0,
                 dp_size: int = 1, model_parallel: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.clip = clip
        self.partitioned = partitioned  # grads are disjoint shards across ranks
        self.tp_rank, self.dp_size = tp_rank, dp_size
        self.model_parallel = model_parallel  # tensor or pipeline parallel: the norm spans ranks
        self.norm_source = None  # ZeRO 1-3: callable -> DeepSpeed's global grad norm (set by build_engine)
        self.loss_source = None  # pipeline: callable -> this rank's step loss at step time (last stage), or None
        self.spikes = None  # guard.spike_sigma: a pretrain.run.guard.SpikeWindow (set by build_engine)
        # Which parameters this rank counts in the norm, by position: DeepSpeed's unfused
        # bf16/fp16 wrapper later swaps in fp32 copies (same order) that lack the attributes.
        self._count_mask = [[self._counts(p) for p in g["params"]] for g in self.param_groups]
        self._keep_cache: dict = {}
        self.begin_step()

    def begin_step(self, loss: torch.Tensor | None = None) -> None:
        """Before each optimizer step: `loss`, this rank's loss of the step (0-d, on the device;
        a non-finite one skips the step), or None (a pipeline reads `loss_source` at step time)."""
        self.loss = loss
        self.calls = 0  # step() calls in this optimizer step; 0 after it = DeepSpeed skipped it itself
        self.verdict: torch.Tensor | None = None  # 0-d float, 1 = skipped
        self.reason: torch.Tensor | None = None  # 0-d float: pretrain.run.guard.OK, NONFINITE or SPIKE
        self.norm: torch.Tensor | None = None  # pre-clip global grad norm, NaN when skipped

    @property
    def skipped(self) -> bool:
        """Host view of the last verdict (a device-to-host copy: read it at logging time)."""
        return self.calls == 0 or bool(self.verdict)

    @property
    def grad_norm(self) -> float:
        return float("nan") if self.calls == 0 else float(self.norm)

    @torch.no_grad()
    def step(self, closure=None):
        grads, keep = self._grads()
        if self.calls == 0:
            self._decide(grads, keep)
        self.calls += 1
        if self.clip > 0 and grads:
            # norm NaN/inf: the coefficient is too, but the fused kernel skips the step anyway
            torch._foreach_mul_(grads, (self.clip / (self.norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
        if self.defaults.get("fused"):
            self.found_inf = self.verdict
            return super().step(closure)
        if bool(self.verdict):  # unfused (neither CPU nor CUDA): a host read, the only way to skip
            return None
        return super().step(closure)

    def _grads(self):
        grads, keep = [], []
        for gi, g in enumerate(self.param_groups):
            mask = self._count_mask[gi] if gi < len(self._count_mask) else []
            mask = mask if len(mask) == len(g["params"]) else [self._counts(p) for p in g["params"]]
            for p, counts in zip(g["params"], mask):
                if p.grad is not None:
                    grads.append(p.grad)
                    keep.append(counts)
        return grads, keep

    def _decide(self, grads, keep) -> None:
        dev = comm_device() if dist.is_initialized() else (grads[0].device if grads else torch.device("cpu"))
        loss = self.loss if self.loss is not None else (self.loss_source() if self.loss_source else None)
        has = torch.ones((), dtype=torch.float64, device=dev)
        if loss is None:  # a pipeline stage before the last: no loss of its own
            loss, has = torch.zeros((), dtype=torch.float64, device=dev), has * 0
        loss = loss.detach().to(device=dev, dtype=torch.float64).reshape(())
        flag = (~torch.isfinite(loss)).to(torch.float64)
        world = dist.get_world_size() if dist.is_initialized() else 1
        source = self.norm_source() if self.norm_source is not None else None
        if source is not None:  # ZeRO 1-3: DeepSpeed's norm already spans groups and ranks
            norm = torch.as_tensor(source, dtype=torch.float64, device=dev)
            # [non-finite flag, loss, has a loss]: summed over the world
            stats = torch.stack([flag, loss * has, has])
            if world > 1:
                dist.all_reduce(stats)
            bad = (stats[0] > 0) | ~torch.isfinite(norm)
            mean_loss = stats[1] / stats[2].clamp(min=1)
        else:
            sq = sq_counted = torch.zeros((), dtype=torch.float64, device=dev)
            if grads:
                norms = torch.stack(torch._foreach_norm(grads, 2.0)).to(device=dev, dtype=torch.float64).pow(2)
                sq = sq_counted = norms.sum()
                if not self.partitioned and not all(keep):
                    sq_counted = (norms * self._keep_tensor(keep, dev)).sum()
            # [non-finite flag, sum of counted squares, loss, has a loss]: SUM over the world is
            # right for all (replicated ZeRO-0 gradients: divided by the data-parallel size below).
            stats = torch.stack([flag, sq_counted, loss * has, has])
            if world > 1:
                dist.all_reduce(stats)
            if self.partitioned:
                total_sq = stats[1]
            else:  # replicated: the local sum is the whole norm unless the model spans ranks
                total_sq = stats[1] / self.dp_size if self.model_parallel else sq
            norm = total_sq.sqrt()
            bad = (stats[0] > 0) | ~torch.isfinite(norm)
            mean_loss = stats[2] / stats[3].clamp(min=1)
        # The mean loss over the ranks that hold one (every data-parallel replica alike) and the
        # global norm are the same numbers on every rank, so the spike verdict is agreed too.
        reason = bad.to(torch.float64)
        if self.spikes is not None:
            x = torch.stack([mean_loss, norm])
            spike = self.spikes.spiking(x) & ~bad
            self.spikes.add(x, ~(bad | spike))
            reason = torch.where(spike, torch.full_like(reason, 2.0), reason)
        self.reason = reason
        self.verdict = (reason > 0).float()
        self.norm = torch.where(bad, torch.full_like(norm, float("nan")), norm)

    def _keep_tensor(self, keep: list[bool], dev: torch.device) -> torch.Tensor:
        """The counting mask as a device tensor, made once (a host-to-device copy each step would
        wait for the device)."""
        key = (tuple(keep), dev)
        if key not in self._keep_cache:
            self._keep_cache[key] = torch.tensor(keep, dtype=torch.float64, device=dev)
        return self._keep_cache[key]

    def _counts(self, p) -> bool:
        """Whether this rank counts p's gradient in the global norm (replicated gradients)."""
        from pretrain.parallel.tensor import param_is_tensor_parallel

        return not (dsadapter.is_pipe_replica(p) or (self.tp_rank > 0 and not param_is_tensor_parallel(p)))


def comm_device() -> torch.device:
    """Where a tensor for a collective of the default group must live: the current GPU under NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config, device: torch.device) -> tuple[int, int]:
    """Start the process group (also for a plain single process) and return (rank, world)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=cfg.parallel.timeout_minutes)
    # Groups created later (DeepSpeed's ZeRO and pipeline groups, our TP groups) take torch's
    # default timeout, not this one: set the default so a dead peer fails them in time too.
    dsadapter.set_default_pg_timeout(timeout)
    quiet_third_party()  # before DeepSpeed's comm backend: it would compile an unused C++ op on CPU
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _unfused(cfg: Config, layout: Layout) -> bool:
    """Whether DeepSpeed wraps our optimizer in its unfused mixed-precision optimizer (ZeRO-0
    bf16/fp16, not pipelined)."""
    return cfg.train.precision != "fp32" and layout.pp == 1


def _own_clip(cfg: Config, layout: Layout) -> bool:
    """Whether GuardedAdamW clips (and reports the norm) instead of DeepSpeed.

    ZeRO-0 bf16/fp16 (not pipelined) runs DeepSpeed's unfused optimizer, whose norm flattens the
    gradients first and so cannot tell TP-sharded from replicated ones: with TP we clip instead.
    DeepSpeed clips fp32 ZeRO-0 without reporting the norm, and ZeRO 1/2 clip each group after
    reading the norm on the host (`is_invalid_grad_norm`): we clip on the device instead."""
    unfused = _unfused(cfg, layout)
    return layout.zero_stage in (1, 2) or (
        layout.zero_stage == 0 and (cfg.train.precision == "fp32" or (unfused and layout.tp > 1)))


def engine_ds_config(cfg: Config, layout: Layout) -> dict:
    """The config handed to deepspeed.initialize (`pretrain-train --print-deepspeed-config`): the
    generated one (pretrain.config.deepspeed) plus the keys that follow from how this engine runs."""
    ds_config = deepspeed_config(cfg, layout)
    if layout.pp > 1:
        # DeepSpeed splits replicated activations over the TP ranks for the p2p transfer
        # ("partitioned"); sequence-parallel activations are already split, so not then.
        split = not cfg.parallel.sequence_parallel
        ds_config.setdefault("pipeline", {}).update({"pipe_partitioned": split, "grad_partitioned": split})
    # Our optimizer is torch AdamW with a guard (a subclass DeepSpeed does not recognise).
    ds_config["zero_allow_untested_optimizer"] = True
    if _own_clip(cfg, layout):
        ds_config["gradient_clipping"] = 0.0
    if layout.zero_stage in (1, 2) and cfg.train.precision == "bf16":
        # ZeRO 1/2 bf16: DeepSpeed's overflow check copies a flag to the host every step; our
        # guard takes the same verdict (non-finite norm) on the device.
        ds_config["bf16"]["check_grad_overflow"] = False
    return ds_config


def build_engine(cfg: Config, layout: Layout, model: torch.nn.Module, topo=None):
    """Wrap `model` in a DeepSpeed engine; returns (engine, GuardedAdamW).

    `topo` (`pretrain.parallel.topology.Topology`) is handed to DeepSpeed as its `mpu`, so
    gradient reduction, ZeRO partitioning and gradient norms use the job's data- and
    model-parallel groups. A pipeline module (parallel.pipeline > 1) carries the same grid
    itself (DeepSpeed then takes `model.mpu()` and returns a PipelineEngine).
    """
    import deepspeed

    from pretrain.parallel import spec

    ds_config = engine_ds_config(cfg, layout)
    pipe = layout.pp > 1
    unfused = _unfused(cfg, layout)
    own_clip = _own_clip(cfg, layout)
    if cfg.train.compile:
        compile_blocks(model)
    # Grouped by each parameter's name; the names go to checkpoints (build.optimizer_group_names),
    # not into the optimizer's state.
    groups = [{k: v for k, v in g.items() if k != "names"} for g in spec.optimizer_groups(model, cfg.optim, cfg.model.n_layer)]
    # torch's fused AdamW (one kernel over all tensors, on CUDA and CPU) instead of the default
    # per-tensor loop on CPU / foreach on CUDA: on the 2-core CPU it steps 30M fp32 parameters in
    # ~47 ms of CPU time against ~310 ms (docs/PERFORMANCE.md, "Training throughput").
    optimizer = GuardedAdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, fused=layout.device in ("cpu", "cuda"),
                             clip=cfg.optim.grad_clip if own_clip else 0.0,
                             partitioned=layout.zero_stage > 0 or (cfg.train.precision != "fp32" and not unfused),
                             tp_rank=topo.tp_rank if topo is not None else 0, dp_size=layout.dp,
                             model_parallel=layout.tp * layout.pp > 1)
    if layout.zero_stage == 3 and cfg.model.tie_embeddings:
        # The head reads the embedding's weight outside the embedding's forward.
        deepspeed.zero.register_external_parameter(model.head, model.embed.wte.weight)
    mpu = None if pipe or topo is None else topo.mpu()
    dsadapter.skip_muon_compile()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    if layout.zero_stage == 0 and layout.dp == 1 and not pipe:
        dsadapter.disable_backward_allreduce(engine)  # one replica: no all-reduce over a group of one
    if pipe:
        # The guard also needs the loss, which only the last stage has, at step time: there the
        # sum of the micro-batches' losses so far (all of them, at the optimizer step).
        def last_stage_loss():
            loss = dsadapter.last_stage_loss(engine)
            return None if loss is None else loss.detach().float().sum() / layout.grad_accum

        optimizer.loss_source = last_stage_loss
    if cfg.guard.spike_sigma > 0:
        from pretrain.run.guard import SpikeWindow

        optimizer.spikes = SpikeWindow(cfg.guard.spike_window, cfg.guard.spike_sigma,
                                       comm_device() if dist.is_initialized() else torch.device("cpu"))
    if layout.zero_stage > 0 and cfg.train.precision != "fp16":
        # ZeRO's host read of the norm is left to our guard's verdict on the device (not fp16:
        # its loss scaler needs DeepSpeed's own verdict).
        dsadapter.device_side_invalid_grad_norm(engine.optimizer)
    if layout.zero_stage > 0 or (engine.optimizer is not optimizer and not own_clip):
        # DeepSpeed's wrapper (ZeRO 1-3, bf16/fp16) computes the global norm over every group
        # and rank before it calls step() (per group / sub-group under ZeRO 1-3): use it.
        optimizer.norm_source = lambda: dsadapter.global_grad_norm(engine.optimizer)
    return engine, optimizer


def compile_blocks(model: torch.nn.Module) -> int:
    """train.compile: torch.compile every transformer block in place (`nn.Module.compile`), in
    the plain, tensor-parallel and pipeline models alike; parameter names, checkpoints and the
    hooks DeepSpeed puts on modules stay as they are. The embedding, the head and its fused
    loss stay eager. Returns the number of blocks. (ZeRO-3 is refused by the config check.)"""
    from pretrain.model.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)
