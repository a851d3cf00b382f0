"""The analytic planner: parameter counts against the real model, FLOPs, memory, layout."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config, resolve
from pretrain.config.schema import Config, ModelConfig
from pretrain.plan.report import format_plan
from pretrain.model.size import count_params, ffn_dim, flops_per_token, matmul_params
from pretrain.parallel.partition import partition_balanced, partition_uniform, stage_blocks
from pretrain.plan.estimate import memory_estimate

GiB = 2**30

ARCHS = {
    "gpt2": dict(),
    "gpt2-nobias": dict(bias=False),
    "gpt2-untied": dict(tie_embeddings=False),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2),
    "llama-bias-layernorm": dict(position="rope", mlp="swiglu", bias=True, n_kv_head=1),
    "rmsnorm-bias-learned": dict(norm="rmsnorm", bias=True, d_ff=100),
    "gqa-gelu": dict(n_kv_head=2, d_ff=96),
    "swiglu-default-dff": dict(mlp="swiglu", d_model=96, n_head=4),
}


def _model_cfg(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=64, seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", ARCHS)
def test_count_params_matches_model(name):
    """The analytic count equals the real model's (tied weights counted once)."""
    from pretrain.model.gpt import GPT

    mcfg = _model_cfg(**ARCHS[name])
    vocab = 256
    model = GPT(mcfg, vocab)
    real = sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once
    c = count_params(mcfg, vocab)
    assert c["total"] == real
    assert c["embedding"] + c["non_embedding"] == c["total"]
    if hasattr(model, "num_params"):
        assert model.num_params() == real
        # the FLOPs' N is the model's non-embedding count (nanoGPT / baseline convention)
        assert matmul_params(mcfg, vocab) == model.num_params(non_embedding=True)


def test_ffn_dim_matches_model():
    from pretrain.model.layers import resolve_d_ff

    for kw in ({}, {"mlp": "swiglu"}, {"mlp": "swiglu", "d_model": 4096}, {"d_ff": 123}):
        m = _model_cfg(**kw)
        assert ffn_dim(m) == resolve_d_ff(m)
    assert ffn_dim(_model_cfg(mlp="swiglu", d_model=4096)) == 11008
    assert ffn_dim(_model_cfg(mlp="swiglu", d_model=2048)) == 5632


