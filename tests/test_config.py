"""Config loading, overrides, validation, the DeepSpeed config and the generated docs."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import (Config, config_to_yaml, deepspeed_config, load_config, resolve)
from pretrain.config.load import config_from_dict
from pretrain.errors import UserError
from pretrain.plan.report import format_plan

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))

# A small valid base that needs no data on disk.
BASE = ["data.synthetic=true", "model.vocab_size=1000", "model.n_layer=4", "model.d_model=64",
        "model.n_head=4", "model.seq_len=32", "train.micro_batch_size=2", "train.precision=fp32",
        "train.device=cpu", "train.max_steps=10"]


def _cfg(*overrides: str) -> Config:
    return load_config(None, BASE + list(overrides))


def _write(tmp_path: Path, text: str, name: str = "x.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------- loading
def test_defaults_without_file():
    cfg = load_config(None, [])
    assert cfg == Config()


def test_unknown_key_suggests_nearest(tmp_path):
    path = _write(tmp_path, "model:\n  n_layers: 4\n")
    with pytest.raises(UserError) as e:
        load_config(path, [])
    assert str(e.value) == f"{path}: unknown key 'model.n_layers'; did you mean 'model.n_layer'?"


@pytest.mark.parametrize("text, key, suggestion", [
    ("train:\n  lr: 1.0e-3\n", "train.lr", "optim.lr"),             # field of another section
    ("modle:\n  n_layer: 2\n", "modle", "model"),                    # misspelt section
    ("optim:\n  weight_decy: 0.1\n", "optim.weight_decy", "optim.weight_decay"),
    ("parallel:\n  zero: 2\n", "parallel.zero", "parallel.zero_stage"),
])
def test_unknown_keys_anywhere(tmp_path, text, key, suggestion):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=f"unknown key '{key}'; did you mean '{suggestion}'"):
        load_config(path, [])


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: config file not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    path = _write(tmp_path, "model:\n  n_layer: 4\n  d_model: [1, 2\n")
    with pytest.raises(UserError) as e:
        load_config(path, [])
    assert str(e.value).startswith(f"{path}: invalid YAML at line ")
    path = _write(tmp_path, "model:\n  n_layer: 4\n  n_layer: 5\n", "dup.yaml")
    with pytest.raises(UserError, match="dup.yaml: invalid YAML at line 3.*duplicate key 'n_layer'"):
        load_config(path, [])
    path = _write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(path, [])
    path = _write(tmp_path, "model: 5\n", "sec.yaml")
    with pytest.raises(UserError, match="'model' must be a mapping"):
        load_config(path, [])


def test_yaml_values_and_types(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 6e-4\nlogging:\n  peak_flops: 989e12\n"
                            "model:\n  dropout: 0\n  n_kv_head: null\ntrain:\n  out_dir: 2024-01-01\n"
                            "data:\nparallel: {}\n")
    cfg = load_config(path, [])
    assert cfg.optim.lr == pytest.approx(6e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.logging.peak_flops == pytest.approx(989e12)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)  # int accepted for float
    assert cfg.train.out_dir == "2024-01-01"  # no date conversion
    path = _write(tmp_path, "train:\n  max_steps: ten\n", "bad.yaml")
    with pytest.raises(UserError, match=r"bad.yaml: train.max_steps must be an integer, got 'ten'"):
        load_config(path, [])
    path = _write(tmp_path, "checkpoint:\n  resume: no\n", "bool.yaml")
    with pytest.raises(UserError, match=r"checkpoint.resume must be a string, got false.*quote"):
        load_config(path, [])


def test_overrides_applied_in_order():
    cfg = load_config(None, ["train.max_steps=100", "model.n_layer=4", "optim.lr=3e-4",
                             "model.n_kv_head=2", "model.n_kv_head=null", "data.paths=[a, b]",
                             "data.synthetic=true", "train.out_dir=runs/x", "logging.peak_flops=1e15",
                             "train.max_steps=200"])
    assert cfg.train.max_steps == 200 and cfg.model.n_layer == 4
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.n_kv_head is None
    assert cfg.data.paths == ["a", "b"] and cfg.data.synthetic is True
    assert cfg.train.out_dir == "runs/x"
    assert cfg.logging.peak_flops == 1e15


def test_overrides_over_file(tmp_path):
    path = _write(tmp_path, "model:\n  n_layer: 6\ntrain:\n  max_steps: 5\n")
    cfg = load_config(path, ["model.n_layer=2"])
    assert cfg.model.n_layer == 2 and cfg.train.max_steps == 5


@pytest.mark.parametrize("override, pattern", [
    ("train.max_steps=abc", r"train.max_steps must be an integer, got 'abc'"),
    ("train.max_steps=1.5", r"train.max_steps must be an integer, got 1.5"),
    ("model.n_layer=null", r"model.n_layer must be an integer, got null"),
    ("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
    ("optim.lr=true", r"optim.lr must be a number, got true"),
    ("model.bias=1", r"model.bias must be a boolean \(true/false\), got 1"),
    ("data.paths=foo", r"data.paths must be a list \(e.g. \[a, b\]\), got 'foo'"),
    ("model.n_kv_head=two", r"model.n_kv_head must be an integer or null, got 'two'"),
    ("train.precision=null", r"train.precision must be a string, got null"),
    ("model.n_layers=4", r"unknown key 'model.n_layers'; did you mean 'model.n_layer'\?"),
    ("train.max_steps", r"overrides look like section.field=value"),
    ("model=4", r"'model' is a section"),
    ("model.n_layer.x=1", r"'model.n_layer' is a field, not a section"),
])
def test_override_errors(override, pattern):
    with pytest.raises(UserError, match=pattern) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"override '{override}'")
    assert "\n" not in str(e.value)


def test_string_override_keeps_text():
    cfg = load_config(None, ["train.out_dir=2024", "checkpoint.resume=none", "train.device=cpu"])
    assert cfg.train.out_dir == "2024" and cfg.checkpoint.resume == "none"


def test_deepspeed_overrides_go_to_passthrough(tmp_path):
    path = _write(tmp_path, "deepspeed:\n  zero_optimization:\n    reduce_bucket_size: 1000\n")
    cfg = load_config(path, ["deepspeed.zero_optimization.allgather_bucket_size=5e8",
                             "deepspeed.communication_data_type=fp32",
                             "deepspeed={activation_checkpointing: {partition_activations: true}}"])
    assert cfg.deepspeed == {
        "zero_optimization": {"reduce_bucket_size": 1000, "allgather_bucket_size": 500_000_000},
        "communication_data_type": "fp32",
        "activation_checkpointing": {"partition_activations": True},
    }


def test_several_config_files_merge_in_order(tmp_path):
    """`--config base.yaml --config mine.yaml` (NeoX style): later files win field by field."""
    a = _write(tmp_path, "model: {n_layer: 2, d_model: 64}\ntrain: {max_steps: 5}\n"
                         "deepspeed: {comms_logger: {enabled: true, verbose: true}}\n", "a.yaml")
    b = _write(tmp_path, "model: {n_layer: 3}\ndata: {paths: [x]}\ndeepspeed: {comms_logger: {verbose: false}}\n",
               "b.yaml")
    cfg = load_config([a, b], ["train.max_steps=7"])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.train.max_steps, cfg.data.paths) == (3, 64, 7, ["x"])
    assert cfg.deepspeed == {"comms_logger": {"enabled": True, "verbose": False}}
    assert load_config([b, a]).model.n_layer == 2
    assert load_config([a]) == load_config(a)
    bad = _write(tmp_path, "model: {n_layers: 3}\n", "bad.yaml")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown key 'model\.n_layers'"):
        load_config([a, bad])


def test_cli_merges_configs_and_warns_about_unexportable_models(tmp_path):
    a = _write(tmp_path, "model: {n_layer: 2, vocab_size: 300, position: rope}\ndata: {synthetic: true}\n", "a.yaml")
    b = _write(tmp_path, "model: {n_layer: 3}\n", "b.yaml")
    r = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", a, "--config", b, "--print-config"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0, r.stderr
    model = config_from_dict(__import__("yaml").safe_load(r.stdout)).model
    assert (model.n_layer, model.vocab_size, model.position) == (3, 300, "rope")
    # rope + layernorm trains, but export-hf refuses it later: said before training starts
    assert "warning: this model (position='rope', norm='layernorm', mlp='gelu') has no transformers" in r.stderr
    assert "export-hf` will refuse it" in r.stderr


def test_config_to_yaml_round_trip(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "llama-7b.yaml"), ["deepspeed.a.b=1", "optim.eps=1e-8"])
    text = config_to_yaml(cfg)
    path = _write(tmp_path, text)
    assert load_config(path, []) == cfg
    assert config_from_dict(None) == Config()


# --------------------------------------------------------------------------- presets
_WORLD = {"quickstart": (1, 512), "gpt2-124m": (1, 50257), "gpt2-350m": (8, 50257),
          "gpt2-774m": (8, 50257), "gpt2-1.5b": (8, 50257), "llama-1b": (8, 32000),
          "llama-7b": (16, 32000)}


def test_all_presets_present():
    names = {Path(p).stem for p in PRESETS}
    assert set(_WORLD) <= names, sorted(set(_WORLD) - names)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: Path(p).stem)
def test_preset_loads_resolves_and_plans(path):
    name = Path(path).stem
    world, vocab = _WORLD.get(name, (1, 50257))
    text = Path(path).read_text()
    assert text.startswith("#"), "each preset starts with a header comment"
    cfg = load_config(path, [])
    layout = resolve(cfg, world, vocab, cuda_available=True)
    assert layout.global_batch_size == layout.micro_batch_size * layout.grad_accum * layout.dp
    assert layout.padded_vocab_size % (cfg.model.vocab_multiple * layout.tp) == 0
    assert layout.padded_vocab_size >= vocab
    plan = format_plan(cfg, layout)
    assert "Memory per rank" in plan and "FLOPs per token" in plan
    ds = deepspeed_config(cfg, layout)
    assert ds["train_batch_size"] == layout.global_batch_size
    # a CPU-only machine resolves the same preset unless it asks for fp16
    if cfg.train.precision != "fp16":
        assert resolve(cfg, world, vocab, cuda_available=False).device == "cpu"


def test_quickstart_is_cpu_friendly():
    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [])
    assert cfg.train.precision == "fp32" and cfg.train.device == "auto"
    assert cfg.model.vocab_size is None and cfg.data.paths == ["runs/quickstart/data"]
    assert cfg.train.out_dir == "runs/quickstart"


def test_llama_7b_fits_80gb_per_gpu():
    from pretrain.plan.estimate import memory_estimate

    cfg = load_config(str(ROOT / "configs" / "llama-7b.yaml"), [])
    for world in (8, 16, 64):
        layout = resolve(cfg, world, 32000, cuda_available=True)
        assert memory_estimate(cfg, layout)["total"] < 70 * 2**30


# --------------------------------------------------------------------------- validation
INVALID = [
    # (overrides, world size, data vocab, text the message must contain)
    (["parallel.tensor=2", "parallel.data=3"], 4, None, "parallel.data (3) x parallel.tensor (2)"),
    (["parallel.tensor=3"], 4, None, "parallel.tensor (3)"),
    (["train.global_batch_size=7"], 2, None, "train.global_batch_size (7) must be a multiple of"),
    (["model.n_head=3"], 1, None, "model.n_head (3) must divide model.d_model (64)"),
    (["model.n_kv_head=3"], 1, None, "model.n_kv_head (3) must divide model.n_head (4)"),
    (["model.n_kv_head=1", "parallel.tensor=2"], 2, None,
     "model.n_kv_head (1) must be divisible by parallel.tensor (2)"),
    (["model.n_head=2", "model.d_model=64", "parallel.tensor=4"], 4, None,
     "model.n_head (2) must be divisible by parallel.tensor (4)"),
    (["model.n_layer=2", "parallel.pipeline=4"], 4, None, "model.n_layer (2) must be >= parallel.pipeline (4)"),
    (["parallel.zero_stage=4"], 1, None, "parallel.zero_stage must be 0, 1, 2 or 3"),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], 2, None,
     "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism; use parallel.zero_stage 0 or 1"),
    (["parallel.pipeline=2", "parallel.zero_stage=3"], 2, None, "ZeRO-2 and ZeRO-3 are incompatible"),
    (["parallel.offload_optimizer=true", "parallel.zero_stage=1"], 1, None,
     "parallel.offload_optimizer needs parallel.zero_stage 2 or 3"),
    (["train.precision=fp8"], 1, None, "train.precision must be one of 'fp32', 'bf16', 'fp16'"),
    (["train.precision=fp16"], 1, None, "use train.precision bf16 or fp32"),
    (["train.precision=fp16", "train.device=auto"], 1, None, "train.precision 'fp16' needs a GPU"),
    (["train.device=cuda"], 1, None, "train.device is 'cuda' but no CUDA device"),
    (["train.device=tpu"], 1, None, "train.device must be one of"),
    (["model.position=alibi"], 1, None, "model.position must be one of 'learned', 'rope'"),
    (["model.norm=batchnorm"], 1, None, "model.norm must be one of"),
    (["model.mlp=relu"], 1, None, "model.mlp must be one of"),
    (["schedule.kind=step"], 1, None, "schedule.kind must be one of"),
    (["parallel.pipeline_partition=type:Block"], 1, None, "parallel.pipeline_partition must be one of"),
    (["checkpoint.resume=/nonexistent/ckpt"], 1, None, "checkpoint.resume: checkpoint directory"),
    (["checkpoint.resume=''"], 1, None, "checkpoint.resume must be 'auto', 'none'"),
    (["model.n_layer=0"], 1, None, "model.n_layer must be a positive integer, got 0"),
    (["model.d_model=-64"], 1, None, "model.d_model must be a positive integer"),
    (["train.micro_batch_size=0"], 1, None, "train.micro_batch_size must be a positive integer"),
    (["train.max_steps=0"], 1, None, "train.max_steps must be a positive integer"),
    (["model.seq_len=0"], 1, None, "model.seq_len must be a positive integer"),
    (["optim.lr=0"], 1, None, "optim.lr must be > 0"),
    (["optim.lr=1e-4", "schedule.min_lr=1e-3"], 1, None, "schedule.min_lr (0.001) must be <= optim.lr"),
    (["schedule.warmup_steps=11"], 1, None, "schedule.warmup_steps (11) must be <= train.max_steps (10)"),
    (["model.dropout=1.0"], 1, None, "model.dropout must be in [0, 1)"),
    (["model.dropout=-0.1"], 1, None, "model.dropout must be in [0, 1)"),
    (["data.synthetic=false"], 1, 1000, "data.paths is empty"),
    (["data.synthetic=false", "data.paths=[a, b]", "data.weights=[1]"], 1, 1000,
     "data.weights has 1 entries but data.paths has 2"),
    (["data.synthetic=false", "data.paths=[a, b]", "data.weights=[1, -1]"], 1, 1000, "data.weights must be >= 0"),
    (["data.synthetic=false", "data.paths=[a, b]", "data.weights=[0, 0]"], 1, 1000, "data.weights are all 0"),
    (["data.synthetic=false", "data.paths=[a]"], 1, 5000,
     "the data's vocabulary (5000) does not fit model.vocab_size (1000)"),
    (["data.synthetic=false", "data.paths=[a]", "model.vocab_size=null"], 1, None,
     "model.vocab_size is null and the data's vocabulary is unknown"),
    (["model.vocab_size=null"], 1, None, "data.synthetic needs model.vocab_size"),
    (["model.position=rope", "model.d_model=60", "model.n_head=4"], 1, None,
     "model.position 'rope' needs an even head dimension"),
    (["parallel.sequence_parallel=true"], 1, None, "parallel.sequence_parallel needs parallel.tensor > 1"),
    (["logging.interval=0"], 1, None, "logging.interval must be a positive integer"),
    (["checkpoint.keep_last=0"], 1, None, "checkpoint.keep_last must be a positive integer"),
    (["checkpoint.interval=-1"], 1, None, "checkpoint.interval must be >= 0"),
    (["optim.beta2=1.0"], 1, None, "optim.beta2 must be in [0, 1)"),
    (["optim.grad_clip=-1"], 1, None, "optim.grad_clip must be >= 0"),
    (["model.n_kv_head=0"], 1, None, "model.n_kv_head must be a positive integer or null"),
    (["parallel.tensor=2", "model.d_ff=101"], 2, None, "model.d_ff"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "model.seq_len=33"], 2, None,
     "use a seq_len divisible by 2"),
    (["deepspeed.train_batch_size=64"], 1, None, "deepspeed.train_batch_size is generated from train.global_batch_size"),
    (["deepspeed.zero_optimization.stage=3"], 1, None, "deepspeed.zero_optimization.stage is generated from"),
    (["deepspeed.optimizer={type: Adam}"], 1, None, "deepspeed.optimizer is generated from the optim section"),
    (["data.paths=[1]", "data.synthetic=false"], 1, 1000, "data.paths must be a list of non-empty path strings"),
    (["guard.spike_sigma=-1"], 1, None, "guard.spike_sigma must be >= 0"),
    (["guard.spike_window=1"], 1, None, "guard.spike_window must be >= 2"),
    (["guard.step_timeout=60", "guard.startup_timeout=30"], 1, None, "guard.startup_timeout (30 s) must be >= guard.step_timeout"),
    (["train.max_consecutive_skips=0"], 1, None, "train.max_consecutive_skips must be a positive integer or null"),
    (["eval.tasks=[mmlu, '']"], 1, None, "eval.tasks must be a list of lm-eval task names"),
    (["eval.include_path=/no/such/dir"], 1, None, "eval.include_path: '/no/such/dir' is not a directory"),
    (["eval.limit=0"], 1, None, "eval.limit must be a positive integer or null"),
]


@pytest.mark.parametrize("overrides, world, vocab, needle", INVALID,
                         ids=[" ".join(c[0]) for c in INVALID])
def test_invalid_config_rejected(overrides, world, vocab, needle):
    cfg = _cfg(*overrides)
    with pytest.raises(UserError) as e:
        resolve(cfg, world, vocab, cuda_available=False)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_at_least_12_kinds_of_invalid_configs():
    assert len({c[3].split(" ")[0] for c in INVALID}) >= 12


def test_validation_needs_no_process_group_nor_torch():
    """resolve is pure: it runs before torch.distributed exists (here: without torch at all)."""
    code = (
        "import sys\n"
        "from pretrain.config import load_config, resolve, deepspeed_config\n"
        "from pretrain.errors import UserError\n"
        "from pretrain.plan.report import format_plan\n"
        f"cfg = load_config(None, {BASE!r} + ['parallel.pipeline=2', 'parallel.zero_stage=2'])\n"
        "try:\n"
        "    resolve(cfg, 2, None, cuda_available=False)\n"
        "    raise SystemExit('not rejected')\n"
        "except UserError:\n"
        "    pass\n"
        "cfg.parallel.zero_stage = 1\n"
        "lay = resolve(cfg, 2, None, cuda_available=False)\n"
        "deepspeed_config(cfg, lay); format_plan(cfg, lay)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr


def test_resolve_detects_cuda_by_itself():
    import torch

    cfg = _cfg("train.device=auto")
    layout = resolve(cfg, 1, None)
    assert layout.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()


def test_layout_derivation():
    cfg = _cfg("parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=16",
               "model.vocab_size=1000", "model.vocab_multiple=128")
    lay = resolve(cfg, 8, None, cuda_available=False)
    assert (lay.dp, lay.tp, lay.pp) == (2, 2, 2)
    assert (lay.micro_batch_size, lay.grad_accum, lay.global_batch_size) == (2, 4, 16)
    assert lay.vocab_size == 1000 and lay.padded_vocab_size == 1024  # multiple of 128 * 2
    # global null = micro x dp
    lay = resolve(_cfg(), 4, None, cuda_available=False)
    assert (lay.dp, lay.grad_accum, lay.global_batch_size) == (4, 1, 8)
    # data vocab smaller than model.vocab_size: table sized for the model
    cfg = _cfg("data.synthetic=false", "data.paths=[d]", "model.vocab_size=1000")
    lay = resolve(cfg, 1, 900, cuda_available=False)
    assert lay.vocab_size == 900 and lay.padded_vocab_size == 1024
    cfg = _cfg("data.synthetic=false", "data.paths=[d]", "model.vocab_size=null")
    lay = resolve(cfg, 1, 50257, cuda_available=False)
    assert lay.vocab_size == 50257 and lay.padded_vocab_size == 50304


def test_layout_rank_order():
    cfg = _cfg("parallel.tensor=2", "parallel.pipeline=2")
    lay = resolve(cfg, 12, None, cuda_available=False)
    assert lay.dp == 3
    seen = set()
    for r in range(12):
        pp, dp, tp = lay.coords(r)
        assert lay.rank(pp, dp, tp) == r == (pp * lay.dp + dp) * lay.tp + tp
        seen.add((pp, dp, tp))
    assert len(seen) == 12
    assert lay.coords(5) == (0, 2, 1)


# --------------------------------------------------------------------------- docs
def test_config_docs_current():
    from pretrain.config import docs

    assert docs.main(["--check"]) == 0, "docs/CONFIG.md is stale: run python -m pretrain.config.docs"


def test_every_field_documented():
    from pretrain.config.docs import field_docs

    docs = field_docs()
    for cls, info in docs.items():
        for name, annotation, doc in info["fields"]:
            if annotation.endswith("Config"):  # a section: documented by its class docstring
                assert docs[annotation]["doc"], f"{annotation} has no docstring"
                continue
            assert doc, f"{cls}.{name} has no docstring"
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    assert "`model.n_layer`" in text and "`train.global_batch_size`" in text


def test_docs_check_detects_stale(tmp_path):
    from pretrain.config import docs

    out = tmp_path / "CONFIG.md"
    out.write_text("old\n")
    assert docs.main(["--check", "--out", str(out)]) == 1
    assert docs.main(["--out", str(out)]) == 0
    assert docs.main(["--check", "--out", str(out)]) == 0
