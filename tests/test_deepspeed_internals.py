"""One test per DeepSpeed internal we rely on (docs/DEEPSPEED.md): each wrapper of
pretrain/dsadapter.py keeps working on the installed DeepSpeed. A failure names the internal and
the adapter function to fix, so a DeepSpeed upgrade that moves one says where.

The tests that need an engine share one spawned 1-process gloo group (`probe`), which builds a
tiny ZeRO-1, ZeRO-3 and pipeline engine once and reports each check by name; the others inspect
DeepSpeed's modules directly.
"""
from __future__ import annotations

import ast
import datetime
import inspect
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from pretrain import dsadapter

ROOT = Path(__file__).resolve().parents[1]


def broke(internal: str, fn: str, detail: str = "") -> str:
    return (f"DeepSpeed {dsadapter.version()}: `{internal}` no longer behaves as "
            f"pretrain.dsadapter.{fn} relies on" + (f": {detail}" if detail else ""))


# ---------------------------------------------------------------- inside a tiny engine (one process)
def _checker(report: dict):
    """Decorator: run the function now, noting in `report` under its name None or its traceback."""
    import traceback

    def run(fn):
        try:
            fn()
            report[fn.__name__] = None
        except Exception:  # noqa: BLE001 -- reported by the test of that name
            report[fn.__name__] = traceback.format_exc(limit=4)
        return fn

    return run


def _engine(zero_stage: int):
    import deepspeed
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt, shapes


def _zero_checks(check, tmp: str) -> None:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine, torch_opt, _ = _engine(1)
    opt = engine.optimizer

    @check
    def hp_mapping():  # before the first step: DeepSpeed links the moment views lazily
        assert dsadapter.has_zero_fp32_views(engine.module), "no parameter has `_hp_mapping`"
        assert opt._hp_optimizer_states_linked is False and callable(opt._lazy_init_hp_params_optimizer_state)

    @check
    def base_optimizer():
        assert dsadapter.base_optimizer(opt) is torch_opt

    module = sys.modules[type(opt).__module__]
    host_check = getattr(module, "is_invalid_grad_norm", None)
    dsadapter.device_side_invalid_grad_norm(opt)
    engine.backward(engine(torch.randn(2, 8)).pow(2).mean())
    engine.step()

    @check
    def invalid_grad_norm():
        assert host_check is not None and module.is_invalid_grad_norm is host_check, "not restored after step()"

    @check
    def global_grad_norm():
        norm = dsadapter.global_grad_norm(opt)
        assert norm is not None and bool(torch.isfinite(torch.as_tensor(norm))), f"got {norm!r}"

    @check
    def set_full_state():
        assert opt._hp_optimizer_states_linked is True, "the first step did not link the moment views"
        dsadapter.link_hp_optimizer_states(opt)
        p = next(engine.module.parameters())
        dsadapter.set_full_fp32_param(p, torch.full_like(p, 0.5))
        dsadapter.set_full_optimizer_state(p, torch.full_like(p, 0.25), "exp_avg")
        assert torch.equal(safe_get_full_fp32_param(p), torch.full_like(p, 0.5))
        assert torch.equal(safe_get_full_optimizer_state(p, "exp_avg"), torch.full_like(p, 0.25))
        assert len(dsadapter.stepped_params(opt)) == sum(len(g["params"]) for g in torch_opt.param_groups)

    @check
    def progress():
        assert (engine.global_steps, engine.global_samples) == (1, 2)
        dsadapter.set_progress(engine, 7, 14)
        assert (engine.global_steps, engine.global_samples) == (7, 14)

    @check
    def universal_flag():
        with dsadapter.universal_checkpoint_load(engine):
            assert engine.load_universal_checkpoint() is True
        assert engine.load_universal_checkpoint() is False

    class Recording(dsadapter.checkpoint_engine_base()):  # torch.save / torch.load, noting each file
        def __init__(self):
            super().__init__()
            self.saved, self.loaded = [], []

        def create(self, info):
            pass

        def save(self, state_dict, path):
            self.saved.append(path)
            torch.save(state_dict, path)

        def load(self, path, map_location=None):
            self.loaded.append(path)
            return torch.load(path, map_location=map_location, weights_only=False)

        def commit(self, info):
            return True

    @check
    def checkpoint_engine():
        ours, scripts, own = Recording(), [], engine.checkpoint_engine
        with dsadapter.swap_checkpoint_engine(engine, ours), dsadapter.defer_recovery_scripts(engine, scripts.append):
            engine.save_checkpoint(tmp, tag="t", save_latest=False)
        assert engine.checkpoint_engine is own and "_copy_recovery_script" not in vars(engine)
        assert ours.saved and scripts, f"saved {ours.saved}, recovery scripts asked for {scripts}"
        assert not (Path(tmp) / "t" / "zero_to_fp32.py").exists(), "DeepSpeed copied its scripts itself"
        with dsadapter.swap_checkpoint_engine(engine, ours):
            engine.load_checkpoint(tmp, tag="t")
        assert ours.loaded, "load_checkpoint did not read through our engine"

    @check
    def zero_to_fp32():
        sd = dsadapter.zero_fp32_state_dict(tmp, "t")
        assert set(sd) == {n for n, _ in engine.module.named_parameters()}, sorted(sd)

    @check
    def backward_allreduce():
        assert engine.enable_backward_allreduce is True
        dsadapter.disable_backward_allreduce(engine)
        assert "if self.enable_backward_allreduce" in inspect.getsource(type(engine)._backward_epilogue)

    engine3, opt3, shapes = _engine(3)

    @check
    def zero3():
        assert dsadapter.is_zero3_partitioned(engine3.module), "no parameter has `ds_id`"
        got = {n: tuple(dsadapter.param_full_shape(p)) for n, p in engine3.module.named_parameters()}
        assert got == shapes, f"`ds_shape` gives {got}, the model has {shapes}"
        flats = dsadapter.stepped_params(engine3.optimizer)
        assert flats and len(flats) == len(engine3.optimizer.fp32_partitioned_groups_flat)
        assert all(any(g is h for h in opt3.param_groups) for _, g in flats)


