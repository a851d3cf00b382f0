"""Everything we rely on in DeepSpeed beyond its documented API, in one place.

Each function wraps one private attribute, monkeypatch or version-dependent behaviour of
DeepSpeed (and one of torch.distributed); docs/DEEPSPEED.md says why we need each and which test
of tests/test_deepspeed_internals.py names it when a DeepSpeed release changes it. DeepSpeed
(and torch) are imported inside the functions: seconds that `--print-config` and `--plan` skip.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "version", "set_default_pg_timeout", "skip_cpu_shm_comm_build", "skip_muon_compile", "parse_config",
    "disable_backward_allreduce", "global_grad_norm", "device_side_invalid_grad_norm", "last_stage_loss",
    "checkpoint_engine_base", "swap_checkpoint_engine", "defer_recovery_scripts", "recovery_script_files",
    "universal_checkpoint_load", "convert_to_universal", "universal_args", "zero_fp32_state_dict",
    "base_optimizer", "stepped_params", "is_zero3_partitioned", "param_full_shape", "has_zero_fp32_views",
    "link_hp_optimizer_states", "set_full_fp32_param", "set_full_optimizer_state", "gathered_for_write",
    "set_progress", "partition_zero3", "zero3_partition", "pipeline_grid_patch", "pipeline_module_base",
    "pipeline_grid", "pipe_tied_weights", "is_pipe_replica", "mark_pipe_replica",
]


def version() -> str:
    """The installed DeepSpeed's version (recorded in every checkpoint's state.json)."""
    import deepspeed

    return deepspeed.__version__


# ---------------------------------------------------------------------- start-up
def set_default_pg_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` torch's default for groups created later without one (DeepSpeed's, our TP
    groups): torch reads these `distributed_c10d` globals whenever a group gets no timeout."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def skip_cpu_shm_comm_build() -> None:
    """Stop DeepSpeed from compiling its C++ shared-memory all-reduce on a CPU run.

    TorchBackend's `build_shm_op` JIT-compiles `deepspeed_shm_comm` on a CPU accelerator (slow with a
    C++ compiler, docs/DEEPSPEED.md; an error without one) for `inference_all_reduce` alone, which
    training never calls. It consults `deepspeed.ops.__compatible_ops__` first: marking the op
    incompatible there skips the build and nothing else."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":  # (GPU accelerators have no such op: no probe needed)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def skip_muon_compile() -> None:
    """Spare every start DeepSpeed's torch.compile of its Muon kernels (docs/PERFORMANCE.md, "Trainer start-up").

    DeepSpeed imports its Muon module lazily on every ZeRO/bf16 run, which wraps three kernels in
    `deepspeed.runtime.compiler.compile()`. We import it first, once, with that decorator as
    DeepSpeed's own no-op `dummy_decorator`: later imports find it loaded, the kernels stay eager."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    saved = compiler.compile
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imports original_muon, the kernels)
    finally:
        compiler.compile = saved


def parse_config(ds_config: dict):
    """DeepSpeed's config model on `ds_config` (no process group needed), its info logging quiet.
    Raises what DeepSpeed raises for a bad config; the model reads the keys through the dict it
    is given (`--plan`'s check for unread keys relies on that)."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        return DeepSpeedConfig(ds_config)
    finally:
        ds_logger.setLevel(level)


# ---------------------------------------------------------------------- the training step
def disable_backward_allreduce(engine) -> None:
    """One data-parallel replica: DeepSpeed would still flatten every gradient into buckets,
    all-reduce them over a group of one and copy them back, each step (docs/PERFORMANCE.md);
    its engine skips that when this attribute is False."""
    engine.enable_backward_allreduce = False


def global_grad_norm(zero_optimizer):
    """The global gradient norm DeepSpeed's optimizer wrapper (ZeRO 1-3, bf16/fp16) computed over
    every group and rank in this step, before it calls our optimizer's step(); None if it has none."""
    return getattr(zero_optimizer, "_global_grad_norm", None)


def device_side_invalid_grad_norm(zero_optimizer) -> None:
    """Let `zero_optimizer.step()` accept a tensor norm without reading it on the host.

    ZeRO's step() reads its global norm on the host (`is_invalid_grad_norm`) to skip a non-finite
    step; GuardedAdamW takes the same verdict on the device, so during this optimizer's step() a
    tensor norm is reported valid (not for fp16: its loss scaler needs DeepSpeed's verdict). Also
    during step(), the norm's NaN sentinel is not a blocking host-to-device copy: ZeRO 1/2's
    `mask_nan_or_inf_with_val_inplace` fills with a scalar, and ZeRO-3's `get_grad_norm_direct`
    runs with `device` None (a 0-d host sentinel, which its `torch.where` takes as a scalar)."""
    import torch

    module = sys.modules[type(zero_optimizer).__module__]  # zero/stage3.py or zero/stage_1_and_2.py
    host_check = getattr(module, "is_invalid_grad_norm", None)
    if host_check is None:
        return

    def device_mask(input, device=None, val=-1.0):
        input.masked_fill_(input.isinf() | input.isnan(), val)

    ours = {"is_invalid_grad_norm": lambda norm: False if torch.is_tensor(norm) else host_check(norm),
            "mask_nan_or_inf_with_val_inplace": device_mask}
    ours = {k: v for k, v in ours.items() if hasattr(module, k)}
    inner, norm_direct = zero_optimizer.step, getattr(zero_optimizer, "get_grad_norm_direct", None)

    def host_sentinel_norm(*args, **kwargs):  # ZeRO-3 (see above): reads self.device for the sentinel only
        device, zero_optimizer.device = zero_optimizer.device, None
        try:
            return norm_direct(*args, **kwargs)
        finally:
            zero_optimizer.device = device

    if module.__name__.endswith(".stage3") and norm_direct is not None:
        zero_optimizer.get_grad_norm_direct = host_sentinel_norm

    def step(*args, **kwargs):
        theirs = {k: getattr(module, k) for k in ours}
        vars(module).update(ours)
        try:
            return inner(*args, **kwargs)
        finally:
            vars(module).update(theirs)

    zero_optimizer.step = step


def last_stage_loss(engine):
    """The pipeline engine's loss of the current batch on the last stage (the NaN guard needs it at
    step time, before train_batch returns), else None."""
    return engine.total_loss if engine.is_last_stage() else None


# ---------------------------------------------------------------------- checkpoint engines
def checkpoint_engine_base() -> type:
    """DeepSpeed's checkpoint-engine base class: `save_checkpoint` / `load_checkpoint` hand every
    file to the engine's create/save/load/commit, and ask `preserves_storage_sharing()` whether
    to clone tensors before saving. Our recorder and reader subclass it."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


@contextlib.contextmanager
def swap_checkpoint_engine(engine, ours):
    """While inside, `engine` saves and loads through `ours` instead of its own checkpoint engine."""
    own = engine.checkpoint_engine
    engine.checkpoint_engine = ours
    try:
        yield ours
    finally:
        engine.checkpoint_engine = own


@contextlib.contextmanager
def defer_recovery_scripts(engine, record):
    """While inside, `engine.save_checkpoint` calls `record(save_path)` instead of copying its
    recovery scripts (zero_to_fp32.py ...) itself: the writer copies and hashes them later."""
    engine._copy_recovery_script = record
    try:
        yield
    finally:
        del engine._copy_recovery_script


def recovery_script_files() -> list[Path]:
    """The recovery scripts DeepSpeed puts next to a ZeRO checkpoint, those that exist."""
    import deepspeed

    utils = Path(deepspeed.__file__).parent / "utils"
    return [utils / name for name in ("zero_to_fp32.py", "zero_to_torch.py") if (utils / name).is_file()]


@contextlib.contextmanager
def universal_checkpoint_load(engine):
    """While inside, `engine.load_checkpoint` reads a universal checkpoint (DeepSpeed reads the
    flag from its config only inside load_checkpoint, so it is set for this load alone).

    After the load, two ZeRO-3 universal-load behaviours are undone: group 0's hyperparameters
    copied onto every group (weight decay on the no-decay group), and one `step` tensor shared by
    every group (AdamW would advance it once per group)."""
    import torch

    cfg = engine._config
    before = cfg.load_universal_checkpoint
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before
    if len(groups) == len(engine.optimizer.param_groups):
        for g, hyper in zip(engine.optimizer.param_groups, groups):
            g.update(hyper)
    for st in base_optimizer(engine.optimizer).state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's ds_to_universal of checkpoint directory `src` into `dst` (its command line's
    options, as a namespace: it has no function API). Its pointer file `latest_universal`, which
    it leaves next to `src`, is removed: we do not use it."""
    from deepspeed.checkpoint.ds_to_universal import main

    main(universal_args(src, dst))
    stray = Path(src) / "latest_universal"
    if stray.is_file():
        stray.unlink()


def universal_args(src: Path, dst: Path) -> argparse.Namespace:
    """The options `convert_to_universal` hands ds_to_universal's `main` (one worker each: it runs
    inside a training or converter process; strict; Adam's missing state injected)."""
    return argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)


