"""Tensor-parallel primitives (pretrain.parallel.tensor / comm) and the tests/dist_util helper.

The TP=2 checks all run in ONE spawned pair of processes (spawning costs seconds on a
2-core box); each check reports separately and has its own pytest test below.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.parallel import comm
from pretrain.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_full_param,
    gather_tensor,
    init_normal,
    init_rows,
    pad_vocab,
    param_is_tensor_parallel,
    shard_tensor,
    vocab_parallel_cross_entropy,
)
from tests.dist_util import DistributedTestError, DistributedTimeout, run_distributed

TOL = dict(rtol=1e-6, atol=1e-6)
B, T, C, H, V = 2, 4, 8, 16, 16


def close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# ============================================================ TP=2 checks (children)
def _ref_mlp(seed=0):
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(C, H), nn.Linear(H, C)  # nn.Linear's own (default) init
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    w = torch.randn(B, T, C, generator=g)  # loss weights, so every gradient is non-trivial
    return fc1, fc2, x, w


def _check_mlp(group, sequence_parallel=False, gather_variant=False):
    fc1, fc2, x, w = _ref_mlp()
    xr = x.clone().requires_grad_()
    ref = fc2(F.gelu(fc1(xr)))
    (ref * w).sum().backward()

    if gather_variant:  # gather_output=True -> full hidden -> row splits it again
        col = ColumnParallelLinear.from_linear(fc1, group, gather_output=True)
        row = RowParallelLinear.from_linear(fc2, group, input_is_parallel=False)
    else:
        col = ColumnParallelLinear.from_linear(fc1, group, sequence_parallel=sequence_parallel)
        row = RowParallelLinear.from_linear(fc2, group, sequence_parallel=sequence_parallel)
    if sequence_parallel:
        xt = shard_tensor(x, 1, group).requires_grad_()
        out = row(F.gelu(col(xt)))
        assert out.shape == (B, T // 2, C)
        (out * shard_tensor(w, 1, group)).sum().backward()
        close(gather_tensor(out, 1, group), ref.detach(), "output")
        close(gather_tensor(xt.grad, 1, group), xr.grad, "input grad")
    else:
        xt = x.clone().requires_grad_()
        out = row(F.gelu(col(xt)))
        (out * w).sum().backward()
        close(out.detach(), ref.detach(), "output")
        close(xt.grad, xr.grad, "input grad")
    for name, layer, refl in (("fc1", col, fc1), ("fc2", row, fc2)):
        close(layer.gather_full_weight(), refl.weight.detach(), f"{name}.weight")
        close(layer.gather_full_bias(), refl.bias.detach(), f"{name}.bias")
        close(gather_full_param(layer.weight.grad, group, like=layer.weight), refl.weight.grad, f"{name}.weight.grad")
        close(gather_full_param(layer.bias.grad, group, like=layer.bias), refl.bias.grad, f"{name}.bias.grad")
    return col, row, fc1, fc2


def _check_mlp_plain(group):
    _check_mlp(group)


def _check_mlp_sequence_parallel(group):
    _check_mlp(group, sequence_parallel=True)


def _check_mlp_sequence_parallel_fused_collectives(group):
    comm._GLOO_USE_FUSED = True  # all_gather_single / reduce_scatter_single path (NCCL's)
    try:
        _check_mlp(group, sequence_parallel=True)
        _check_mlp(group, gather_variant=True)
    finally:
        comm._GLOO_USE_FUSED = False


def _check_mlp_gather_output(group):
    _check_mlp(group, gather_variant=True)


def _check_shapes_and_marking(group):
    col = ColumnParallelLinear(C, H, True, group)
    row = RowParallelLinear(H, C, True, group)
    emb = VocabParallelEmbedding(V, C, group)
    assert col.weight.shape == (H // 2, C) and col.bias.shape == (H // 2,)
    assert row.weight.shape == (C, H // 2) and row.bias.shape == (C,)
    assert emb.weight.shape == (V // 2, C)
    for p, dim in ((col.weight, 0), (col.bias, 0), (row.weight, 1), (emb.weight, 0)):
        assert p.tensor_model_parallel is True and p.partition_dim == dim and p.partition_stride == 1
    assert row.bias.tensor_model_parallel is False and row.bias.partition_dim == -1
    from deepspeed.runtime.utils import is_model_parallel_parameter
    assert [is_model_parallel_parameter(p) for p in (col.weight, col.bias, row.weight, row.bias, emb.weight)] \
        == [True, True, True, False, True]


class _TPMpu:
    """The minimal mpu DeepSpeed's clip_grad_norm_ needs: TP group = world, DP = 1."""

    def __init__(self, group):
        self.group = group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self):
        return dist.get_rank(self.group)

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.group)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


class _TorchDistShim:
    """Stands in for ``deepspeed.comm`` inside ``deepspeed.runtime.utils``: DeepSpeed's CPU
    comm backend JIT-compiles a C++ shm op on init, far too slow for a unit test."""

    ReduceOp = dist.ReduceOp
    all_reduce = staticmethod(dist.all_reduce)
    get_world_size = staticmethod(dist.get_world_size)