def _pipeline_checks(check) -> None:
    import deepspeed
    import torch
    from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    built, pipe = [], []

    class Counted(LayerSpec):
        num_params = 8 * 8

        def build(self, log=False):
            built.append(self)
            return super().build(log)

    class Tied(TiedLayerSpec):
        num_params = 8 * 8

    topo = PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=1)
    grid = PipelineParallelGrid(topology=topo)
    tied = [Tied("t", torch.nn.Linear, 8, 8, bias=False, tied_weight_attr=["weight"]) for _ in range(2)]
    specs = [tied[0], Counted(torch.nn.Linear, 8, 8, bias=False), tied[1]]

    @check
    def pipeline_module():
        pipe.append(dsadapter.pipeline_module_base()(specs, grid=grid, topology=topo, partition_method="parameters",
                                                     loss_fn=lambda out, y: (out - y).pow(2).mean()))
        assert dsadapter.pipeline_grid(pipe[0]) is grid, "the module built its own grid"
        assert len(built) == 1, f"DeepSpeed built the layer {len(built)} times (to count its parameters)"

    if not pipe:
        return

    @check
    def pipe_tied():  # one stage has no tied copies to sync (test_pipe_tied_comms: their shape)
        assert dsadapter.pipe_tied_weights(pipe[0]) == []
        params = list(pipe[0].parameters())
        assert all(hasattr(p, "ds_pipe_replicated") and not dsadapter.is_pipe_replica(p) for p in params)
        dsadapter.mark_pipe_replica(params[0], True)
        assert dsadapter.is_pipe_replica(params[0])
        dsadapter.mark_pipe_replica(params[0], False)

    @check
    def total_loss():
        opt = torch.optim.AdamW(pipe[0].parameters(), lr=1e-3)
        engine, _, _, _ = deepspeed.initialize(model=pipe[0], optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9})
        seen, inner = [], opt.step

        def step(*a, **k):
            seen.append(dsadapter.last_stage_loss(engine))
            return inner(*a, **k)

        opt.step = step
        loss = engine.train_batch(iter([(torch.randn(2, 8), torch.randn(2, 8))]))
        assert seen and torch.is_tensor(seen[0]), f"at step time the loss was {seen}"
        assert torch.equal(seen[0].detach(), loss.detach())


def _probe_body(rank, world_size):
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")
    dsadapter.skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _zero_checks(_checker(report), tmp)
    _pipeline_checks(_checker(report))
    return report


@pytest.fixture(scope="module")
def probe():
    from dist_util import run_distributed

    return run_distributed(_probe_body, 1, timeout=120)[0]


