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

from pretrain.config.deepspeed import deepspeed_config
from pretrain.config.schema import Config
from pretrain.config.validate import Layout
from pretrain.model.gpt import param_groups


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that refuses a step when any rank saw a non-finite loss or gradient.

    `step()` runs on every rank once per optimizer step (DeepSpeed calls it on the
    parameters, or on each rank's ZeRO partition of them), so it can agree on the
    verdict with one small all-reduce. A skipped step leaves weights and moments as
    they were. With `clip` > 0 it also clips and reports the global grad norm itself;
    the engine uses that only for ZeRO-0 fp32, where DeepSpeed reports no norm.
    """

    def __init__(self, params, *, clip: float = 0.0, partitioned: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.clip = clip
        self.partitioned = partitioned  # grads are disjoint shards across ranks (ZeRO 1-3)
        self.bad_loss = False  # set by the trainer before DeepSpeed's step
        self.stepped = False  # set here; False after a step DeepSpeed itself skipped
        self.skipped = False
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64)
        if grads:
            norms = torch._foreach_norm(grads, 2.0)
            sq = torch.stack([n.double().cpu() for n in norms]).pow(2).sum()
        # [non-finite flag, sum of squares]; SUM over ranks is right for both entries
        # when grads are partitioned; replicated grads need only the local sum.
        flag = float(self.bad_loss or not torch.isfinite(sq))
        stats = torch.tensor([flag, float(sq) if self.partitioned else 0.0], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            stats = stats.to(_comm_device())
            dist.all_reduce(stats)
            stats = stats.cpu()
        total_sq = float(stats[1]) if self.partitioned else float(sq)
        self.stepped = True
        self.skipped = bool(stats[0] > 0) or not torch.isfinite(torch.tensor(total_sq))
        self.grad_norm = total_sq ** 0.5 if not self.skipped else float("nan")
        if self.skipped:
            return None
        if self.clip > 0 and self.grad_norm > self.clip:
            torch._foreach_mul_(grads, self.clip / (self.grad_norm + 1e-6))
        return super().step(closure)


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
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def build_engine(cfg: Config, layout: Layout, model: torch.nn.Module):
    """Wrap `model` in a DeepSpeed engine; returns (engine, GuardedAdamW)."""
    import deepspeed

    ds_config = deepspeed_config(cfg, layout)
    # Our optimizer is torch AdamW with a guard (a subclass DeepSpeed does not recognise).
    ds_config["zero_allow_untested_optimizer"] = True
    own_clip = layout.zero_stage == 0 and cfg.train.precision == "fp32"
    if own_clip:
        # DeepSpeed clips fp32 ZeRO-0 without reporting the norm; we clip and report instead.
        ds_config["gradient_clipping"] = 0.0
    groups = param_groups(model, cfg.optim.weight_decay,
                          decay_norms_and_biases=cfg.optim.decay_norms_and_biases,
                          decay_embeddings=cfg.optim.decay_embeddings)
    optimizer = GuardedAdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, clip=cfg.optim.grad_clip if own_clip else 0.0,
                             partitioned=layout.zero_stage > 0 or cfg.train.precision != "fp32")
    if layout.zero_stage == 3 and cfg.model.tie_embeddings:
        # The head reads the embedding's weight outside the embedding's forward.
        deepspeed.zero.register_external_parameter(model.head, model.embed.wte.weight)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def grad_norm(engine, optimizer: GuardedAdamW) -> float:
    """The pre-clip global gradient norm of the last step (NaN when it was skipped)."""
    if optimizer.clip > 0 or not optimizer.stepped:
        return optimizer.grad_norm if optimizer.stepped else float("nan")
    norm = engine.get_global_grad_norm()
    if norm is None:
        return optimizer.grad_norm if optimizer.grad_norm is not None else float("nan")
    return float(norm)