def test_known_model_sizes():
    # GPT-2 124M with the vocabulary padded to 50304 (nanoGPT / llm.c figure)
    assert count_params(ModelConfig(), 50304)["total"] == 124_475_904
    # Llama 2 7B: 6,738,415,616 parameters
    llama7 = ModelConfig(n_layer=32, n_head=32, d_model=4096, seq_len=4096, position="rope",
                         norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    assert count_params(llama7, 32000)["total"] == 6_738_415_616


def test_flops_per_token_convention():
    m = ModelConfig()  # GPT-2 124M, tied, learned positions
    c = count_params(m, 50304)
    n = c["total"] - m.seq_len * m.d_model  # all but the position embeddings
    assert flops_per_token(m, 50304) == 6 * n + 12 * 12 * 768 * 1024
    untied = dataclasses.replace(m, tie_embeddings=False)
    cu = count_params(untied, 50304)
    # untied: the input embedding is lookup-only, the head is the matmul: same N as tied
    assert cu["total"] == c["total"] + 50304 * 768
    assert flops_per_token(untied, 50304) == flops_per_token(m, 50304)
    rope = dataclasses.replace(m, position="rope")
    assert flops_per_token(rope, 50304) == 6 * count_params(rope, 50304)["total"] + 12 * 12 * 768 * 1024


def _layout(overrides, world, vocab=50257, gpu=True):
    cfg = load_config(None, ["data.synthetic=true", f"model.vocab_size={vocab}"] + list(overrides))
    return cfg, resolve(cfg, world, None, cuda_available=gpu)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero3_bf16_states_are_16_psi_over_n(precision):
    cfg, lay = _layout(["parallel.zero_stage=3", f"train.precision={precision}"], 8)
    psi = count_params(cfg.model, lay.padded_vocab_size)["total"]
    assert psi % 8 == 0
    mem = memory_estimate(cfg, lay)
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == 16 * psi // 8


@pytest.mark.parametrize("stage, formula", [
    (0, lambda p, n: 16 * p),
    (1, lambda p, n: 4 * p + 12 * p // n),
    # ZeRO-2: 2Psi + 14Psi/N, plus its reduce bucket (5e8 elements) beside the gradient partition
    (2, lambda p, n: 2 * p + 12 * p // n + 2 * min(p, p // n + 500_000_000)),
    (3, lambda p, n: 16 * p // n),
])
@pytest.mark.parametrize("big", [False, True])
def test_zero_stages_reference_formulas(stage, formula, big):
    """REFERENCE.md: ZeRO-0 16Psi; ZeRO-1 4Psi + 12Psi/N; ZeRO-2 2Psi + 14Psi/N; ZeRO-3 16Psi/N."""
    shape = ["model.n_layer=32", "model.d_model=4096", "model.n_head=32"] if big else []
    cfg, lay = _layout(shape + [f"parallel.zero_stage={stage}", "train.precision=bf16"], 4)
    psi = count_params(cfg.model, lay.padded_vocab_size)["total"]
    mem = memory_estimate(cfg, lay)
    assert mem["params"] == psi
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == formula(psi, 4)
    if big and stage == 2:  # the bucket is smaller than the unsharded gradients: they are sharded
        assert mem["gradients"] < 2 * psi
    # ZeRO-3: live gathered weights (up to 1e9 parameters) and the largest layer's (the embedding's) gradient
    emb = lay.padded_vocab_size * cfg.model.d_model + cfg.model.seq_len * cfg.model.d_model
    assert mem["buffers"] == (2 * min(psi, 10**9) + 2 * emb if stage == 3 else 0)


def test_fp32_zero_master_partition():
    """DeepSpeed's ZeRO-1/2 keep an fp32 master partition even in fp32 (measured); ZeRO-0/3 do not."""
    for stage, per_param in ((0, 8), (1, 12 / 2), (2, 12 / 2), (3, 8 / 2)):
        cfg, lay = _layout([f"parallel.zero_stage={stage}", "train.precision=fp32", "train.device=cpu"], 2,
                           gpu=False)
        psi = count_params(cfg.model, lay.padded_vocab_size)["total"]
        assert memory_estimate(cfg, lay)["optimizer"] == pytest.approx(per_param * psi, abs=16)


def test_fp32_and_offload_and_tp():
    cfg, lay = _layout(["parallel.zero_stage=0", "train.precision=fp32", "train.device=cpu"], 1, gpu=False)
    psi = count_params(cfg.model, lay.padded_vocab_size)["total"]
    mem = memory_estimate(cfg, lay)
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * psi, 4 * psi, 8 * psi)
    cfg, lay = _layout(["parallel.zero_stage=2", "parallel.offload_optimizer=true"], 2)
    mem = memory_estimate(cfg, lay)
    assert mem["optimizer"] == 0 and mem["optimizer_cpu"] == 12 * psi // 2
    cfg, lay = _layout(["parallel.tensor=4", "parallel.zero_stage=0"], 4)
    psi = count_params(cfg.model, lay.padded_vocab_size)["total"]
    assert memory_estimate(cfg, lay)["params"] == math.ceil(psi / 4)


def test_activation_formula():
    """Korthikanti et al.: s*b*h*(34 + 5as/h) per layer (16-bit), SP divides by t,
    full recompute keeps 2*s*b*h per layer."""
    s, b, h, a, L, V = 1024, 4, 768, 12, 12, 50304
    base = ["model.seq_len=1024", "train.micro_batch_size=4", "parallel.zero_stage=0"]
    # the fused, chunked loss: fp32 gradients of the head weight and its input, 3 chunks of 2**25 logits
    logits = 4 * V * h + 4 * s * b * h + 12 * 2**25
    cfg, lay = _layout(base, 1)
    mem = memory_estimate(cfg, lay)
    assert mem["activations_stored_attention"] == pytest.approx(L * s * b * h * (34 + 5 * a * s / h) + logits,
                                                                rel=1e-9)
    assert mem["activations"] == pytest.approx(L * s * b * h * 34 + logits, rel=1e-9)  # SDPA: no s x s matrix
    cfg, lay = _layout(base + ["parallel.tensor=4", "parallel.sequence_parallel=true"], 4)
    mem = memory_estimate(cfg, lay)
    Vp = lay.padded_vocab_size
    assert mem["activations_stored_attention"] == pytest.approx(
        L * s * b * h / 4 * (34 + 5 * a * s / h) + 4 * Vp * h / 4 + 4 * s * b * h + 12 * 2**25, rel=1e-9)
    cfg, lay = _layout(base + ["parallel.tensor=4"], 4)
    assert memory_estimate(cfg, lay)["activations_stored_attention"] == pytest.approx(
        L * s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)) + 4 * Vp * h / 4 + 4 * s * b * h + 12 * 2**25,
        rel=1e-9)
    cfg, lay = _layout(base + ["model.activation_checkpointing=true"], 1)
    one_layer = s * b * h * 34
    assert memory_estimate(cfg, lay)["activations"] == pytest.approx(L * 2 * s * b * h + one_layer + logits,
                                                                     rel=1e-9)
    cfg, lay = _layout(base + ["train.precision=fp32", "train.device=cpu"], 1, gpu=False)
    assert memory_estimate(cfg, lay)["activations"] == pytest.approx(2 * L * s * b * h * 34 + logits, rel=1e-9)


def test_partitions_match_deepspeed():
    from deepspeed.runtime import utils as ds_utils

    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 30)
        parts = rng.randint(1, 8)
        weights = [rng.choice([0, 1, 100, rng.randint(1, 10**6)]) for _ in range(n)]
        assert partition_uniform(n, parts) == list(ds_utils.partition_uniform(n, parts))
        assert partition_balanced(weights, parts) == list(ds_utils.partition_balanced(weights, parts))