ENGINE_CHECKS = [  # (probe check, the internal, the adapter functions that rely on it)
    ("hp_mapping", "param._hp_mapping, optimizer._hp_optimizer_states_linked / _lazy_init_hp_params_optimizer_state",
     "has_zero_fp32_views / link_hp_optimizer_states"),
    ("set_full_state", "deepspeed.utils.safe_set_full_fp32_param / safe_set_full_optimizer_state after linking",
     "set_full_fp32_param / set_full_optimizer_state / stepped_params"),
    ("base_optimizer", "ZeRO optimizer.optimizer (the torch optimizer inside)", "base_optimizer"),
    ("invalid_grad_norm", "zero/stage_1_and_2.is_invalid_grad_norm (restored after step)",
     "device_side_invalid_grad_norm"),
    ("global_grad_norm", "optimizer._global_grad_norm", "global_grad_norm"),
    ("progress", "engine.global_steps / global_samples", "set_progress"),
    ("universal_flag", "engine._config.load_universal_checkpoint", "universal_checkpoint_load"),
    ("checkpoint_engine", "engine.checkpoint_engine, engine._copy_recovery_script",
     "swap_checkpoint_engine / defer_recovery_scripts"),
    ("zero_to_fp32", "zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint", "zero_fp32_state_dict"),
    ("backward_allreduce", "engine.enable_backward_allreduce", "disable_backward_allreduce"),
    ("zero3", "param.ds_id / ds_shape, optimizer.fp32_partitioned_groups_flat / sub_group_to_group_id",
     "is_zero3_partitioned / param_full_shape / stepped_params"),
    ("pipeline_module", "pipe.module.PipelineParallelGrid, PipelineModule._count_layer_params / _layer_specs / _grid",
     "pipeline_grid_patch / pipeline_module_base / pipeline_grid"),
    ("pipe_tied", "param.ds_pipe_replicated", "is_pipe_replica / mark_pipe_replica"),
    ("total_loss", "PipelineEngine.total_loss at optimizer-step time", "last_stage_loss"),
]


@pytest.mark.parametrize("check, internal, fn", ENGINE_CHECKS, ids=[c[0] for c in ENGINE_CHECKS])
def test_engine_internal(probe, check, internal, fn):
    assert check in probe, broke(internal, fn, "the probe did not get this far (see the checks before it)")
    assert probe[check] is None, broke(internal, fn, "\n" + probe[check])


# ---------------------------------------------------------------- without a process group
def test_default_pg_timeout_is_read_at_group_creation():
    import torch.distributed.distributed_c10d as c10d

    saved = (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout)
    want = datetime.timedelta(seconds=1234)
    try:
        dsadapter.set_default_pg_timeout(want)
        got = c10d._get_default_timeout(c10d.Backend("gloo"))
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved
    assert got == want, broke("torch.distributed.distributed_c10d.default_pg_timeout", "set_default_pg_timeout")


def test_shm_comm_build_consults_compatible_ops():
    import importlib

    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    internal = "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']"
    build = inspect.getsource(importlib.import_module("deepspeed.comm.torch").build_shm_op)
    assert isinstance(deepspeed.ops.__compatible_ops__, dict) and "__compatible_ops__" in build, \
        broke(internal, "skip_cpu_shm_comm_build")
    assert ShareMemCommBuilder.NAME == "deepspeed_shm_comm", broke(internal, "skip_cpu_shm_comm_build",
                                                                   f"the op is now {ShareMemCommBuilder.NAME}")