def _check_deepspeed_grad_norm(group):
    """DeepSpeed 0.19.8's own clip_grad_norm_ with an mpu counts each shard once and the
    replicated row bias once: equals the full model's grad norm (also with SP)."""
    import deepspeed.runtime.utils as ds_utils

    # TP = the 2-rank world, DP = 1: each rank its own data-parallel group.
    dp_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    ds_utils.dist = _TorchDistShim  # this spawned child only
    ds_utils.groups._get_data_parallel_group = lambda: dp_groups[dist.get_rank()]
    for sp in (False, True):
        col, row, fc1, fc2 = _check_mlp(group, sequence_parallel=sp)
        ref = torch.nn.utils.get_total_norm([p.grad for p in (*fc1.parameters(), *fc2.parameters())])
        params = list(col.parameters()) + list(row.parameters())
        got = ds_utils.clip_grad_norm_(params, max_norm=1e9, mpu=_TPMpu(group))
        close(got.reshape(()), ref, f"deepspeed grad norm (sequence_parallel={sp})")
        # and what a naive per-rank sum would give (row bias counted twice) differs:
        naive = torch.stack([p.grad.norm() ** 2 for p in params]).sum()
        dist.all_reduce(naive, group=group)
        assert not torch.allclose(naive.sqrt(), ref)


def _check_embedding(group):
    g = torch.Generator().manual_seed(1)
    ref = nn.Embedding(V, C)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(V, C, generator=g))
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, :2] = torch.tensor([0, V - 1])  # both halves of the vocab
    w = torch.randn(B, T, C, generator=g)
    out_ref = ref(ids)
    (out_ref * w).sum().backward()
    for sp in (False, True):
        emb = VocabParallelEmbedding(V, C, group, sequence_parallel=sp)
        emb.load_full_weight(ref.weight)
        close(emb.gather_full_weight(), ref.weight.detach(), "weight round trip")
        out = emb(ids)
        if sp:
            assert out.shape == (B, T // 2, C)
            (out * shard_tensor(w, 1, group)).sum().backward()
            out = gather_tensor(out, 1, group)
        else:
            (out * w).sum().backward()
        close(out.detach(), out_ref.detach(), f"embedding output (sp={sp})")
        close(gather_full_param(emb.weight.grad, group, like=emb.weight), ref.weight.grad, f"embedding grad (sp={sp})")


def _ce_case(group, dtype=torch.float32, real_vocab=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    full = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    hi = V if real_vocab is None else real_vocab
    tgt = torch.randint(0, hi, (B, T), generator=g)
    tgt[1, 1] = -100  # ignored
    tgt[0, 0], tgt[0, 1] = 0, hi - 1
    w = torch.rand(B, T, generator=g)
    fr = full.detach().clone().requires_grad_()
    ref_logits = fr.float() if real_vocab is None else fr.float()[..., :real_vocab]
    ref = F.cross_entropy(ref_logits.reshape(-1, ref_logits.shape[-1]), tgt.reshape(-1), reduction="none",
                          ignore_index=-100).view(B, T)
    (ref * w).sum().backward()
    shard = shard_tensor(full, -1, group).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, tgt, group, real_vocab=real_vocab)
    assert loss.dtype == torch.float32 and loss.shape == (B, T)
    (loss * w).sum().backward()
    assert shard.grad.dtype == dtype
    return loss, ref, shard.grad, shard_tensor(fr.grad, -1, group)


def _check_cross_entropy(group):
    loss, ref, grad, ref_grad = _ce_case(group)
    close(loss.detach(), ref.detach(), "loss")
    close(grad, ref_grad, "logits grad")
    assert loss[1, 1].item() == 0.0


def _check_cross_entropy_padded_vocab(group):
    loss, ref, grad, ref_grad = _ce_case(group, real_vocab=V - 3)
    close(loss.detach(), ref.detach(), "loss (padded vocab)")
    close(grad, ref_grad, "logits grad (padded vocab)")
    if dist.get_rank(group) == 1:
        assert torch.all(grad[..., -3:] == 0)


def _check_cross_entropy_bf16(group):
    loss, ref, grad, ref_grad = _ce_case(group, dtype=torch.bfloat16)
    close(loss.detach(), ref.detach(), "loss (bf16 logits, fp32 math)")
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-2)


def _check_init_matches_tp1(group):
    def build(grp):
        torch.manual_seed(1234)
        return [ColumnParallelLinear(C, H, True, grp), RowParallelLinear(H, C, True, grp),
                VocabParallelEmbedding(V, C, grp, init_method=init_rows(init_normal(0.02), V - 3))]
    tp2, tp1 = build(group), build(None)
    for a, b in zip(tp2, tp1):
        torch.testing.assert_close(a.gather_full_weight(), b.weight.detach(), rtol=0, atol=0)
    assert torch.all(tp1[2].weight[V - 3:] == 0)


_TP2_CHECKS = {f.__name__[len("_check_"):]: f for f in (
    _check_mlp_plain, _check_mlp_sequence_parallel, _check_mlp_gather_output,
    _check_mlp_sequence_parallel_fused_collectives, _check_shapes_and_marking, _check_deepspeed_grad_norm,
    _check_embedding, _check_cross_entropy, _check_cross_entropy_padded_vocab, _check_cross_entropy_bf16,
    _check_init_matches_tp1,
)}


