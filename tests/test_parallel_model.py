"""Tensor parallelism applied to the GPT, and the pipeline module, in spawned gloo processes.

One spawned pair of processes runs every TP model check (spawning costs seconds on a
2-core box), another the pipeline checks; each check is reported by its own test.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from pretrain.config.schema import ModelConfig
from pretrain.model.gpt import GPT
from pretrain.parallel.spec import merge_state, qkv_permutation, rule_of
from tests.dist_util import run_distributed

V = 256  # the padded vocabulary: 128 x tp for tp 1 and 2, so TP=1 and TP=2 build the same model
B, T = 2, 16

TP_CASES = {
    # name: (ModelConfig overrides, sequence_parallel)
    "gpt2": (dict(dropout=0.1), False),
    "gpt2-sequence-parallel": (dict(dropout=0.1), True),
    "llama-gqa-untied-sequence-parallel": (dict(position="rope", norm="rmsnorm", mlp="swiglu", d_ff=96, n_kv_head=2,
                                                bias=False, tie_embeddings=False), True),
    "llama-gqa-activation-checkpointing": (dict(position="rope", norm="rmsnorm", mlp="swiglu", d_ff=96,
                                                n_kv_head=2, bias=False, dropout=0.1,
                                                activation_checkpointing=True), False),
}


def _model_cfg(**kw) -> ModelConfig:
    base = dict(n_layer=2, d_model=64, n_head=4, seq_len=T, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_tp_case(rank, kw, sp):
    from pretrain.run.engine import GuardedAdamW
    from pretrain.parallel.apply import ParallelGPT

    cfg = _model_cfg(**kw)
    torch.manual_seed(0)
    ref = GPT(cfg, V)
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(0)
    tp = ParallelGPT(cfg, V, dist.group.WORLD, sp)
    # Building the sharded model consumes the RNG exactly as the plain one.
    assert torch.equal(torch.get_rng_state(), rng_after_ref), "RNG consumption differs"
    for block in tp.blocks:
        assert block.attn.n_head == cfg.n_head // 2
        assert block.attn.n_kv_head == (cfg.n_kv_head or cfg.n_head) // 2

    # Same full weights: the merged shards equal the plain model's state dict, bit for bit.
    ref_sd = ref.state_dict()
    merged = merge_state(_gather({k: v.detach().clone() for k, v in tp.state_dict().items()}), cfg)
    assert merged.keys() == ref_sd.keys()
    for k in ref_sd:
        assert torch.equal(merged[k], ref_sd[k]), k

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B, T), generator=g)
    ref.train()
    tp.train()
    torch.manual_seed(7)  # dropout masks: the same RNG state on both (and on every TP rank)
    loss_ref = ref(idx, tgt)
    loss_ref.backward()
    torch.manual_seed(7)
    loss_tp = tp(idx, tgt)
    loss_tp.backward()
    _close(loss_tp.detach(), loss_ref.detach(), "loss")

    grads = _gather({n: p.grad.detach().clone() for n, p in tp.named_parameters()})
    for n, p in tp.named_parameters():  # replicated parameters: the same gradient on every TP rank
        if rule_of(n).tp_dim is None:
            _close(grads[1][n], grads[0][n], f"replicated grad {n}", rtol=1e-6, atol=1e-7)
    merged_g = merge_state(grads, cfg)
    for n, p in ref.named_parameters():
        _close(merged_g[n], p.grad, f"grad {n}")

    # GuardedAdamW's own (fp32 ZeRO-0) norm with DeepSpeed's TP rule equals the plain norm.
    ref_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters())).item()
    opt = GuardedAdamW(tp.parameters(), lr=0.0, clip=1e9, tp_rank=rank, dp_size=1, model_parallel=True)
    opt.step()
    assert not opt.skipped
    assert opt.grad_norm == pytest.approx(ref_norm, rel=1e-5)

    # Without targets the full logits come back (gathered), equal to the plain model's.
    ref.eval()
    tp.eval()
    with torch.no_grad():
        _close(tp(idx), ref(idx), "eval logits")


def _tp_body(rank, world_size, cases):
    report = {}
    for name, (kw, sp) in cases.items():
        try:
            _check_tp_case(rank, kw, sp)
            report[name] = None
        except Exception:  # noqa: BLE001 - reported per check by the parent
            report[name] = traceback.format_exc()
    return report


# ============================================================================ pipeline
def _pipe_body(rank, world_size, overrides):
    import deepspeed

    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.parallel.pipeline import build_pipeline, stage_parts
    from pretrain.parallel.spec import layer_prefix
    from pretrain.parallel.topology import Topology
    from pretrain.parallel.partition import stage_blocks

    os.environ.setdefault("LOCAL_RANK", "0")
    if not deepspeed.comm.is_initialized():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init; these
        # checks need none of it (and a compile killed by a timeout leaves a lock behind).
        deepspeed.comm.torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(None, ["data.synthetic=true", "model.vocab_size=256", "model.n_layer=3", "model.d_model=32",
                             "model.n_head=4", "model.seq_len=16", "train.device=cpu", "train.precision=fp32",
                             "parallel.pipeline=2", *overrides])
    layout = resolve(cfg, world_size, None, cuda_available=False)
    topo = Topology(layout)
    torch.manual_seed(3)
    ref = GPT(cfg.model, layout.padded_vocab_size).state_dict()
    torch.manual_seed(3)
    pipe = build_pipeline(cfg, layout, topo)
    L = cfg.model.n_layer
    parts = stage_parts(cfg, layout.padded_vocab_size, 2)
    assert list(pipe.parts) == parts
    # The plan's block split is the built one.
    blocks = stage_blocks(cfg, layout.padded_vocab_size, 2)[topo.pp_rank]
    local = list(range(parts[topo.pp_rank], parts[topo.pp_rank + 1]))
    assert [i - 1 for i in local if 1 <= i <= L] == list(blocks)
    # Each local layer holds exactly the plain model's initial weights.
    for i, layer in zip(local, pipe.forward_funcs):
        for name, t in layer.state_dict().items():
            if i == L + 1 and name.startswith("wte."):
                assert torch.equal(t, ref["embed." + name]), name  # the tied copy of the table
                continue
            assert torch.equal(t, ref[layer_prefix(i, L) + name]), (i, name)
    replicated = sorted(n for n, p in pipe.named_parameters() if getattr(p, "ds_pipe_replicated", False))
    return {"stage": topo.pp_rank, "local": local, "replicated": replicated,
            "tied": sorted(pipe.tied_comms), "describe": topo.describe()}


PIPE_CASES = {"tied-parameters": [],
              "untied-uniform": ["parallel.pipeline_partition=uniform", "model.tie_embeddings=false"]}


def _body(rank, world_size):
    """Every check of this file in one spawned pair (spawning costs seconds on 2 cores)."""
    report = _tp_body(rank, world_size, TP_CASES)
    for name, overrides in PIPE_CASES.items():
        try:
            report[name] = _pipe_body(rank, world_size, overrides)
        except Exception:  # noqa: BLE001
            report[name] = traceback.format_exc()
    return report


@pytest.fixture(scope="module")
def report():
    return run_distributed(_body, 2, timeout=240)


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_gpt_equals_plain(report, case):
    for rank, rep in enumerate(report):
        assert rep[case] is None, f"rank {rank}:\n{rep[case]}"


@pytest.mark.parametrize("case", list(PIPE_CASES))
def test_pipeline_stages_hold_the_plain_weights(report, case):
    res = [rep[case] for rep in report]
    for rank, r in enumerate(res):
        assert isinstance(r, dict), f"rank {rank}:\n{r}"
    overrides = PIPE_CASES[case]
    assert [r["stage"] for r in res] == [0, 1]
    assert res[0]["local"][0] == 0 and res[1]["local"][-1] == 4  # embedding first, head last
    assert res[0]["replicated"] == []
    if overrides:
        assert res[1]["replicated"] == [] and res[0]["tied"] == []
    else:  # only the last stage's copy of the tied table is a replica (its ln_f counts)
        assert res[1]["replicated"] == ["tied_modules.embed.wte.weight"]
        assert res[0]["tied"] == res[1]["tied"] == ["embed"]
    assert res[1]["describe"] == "rank 1 = (pp 1, dp 0, tp 0)"


# ============================================================================ no processes
def test_qkv_permutation_groups_heads_per_rank():
    nh, nkv, hd, tp = 4, 2, 3, 2
    perm = qkv_permutation(nh, nkv, hd, tp)
    rows = torch.arange((nh + 2 * nkv) * hd)
    per_rank = rows[perm].view(tp, -1)
    # rank 0: q heads 0-1, k head 0, v head 0
    q0 = list(range(0, 2 * hd))
    k0 = list(range(nh * hd, nh * hd + hd))
    v0 = list(range((nh + nkv) * hd, (nh + nkv) * hd + hd))
    assert per_rank[0].tolist() == q0 + k0 + v0
    assert sorted(perm.tolist()) == rows.tolist()
    with pytest.raises(ValueError):
        qkv_permutation(4, 1, 3, 2)


def test_merge_inverts_sharding():
    cfg = _model_cfg(n_kv_head=2, mlp="swiglu", d_ff=96, tie_embeddings=False)
    torch.manual_seed(0)
    full = GPT(cfg, V).state_dict()
    tp = 2
    perm = qkv_permutation(cfg.n_head, 2, cfg.d_model // cfg.n_head, tp)
    shards = [{} for _ in range(tp)]
    for k, v in full.items():
        dim = rule_of(k).tp_dim
        if dim is None:
            for s in shards:
                s[k] = v
            continue
        if k.endswith(("qkv.weight", "qkv.bias")):
            v = v[perm]
        for r, piece in enumerate(v.chunk(tp, dim=dim)):
            shards[r][k] = piece
    merged = merge_state(shards, cfg)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    assert rule_of("blocks.0.attn.proj.bias").tp_dim is None
    assert rule_of("blocks.0.mlp.down.weight").tp_dim == 1
    assert rule_of("head.lm_head.weight").tp_dim == 0


@pytest.mark.parametrize("tp_rank, expected", [(0, (3 * 9 + 4 * 16) ** 0.5), (1, (3 * 9) ** 0.5)])
def test_guarded_adamw_norm_follows_deepspeeds_rule_by_position(tp_rank, expected):
    """TP shards count on every TP rank, replicated parameters on TP rank 0, a pipeline's tied
    copy nowhere -- also after DeepSpeed's unfused bf16 wrapper swaps in attribute-less fp32 copies."""
    from torch import nn

    from pretrain.run.engine import GuardedAdamW
    from pretrain.parallel.tensor import set_tensor_model_parallel_attributes

    shard, rep, tied = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))
    set_tensor_model_parallel_attributes(shard, True, 0)
    tied.ds_pipe_replicated = True
    opt = GuardedAdamW([shard, rep, tied], lr=0.0, clip=1e9, tp_rank=tp_rank, model_parallel=True)
    copies = [p.detach().clone().requires_grad_() for p in (shard, rep, tied)]
    opt.param_groups[0]["params"] = copies
    for c, v in zip(copies, (3.0, 4.0, 5.0)):
        c.grad = torch.full_like(c, v)
    opt.step()
    assert not opt.skipped and opt.grad_norm == pytest.approx(expected)