def zero_fp32_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """DeepSpeed's zero_to_fp32: the full fp32 weights merged from a ZeRO checkpoint's shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


# ---------------------------------------------------------------------- optimizer state
def base_optimizer(opt):
    """The torch optimizer inside DeepSpeed's wrapper (ZeRO, bf16/fp16), or `opt` itself."""
    return getattr(opt, "optimizer", opt)


def stepped_params(opt) -> list:
    """[(tensor the torch optimizer steps, its param group)] of the engine's optimizer. ZeRO-3
    lists its flat fp32 partitions in param_groups only while it steps, so they come from it."""
    base = base_optimizer(opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return [(f, base.param_groups[opt.sub_group_to_group_id[i]])
                for i, f in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(p, g) for g in base.param_groups for p in g["params"]]


def is_zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether `module`'s parameters are ZeRO-3 partitioned (each carries a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def param_full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape: ZeRO-3 keeps it in `ds_shape` (the tensor itself is empty)."""
    return getattr(p, "ds_shape", p.shape)


def has_zero_fp32_views(module: torch.nn.Module) -> bool:
    """ZeRO-1/2 (and bf16): each parameter maps to a fragment of the fp32 partition (`_hp_mapping`),
    through which `set_full_fp32_param` / `set_full_optimizer_state` write."""
    return any(hasattr(p, "_hp_mapping") for p in module.parameters())


def link_hp_optimizer_states(opt) -> None:
    """Make DeepSpeed's per-parameter views of the Adam moments now: ZeRO-1/2 makes them lazily at
    the first step, and `set_full_optimizer_state` needs them (after we created the moments)."""
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def set_full_fp32_param(p, value: torch.Tensor) -> None:
    """Write this rank's part of `p`'s fp32 master weight from the full tensor (ZeRO 1-3)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value)


def set_full_optimizer_state(p, value: torch.Tensor, key: str) -> None:
    """Write this rank's part of `p`'s optimizer state `key` (exp_avg ...) from the full tensor."""
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(p, value, key)


def gathered_for_write(params: list, enabled: bool = True):
    """Context: ZeRO-3 parameters whole on every rank; rank 0's changes are re-partitioned on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=enabled)


def set_progress(engine, steps: int, samples: int) -> None:
    """The engine's step and sample counters, as a load_checkpoint would set them."""
    engine.global_steps, engine.global_samples = steps, samples


def partition_zero3(module: torch.nn.Module, *, data_parallel_group, config: dict, mpu, dtype) -> None:
    """Partition `module`'s allocated parameters over the data-parallel group (ZeRO-3), each rank
    keeping its own partition of what its tensors hold: the caller writes every partition
    after (`zero3_partition`), so the values need not agree across ranks beforehand.

    `deepspeed.zero.Init(module=...)` would first broadcast every full parameter from rank 0
    (`Init._zero_init_param`); ours leaves that out (without the method DeepSpeed broadcasts as
    before: slower, same result; tests/test_init_share.py checks it is still called)."""
    _partitioning_init()(module=module, data_parallel_group=data_parallel_group, config_dict_or_path=config,
                         mpu=mpu, dtype=dtype)


@functools.cache
def _partitioning_init() -> type:
    import deepspeed

    class PartitionInPlace(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionInPlace


def zero3_partition(p: torch.Tensor):
    """ZeRO-3: (this rank's partition of `p` (`ds_tensor`, flat), start, stop): it holds elements
    [start, stop) of the flattened parameter, then padding (the last ranks' partitions); None
    for a parameter that is not partitioned."""
    import torch.distributed as dist

    part = getattr(p, "ds_tensor", None)
    if part is None:
        return None
    start = part.numel() * dist.get_rank(group=p.ds_process_group)
    return part, min(start, p.ds_numel), min(start + part.numel(), p.ds_numel)


# ---------------------------------------------------------------------- pipeline
@contextlib.contextmanager
def pipeline_grid_patch(grid):
    """While inside, a PipelineModule being constructed adopts `grid` instead of building its own
    PipelineParallelGrid, so the TP layers, the trainer and DeepSpeed share one set of groups
    (PipelineModule takes no grid argument)."""
    import deepspeed.runtime.pipe.module as ds_pipe_module

    original = ds_pipe_module.PipelineParallelGrid
    ds_pipe_module.PipelineParallelGrid = lambda process_group=None, topology=None: grid
    try:
        yield
    finally:
        ds_pipe_module.PipelineParallelGrid = original


@functools.cache
def pipeline_module_base() -> type:
    """DeepSpeed's PipelineModule taking `grid=` (through `pipeline_grid_patch`) and counting each
    layer's parameters by its spec's `num_params` (the `--plan` counts) instead of building it."""
    from deepspeed.runtime.pipe.module import PipelineModule

    class PresizedPipelineModule(PipelineModule):
        def __init__(self, layers, *, grid, **kwargs):
            with pipeline_grid_patch(grid):
                super().__init__(layers, **kwargs)

        def _count_layer_params(self):
            return [spec.num_params for spec in self._layer_specs]

    return PresizedPipelineModule


def pipeline_grid(pipe):
    """The PipelineParallelGrid the pipeline module runs on."""
    return pipe._grid


def pipe_tied_weights(pipe) -> list[tuple[torch.nn.Module, list[torch.Tensor]]]:
    """[(module holding a copy of a tied layer, its tied tensors)] for this rank's tied layers."""
    return [(comm["module"], [pipe._recursive_getattr(comm["module"], a) for a in comm["weight_attr"]])
            for comm in pipe.tied_comms.values()]


def is_pipe_replica(p) -> bool:
    """Whether DeepSpeed marked `p` a pipeline-tied copy (counted once, elsewhere, in gradient norms)."""
    return bool(getattr(p, "ds_pipe_replicated", False))


def mark_pipe_replica(p, replica: bool) -> None:
    """Mark `p` a pipeline-tied copy or not, for DeepSpeed's gradient norms and ours."""
    p.ds_pipe_replicated = replica