def _tp2_worker(rank, world_size):
    group = dist.group.WORLD
    results = {}
    for name, check in _TP2_CHECKS.items():
        try:
            check(group)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per check by the parent
            results[name] = traceback.format_exc()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_worker, 2, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("check", list(_TP2_CHECKS))
def test_tp2(tp2_results, check):
    assert len(tp2_results) == 2  # run_distributed returns one result per rank
    failures = [f"rank {r}:\n{res[check]}" for r, res in enumerate(tp2_results) if res[check]]
    assert not failures, "\n".join(failures)


# ============================================================ single process (group=None)
def test_pad_vocab():
    assert pad_vocab(50257, 128, 1) == 50304
    assert pad_vocab(50257, 128, 2) == 50432
    assert pad_vocab(256, 128, 2) == 256
    assert pad_vocab(1, 8, 4) == 32
    with pytest.raises(ValueError):
        pad_vocab(0, 128, 1)


def test_world_of_one_matches_torch():
    fc1, fc2, x, w = _ref_mlp()
    col = ColumnParallelLinear.from_linear(fc1, None, sequence_parallel=True)
    row = RowParallelLinear.from_linear(fc2, None, sequence_parallel=True)
    close(row(F.gelu(col(x))), fc2(F.gelu(fc1(x))), "mlp")
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    assert not row.bias.tensor_model_parallel
    emb = VocabParallelEmbedding(V, C, None)
    ids = torch.randint(0, V, (B, T))
    close(emb(ids), F.embedding(ids, emb.weight), "embedding")
    logits = torch.randn(B, T, V, requires_grad=True)
    tgt = torch.randint(0, V, (B, T))
    tgt[0, 0] = -100
    loss = vocab_parallel_cross_entropy(logits, tgt, None)
    ref = F.cross_entropy(logits.view(-1, V), tgt.view(-1), reduction="none").view(B, T)
    close(loss, ref, "ce")
    gl, = torch.autograd.grad(loss.sum(), logits)
    gr, = torch.autograd.grad(ref.sum(), logits)
    close(gl, gr, "ce grad")


def test_errors():
    with pytest.raises(ValueError, match="shape"):
        ColumnParallelLinear(4, 8, True, None).load_full_weight(torch.zeros(8, 5))
    with pytest.raises(ValueError):
        RowParallelLinear(4, 8, True, None, input_is_parallel=False, sequence_parallel=True)
    with pytest.raises(ValueError):
        ColumnParallelLinear(4, 8, True, None, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3, 8), torch.zeros(2, 4, dtype=torch.long), None)


class _FakeGroup2:
    pass


def test_errors_setup(monkeypatch):
    # VocabParallelEmbedding's divisibility check runs before any collective.
    monkeypatch.setattr(comm, "get_world_size", lambda g: 1 if g is None else 2)
    import pretrain.parallel.tensor as tensor_mod
    monkeypatch.setattr(tensor_mod, "get_world_size", comm.get_world_size)
    with pytest.raises(ValueError, match="pad_vocab"):
        VocabParallelEmbedding(15, 4, _FakeGroup2())


def test_param_is_tensor_parallel_matches_deepspeed_rule():
    p = nn.Parameter(torch.zeros(2))
    assert not param_is_tensor_parallel(p)
    p.tensor_model_parallel = True
    assert param_is_tensor_parallel(p)


def test_package_is_import_light_and_exports_match():
    import subprocess

    import pretrain.parallel as pp
    from pretrain.parallel import tensor

    assert set(tensor.__all__) == pp._TENSOR_NAMES
    assert pp.ColumnParallelLinear is ColumnParallelLinear
    code = "import sys, pretrain.parallel; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ============================================================ dist_util
def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()


def _return_early_on_rank0(rank, world_size):
    if rank == 0:
        return "left"
    dist.all_reduce(torch.ones(1))  # peer is gone: must fail, not hang


def _die_on_rank0(rank, world_size):
    if rank == 0:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def _hang_on_rank1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


@pytest.mark.slow
def test_dist_util_child_exception_fails_parent_with_message():
    with pytest.raises(DistributedTestError, match="rank 1 raised:(.|\n)*ValueError: boom from rank 1"):
        run_distributed(_raise_on_rank1, 2, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("body", [_return_early_on_rank0, _die_on_rank0, _hang_on_rank1])
def test_dist_util_dead_or_hung_peer_fails_within_timeout(body):
    timeout = 5.0
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(body, 2, timeout=timeout)
    elapsed = time.monotonic() - t0
    # start-up (unbounded by `timeout` on a loaded box) + timeout + kill/grace slack: never a hang
    assert elapsed < timeout + 40, f"took {elapsed:.1f}s"
    if body is _hang_on_rank1:
        assert isinstance(info.value, DistributedTimeout)
    if body is _die_on_rank0:
        assert "rank 0 died (exit code 3)" in str(info.value)
