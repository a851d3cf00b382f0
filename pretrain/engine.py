"""The DeepSpeed engine: the one place that calls `deepspeed.initialize`.

We hand DeepSpeed a plain torch AdamW (with our parameter groups) and the config that
`pretrain.config.deepspeed` generates; the learning rate is set by the trainer each
step from `pretrain.schedule`. The optimizer is wrapped in `GuardedAdamW`, which makes
the non-finite guard uniform across ZeRO stages: DeepSpeed skips overflowing steps
for fp16, but not for fp32 ZeRO-0, where one NaN would reach the weights.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from pretrain.config.deepspeed import deepspeed_config
from pretrain.config.schema import Config
from pretrain.config.validate import Layout
from pretrain.third_party import quiet_third_party


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that refuses a step when any rank saw a non-finite loss or gradient.

    `step()` runs on every rank once per optimizer step (DeepSpeed calls it on the
    parameters, or on each rank's ZeRO partition of them), so it can agree on the
    verdict with one small all-reduce. A skipped step leaves weights and moments as
    they were. With `clip` > 0 it also clips and reports the global grad norm itself;
    the engine uses that only for ZeRO-0 fp32, where DeepSpeed reports no norm.

    Model parallelism (DeepSpeed's rule): with replicated gradients (ZeRO-0) a parameter's
    squared gradient norm counts on every TP rank if it is TP-sharded (`tensor_model_parallel`)
    and only on TP rank 0 otherwise, and a pipeline-tied copy (`ds_pipe_replicated`) not at
    all; the sum over the world is then divided by the data-parallel size (every replica
    holds the same reduced gradients). With ZeRO 1-3 the optimizer sees flat partitions and
    the plain sum is reported (the engine prefers DeepSpeed's own norm there).
    """

    def __init__(self, params, *, clip: float = 0.0, partitioned: bool = False, tp_rank: int = 0,
                 dp_size: int = 1, model_parallel: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.clip = clip
        self.partitioned = partitioned  # grads are disjoint shards across ranks (ZeRO 1-3)
        self.tp_rank, self.dp_size = tp_rank, dp_size
        self.model_parallel = model_parallel  # tensor or pipeline parallel: the norm spans ranks
        self.bad_loss = False  # set by the trainer before DeepSpeed's step
        self.bad_loss_fn = None  # or a callable checked at step time (pipeline: the last stage's loss)
        # Which parameters this rank counts in the norm, by position: DeepSpeed's unfused
        # bf16/fp16 wrapper later swaps in fp32 copies (same order) that lack the attributes.
        self._count_mask = [[self._counts(p) for p in g["params"]] for g in self.param_groups]
        self.stepped = False  # set here; False after a step DeepSpeed itself skipped
        self.skipped = False
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads, keep = [], []
        for gi, g in enumerate(self.param_groups):
            mask = self._count_mask[gi] if gi < len(self._count_mask) else []
            mask = mask if len(mask) == len(g["params"]) else [self._counts(p) for p in g["params"]]
            for p, counts in zip(g["params"], mask):
                if p.grad is not None:
                    grads.append(p.grad)
                    keep.append(counts)
        sq = sq_counted = torch.zeros((), dtype=torch.float64)
        if grads:
            # one device-to-host copy for all norms (not one sync per parameter)
            norms = torch.stack([n.double() for n in torch._foreach_norm(grads, 2.0)]).cpu().pow(2)
            sq = sq_counted = norms.sum()
            if not self.partitioned and not all(keep):
                sq_counted = norms[torch.tensor(keep, dtype=torch.bool)].sum()
        # [non-finite flag, sum of counted squares]: SUM over the world is right for both
        # (replicated ZeRO-0 gradients: divided by the data-parallel size below).
        flag = float(self.bad_loss or (self.bad_loss_fn is not None and self.bad_loss_fn())
                     or not torch.isfinite(sq))
        stats = torch.tensor([flag, float(sq_counted)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            stats = stats.to(_comm_device())
            dist.all_reduce(stats)
            stats = stats.cpu()
        if self.partitioned:
            total_sq = float(stats[1])
        else:  # replicated: the local sum is the whole norm unless the model spans ranks
            total_sq = float(stats[1]) / self.dp_size if self.model_parallel else float(sq)
        self.stepped = True
        self.skipped = bool(stats[0] > 0) or not torch.isfinite(torch.tensor(total_sq))
        self.grad_norm = total_sq ** 0.5 if not self.skipped else float("nan")
        if self.skipped:
            return None
        if self.clip > 0 and self.grad_norm > self.clip:
            torch._foreach_mul_(grads, self.clip / (self.grad_norm + 1e-6))
        return super().step(closure)

    def _counts(self, p) -> bool:
        """Whether this rank counts p's gradient in the global norm (replicated gradients)."""
        from pretrain.parallel.tensor import param_is_tensor_parallel

        return not (_pipe_copy(p) or (self.tp_rank > 0 and not param_is_tensor_parallel(p)))


def _pipe_copy(p) -> bool:
    return bool(getattr(p, "ds_pipe_replicated", False))


def _comm_device() -> torch.device:
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
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    quiet_third_party()  # before DeepSpeed's comm backend: it would compile an unused C++ op on CPU
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _own_clip(cfg: Config, layout: Layout) -> bool:
    """Whether GuardedAdamW clips (and reports the norm) instead of DeepSpeed.

    ZeRO-0 bf16/fp16 (not pipelined) runs DeepSpeed's unfused optimizer, whose norm flattens the
    gradients first and so cannot tell TP-sharded from replicated ones: with TP we clip instead.
    DeepSpeed clips fp32 ZeRO-0 without reporting the norm; we clip and report instead."""
    unfused = cfg.train.precision != "fp32" and layout.pp == 1
    return layout.zero_stage == 0 and (cfg.train.precision == "fp32" or (unfused and layout.tp > 1))


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
    return ds_config


def build_engine(cfg: Config, layout: Layout, model: torch.nn.Module, topo=None):
    """Wrap `model` in a DeepSpeed engine; returns (engine, GuardedAdamW).

    `topo` (`pretrain.parallel.topology.Topology`) is handed to DeepSpeed as its `mpu`, so
    gradient reduction, ZeRO partitioning and gradient norms use the job's data- and
    model-parallel groups. A pipeline module (parallel.pipeline > 1) carries the same grid
    itself (DeepSpeed then takes `model.mpu()` and returns a PipelineEngine).
    """
    import deepspeed

    from pretrain.parallel.apply import parallel_param_groups

    ds_config = engine_ds_config(cfg, layout)
    pipe = layout.pp > 1
    unfused = cfg.train.precision != "fp32" and layout.pp == 1
    own_clip = _own_clip(cfg, layout)
    groups = parallel_param_groups(model, cfg.optim)
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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    if layout.zero_stage == 0 and layout.dp == 1 and not pipe:
        # One data-parallel replica: DeepSpeed would still flatten every gradient into buckets,
        # all-reduce them over a group of one and copy them back, each step (docs/PERFORMANCE.md).
        engine.enable_backward_allreduce = False
    if pipe:
        # The NaN guard also needs the loss, which only the last stage has, at step time.
        optimizer.bad_loss_fn = lambda: bool(engine.is_last_stage() and engine.total_loss is not None
                                             and not torch.isfinite(engine.total_loss).all())
    return engine, optimizer


def grad_norm(engine, optimizer: GuardedAdamW) -> float:
    """The pre-clip global gradient norm of the last step (NaN when it was skipped)."""
    if optimizer.clip > 0 or not optimizer.stepped:
        return optimizer.grad_norm if optimizer.stepped else float("nan")
    norm = engine.get_global_grad_norm()
    if norm is None:
        return optimizer.grad_norm if optimizer.grad_norm is not None else float("nan")
    return float(norm)