def test_pipeline_stages_and_plan():
    cfg, lay = _layout(["model.n_layer=24", "model.d_model=1024", "model.n_head=16",
                        "parallel.pipeline=4", "train.global_batch_size=64"], 8)
    blocks = stage_blocks(cfg, lay.padded_vocab_size, 4)
    assert sum(len(r) for r in blocks) == 24
    assert [r.start for r in blocks] == sorted(r.start for r in blocks)
    assert blocks[0].start == 0 and blocks[-1].stop == 24
    # the embedding and the (tied) head are heavy: end stages get fewer blocks
    assert len(blocks[0]) < len(blocks[1]) and len(blocks[-1]) < len(blocks[1])
    cfg.parallel.pipeline_partition = "uniform"
    assert [len(r) for r in stage_blocks(cfg, lay.padded_vocab_size, 4)] == [6, 7, 6, 5]
    plan = format_plan(cfg, lay)
    assert "Pipeline stages (uniform partition)" in plan
    assert "stage 0: 6 blocks (0-5) + embedding" in plan
    mem = memory_estimate(cfg, lay)
    assert len(mem["per_stage"]) == 4 and mem["in_flight"] >= 1


def test_format_plan_contents():
    cfg, lay = _layout(["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=64",
                        "train.micro_batch_size=4"], 8)
    plan = format_plan(cfg, lay)
    assert "micro 4 x accumulation 8 x data-parallel 2 = global 64 sequences = 65,536 tokens per step" in plan
    assert "world 8 = data 2 x tensor 2 x pipeline 2" in plan
    # DeepSpeed order pipe, data, model: rank = (pp*dp + dp_idx)*tp + tp_idx
    assert "pp 0, dp 1: ranks 2-3 (tp 0-1)" in plan
    assert "pp 1, dp 0: ranks 4-5 (tp 0-1)" in plan
    assert f"{count_params(cfg.model, lay.padded_vocab_size)['total']:,}" in plan
    assert f"{flops_per_token(cfg.model, lay.padded_vocab_size):,}" in plan
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        assert key in plan


def test_llama_7b_plan_fits_80gb():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "llama-7b.yaml"
    cfg = load_config(str(path), [])
    lay = resolve(cfg, 8, 32000, cuda_available=True)
    mem = memory_estimate(cfg, lay)
    assert mem["total"] + 3 * GiB < 80e9
    assert "total" in format_plan(cfg, lay)


def test_plan_needs_no_model_or_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom pretrain.config import load_config, resolve\nfrom pretrain.plan.report import format_plan\n"
            "cfg = load_config('configs/llama-7b.yaml', [])\n"
            "print(format_plan(cfg, resolve(cfg, 16, 32000, cuda_available=True)))\n"
            "assert 'torch' not in sys.modules\n")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Memory per rank" in r.stdout


def test_default_config_plan():
    cfg = Config()
    cfg.model.vocab_size = 50257
    cfg.data.synthetic = True
    lay = resolve(cfg, 1, None, cuda_available=False)
    assert "124,475,904" in format_plan(cfg, lay)