def test_muon_kernels_are_compiled_by_the_decorator_we_replace():
    import subprocess

    internal = "deepspeed.runtime.zero.muon.original_muon's @deepspeed.runtime.compiler.compile() kernels"
    src = inspect.getsource(__import__("deepspeed.runtime.compiler", fromlist=["x"]))
    assert "def compile(" in src and "def dummy_decorator(" in src, broke(internal, "skip_muon_compile")
    # In a fresh interpreter: after the adapter's import, DeepSpeed's lazy imports of Muon (as
    # ZeRO's gradient reduction makes them) compile nothing: inductor is never imported.
    code = ("import sys; from pretrain import dsadapter; dsadapter.skip_muon_compile(); "
            "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam; "
            "from deepspeed.runtime.zero.muon.original_muon import muon_update; "
            "print('inductor' if 'torch._inductor' in sys.modules else 'eager')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("eager"), broke(internal, "skip_muon_compile", out.stdout + out.stderr[-2000:])


def test_pipe_tied_comms():
    import torch
    from deepspeed.runtime.pipe.module import PipelineModule

    internal = "PipelineModule.tied_comms[key]['module' / 'weight_attr'], PipelineModule._recursive_getattr"
    index = inspect.getsource(PipelineModule._index_tied_modules)
    assert all(k in index for k in ("'weight_attr'", "'module'", "ds_pipe_replicated = True")), \
        broke(internal, "pipe_tied_weights", "the tied_comms entries changed")
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert PipelineModule._recursive_getattr(m, "0.weight") is m[0].weight, broke(internal, "pipe_tied_weights")


@pytest.mark.parametrize("stage, cls", [("stage_1_and_2", "DeepSpeedZeroOptimizer"),
                                        ("stage3", "DeepSpeedZeroOptimizer_Stage3")])
def test_zero_step_checks_the_norm_through_a_module_global(stage, cls):
    import importlib

    from deepspeed.runtime.utils import is_invalid_grad_norm

    module = importlib.import_module(f"deepspeed.runtime.zero.{stage}")
    optimizer = getattr(module, cls, None)  # (its step() is wrapped for NVTX: read the class)
    assert getattr(module, "is_invalid_grad_norm", None) is is_invalid_grad_norm and optimizer is not None \
        and "is_invalid_grad_norm(" in inspect.getsource(optimizer), \
        broke(f"zero/{stage}.py: {cls} calling the module's is_invalid_grad_norm", "device_side_invalid_grad_norm")


def test_config_model_reads_keys_through_our_dict():
    from pretrain.plan.preflight import _ReadKeys

    ds = _ReadKeys({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
                    "bf16": {"enabled": True, "check_grad_overflow": False}})
    cfg = dsadapter.parse_config(ds)
    assert {"train_batch_size", "zero_optimization", "bf16"} <= ds.read, \
        broke("DeepSpeedConfig reading the dict it is given (preflight's unread-key check)", "parse_config", str(ds.read))
    assert cfg.bfloat16_config.check_grad_overflow is False, \
        broke("bf16.check_grad_overflow (run/engine.engine_ds_config)", "parse_config")


def test_checkpoint_engine_interface():
    from pretrain.checkpoint.read import reader
    from pretrain.checkpoint.snapshot import Recorder, Staging

    base = dsadapter.checkpoint_engine_base()
    assert base.__abstractmethods__ <= {"create", "save", "load", "commit"}, \
        broke("CheckpointEngine's abstract methods", "checkpoint_engine_base", str(base.__abstractmethods__))
    assert callable(getattr(base, "preserves_storage_sharing", None)), \
        broke("CheckpointEngine.preserves_storage_sharing", "checkpoint_engine_base")
    Recorder(Staging(keep=False)), reader()  # instantiable: nothing abstract left over


def test_recovery_scripts():
    from deepspeed.runtime.engine import DeepSpeedEngine

    hook = getattr(DeepSpeedEngine, "_copy_recovery_script", None)
    assert hook is not None and list(inspect.signature(hook).parameters) == ["self", "save_path"], \
        broke("DeepSpeedEngine._copy_recovery_script(save_path)", "defer_recovery_scripts")
    names = [p.name for p in dsadapter.recovery_script_files()]
    assert "zero_to_fp32.py" in names, broke("deepspeed/utils/zero_to_fp32.py", "recovery_script_files", str(names))


def test_ds_to_universal_options():
    import deepspeed.checkpoint.ds_to_universal as ds_to_universal

    used = set(re.findall(r"\bargs\.(\w+)", inspect.getsource(ds_to_universal)))
    ours = set(vars(dsadapter.universal_args(Path("a"), Path("b"))))
    assert used <= ours, broke("ds_to_universal.main(args) options", "universal_args", f"missing {used - ours}")
    assert len(inspect.signature(ds_to_universal.main).parameters) == 1, broke("ds_to_universal.main(args)",
                                                                             "convert_to_universal")


def test_public_signatures_we_call():
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for fn, params, ours in [
        (deepspeed.zero.Init.__init__, {"module", "data_parallel_group", "config_dict_or_path", "mpu", "dtype"},
         "partition_zero3"),
        (deepspeed.zero.GatheredParameters.__init__, {"params", "modifier_rank", "enabled"}, "gathered_for_write"),
        (get_fp32_state_dict_from_zero_checkpoint, {"checkpoint_dir", "tag"}, "zero_fp32_state_dict"),
    ]:
        have = set(inspect.signature(fn).parameters)
        assert params <= have, broke(f"{fn.__qualname__}({', '.join(sorted(params))})", ours, f"missing {params - have}")


def test_deepspeed_reads_our_tensor_parallel_mark():
    import torch
    from deepspeed.runtime.utils import is_model_parallel_parameter

    from pretrain.parallel.tensor import set_tensor_model_parallel_attributes

    p = torch.nn.Parameter(torch.zeros(2))
    set_tensor_model_parallel_attributes(p, True, 0, 1)
    assert is_model_parallel_parameter(p), ("DeepSpeed no longer reads `tensor_model_parallel` "
                                            "(pretrain.parallel.tensor.set_tensor_model_parallel_attributes)")


def test_installed_deepspeed_is_in_the_pinned_range():
    pin = re.search(r'"deepspeed>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins no deepspeed>=X,<Y range"
    key = [int(x) for x in re.findall(r"\d+", dsadapter.version())[:3]]
    lo, hi = ([int(x) for x in v.split(".")] for v in pin.groups())
    assert lo <= key < hi, f"DeepSpeed {dsadapter.version()} is outside the tested range {pin.group(0)}"


def test_at_most_four_modules_import_deepspeed():
    importers = []
    for path in sorted((ROOT / "pretrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                importers.append(str(path.relative_to(ROOT)))
                break
    assert len(importers) <= 4 and "pretrain/dsadapter.py" in importers, \
        f"{importers}: DeepSpeed internals go through pretrain/dsadapter.py (docs/DEEPSPEED.md)"