def test_layout_advice_for_zero_over_one_rank():
    from pretrain.plan.estimate import layout_advice

    cfg, lay = _layout(["parallel.zero_stage=1", "train.precision=fp32", "train.device=cpu"], 1, gpu=False)
    assert any("parallel.zero_stage 0" in n for n in layout_advice(cfg, lay))
    assert "parallel.zero_stage 0 skips" in format_plan(cfg, lay)
    for over, world in ((["parallel.zero_stage=0", "train.precision=fp32", "train.device=cpu"], 1),
                        (["parallel.zero_stage=1", "train.precision=fp32", "train.device=cpu"], 2),
                        (["parallel.zero_stage=1", "train.precision=bf16"], 1)):
        cfg, lay = _layout(over, world, gpu="bf16" in over[1])
        assert layout_advice(cfg, lay) == []


def test_host_memory_at_build_holds_one_full_parameter_beyond_the_ranks_own():
    from pretrain.plan.estimate import HOST_BASELINE, host_memory

    over = ["train.device=cpu", "train.precision=fp32"]
    cfg, plain = _layout(over, 1)
    psi = count_params(cfg.model, plain.padded_vocab_size)["total"]
    wte = 4 * plain.padded_vocab_size * cfg.model.d_model  # the largest parameter, drawn whole
    assert host_memory(cfg, plain)["build"] == HOST_BASELINE + wte + 4 * psi
    cfg, z3 = _layout(over + ["parallel.zero_stage=3"], 2)
    embedding = wte + 4 * cfg.model.seq_len * cfg.model.d_model  # the largest layer, whole while partitioned
    assert host_memory(cfg, z3)["build"] == HOST_BASELINE + wte + 2 * psi + embedding
    cfg, tp = _layout(over + ["parallel.tensor=2", "parallel.zero_stage=0"], 2)
    wte = 4 * tp.padded_vocab_size * cfg.model.d_model  # padded to a multiple of vocab_multiple x tp
    assert host_memory(cfg, tp)["build"] == HOST_BASELINE + wte + 4 * math.ceil(
        count_params(cfg.model, tp.padded_vocab_size)["total"] / 2)
    assert host_memory(cfg, tp)["steady"] > host_memory(cfg, tp)["build"]  # gradients, Adam, activations
    cfg, gpu = _layout(["train.device=cuda", "train.precision=bf16"], 1, gpu=True)
    wte = 4 * gpu.padded_vocab_size * cfg.model.d_model
    assert host_memory(cfg, gpu) == {"build": HOST_BASELINE + wte, "steady": HOST_BASELINE}
    assert "Host memory per rank (estimate)" in format_plan(cfg, gpu)


def _train_cli(*argv, cwd=None):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "pretrain.train", *argv], cwd=cwd or root, capture_output=True,
                          text=True, timeout=120, env=env)


def test_plan_a_gpu_job_from_a_cpu_node(tmp_path):
    """--plan / --print-deepspeed-config take train.device=cuda without a GPU here, and need no data."""
    r = _train_cli("--config", "configs/llama-7b.yaml", "train.device=cuda", "--world-size", "8", "--plan",
                   "--print-deepspeed-config")
    assert r.returncode == 0, r.stderr
    assert "bf16, device cuda" in r.stdout
    ds = json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("\nModel")])
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_allow_untested_optimizer"] is True and ds["gradient_clipping"] == 1.0  # as the engine passes it
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    if not torch.cuda.is_available():
        r = _train_cli("--config", "configs/llama-7b.yaml", "--world-size", "8", "--plan")
        assert r.returncode == 0 and "device cpu" in r.stdout
        assert "add train.device=cuda to plan a GPU job" in r.stderr


def test_print_config_before_the_data_exists(tmp_path):
    r = _train_cli("--config", "configs/quickstart.yaml", f"data.paths=[{tmp_path / 'not-yet'}]", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "vocab_size: null" in r.stdout and "not-yet" in r.stdout
    # still validated: a bad field is refused in one line
    r = _train_cli("--config", "configs/quickstart.yaml", f"data.paths=[{tmp_path}]", "train.micro_batch_size=0",
                   "--print-config")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "micro_batch_size" in r.stderr
    # --plan needs the vocabulary: the error says how to give it
    r = _train_cli("--config", "configs/quickstart.yaml", f"data.paths=[{tmp_path / 'not-yet'}]", "--plan")
    assert r.returncode == 2 and "set model.vocab_size" in r.stderr
