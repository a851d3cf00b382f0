"""The pipeline's last stage computes the single-process model's fused, chunked loss
(pretrain.parallel.pipeline: PipeHead hands hidden states to PipeLoss, not logits).

The head and loss pieces equal the plain model's head with targets (tied and untied, and
vocab-parallel over TP=2), nothing of tokens x vocab is kept for the backward, and PP=2 training
(with and without activation checkpointing) has the single-process run's losses within 1e-6.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_util import run_distributed
from train_util import check, losses, run_train

V, C, B, T = 96, 16, 2, 12


def _plain(tied: bool, seed: int = 0):
    from pretrain.config.schema import ModelConfig
    from pretrain.model import GPT

    cfg = ModelConfig(n_layer=1, d_model=C, n_head=2, seq_len=T, vocab_size=V, dropout=0.0, tie_embeddings=tied)
    return GPT(cfg, V, seed=seed)


def _pipe_pieces(model, group=None):
    """The last stage's PipeHead (with the plain model's weights, this rank's vocab rows) and PipeLoss."""
    from pretrain.parallel.comm import get_rank, get_world_size
    from pretrain.parallel.pipeline import PipeHead, PipeLoss

    rows = V // get_world_size(group)
    lo = get_rank(group) * rows
    wte = None
    if model.cfg.tie_embeddings:  # the last stage's copy of the token table
        wte = nn.Embedding(rows, C)
        wte.weight.data.copy_(model.embed.wte.weight.data[lo:lo + rows])
    head = PipeHead(model.head, group, wte=wte)
    if head.lm_head is not model.head.lm_head:  # TP: a vocab-parallel copy of the output weight
        head.lm_head.weight.data.copy_(model.head.lm_head.weight.data[lo:lo + rows])
    loss = PipeLoss(group)
    loss.head = head
    return head, loss


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :3] = -100  # ignored positions
    return x, t


def _weight(model):
    return model.embed.wte.weight if model.cfg.tie_embeddings else model.head.lm_head.weight


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_pipe_head_and_loss_equal_the_plain_head(tied):
    model = _plain(tied)
    head, loss_fn = _pipe_pieces(model)
    x, t = _inputs()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = model.head(x1, targets=t)
    h = head(x2)
    assert h.shape == (B, T, C)  # hidden states, not logits, leave the head
    got = loss_fn(h, t)
    ref.backward()
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-6
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    own = head.wte.weight if tied else head.lm_head.weight
    torch.testing.assert_close(own.grad, _weight(model).grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.ln_f.weight.grad, model.head.ln_f.weight.grad, rtol=1e-6, atol=1e-6)
    loss_fn.factor = 2.0  # fault injection's multiplier still applies
    assert abs(loss_fn(head(x), t).item() - 2 * ref.item()) <= 2e-6


def _saved_bytes(fn) -> tuple[int, int]:
    """(largest tensor autograd saves while `fn` runs, parameters excluded; its output's size)."""
    largest = [0]

    def pack(t):
        if not isinstance(t, nn.Parameter):
            largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return largest[0], out.numel()


def test_the_last_stage_keeps_nothing_of_tokens_by_vocab():
    """Everything kept for the backward (saved tensors, and the head's output that DeepSpeed keeps
    until then) is of hidden or weight size; the logits path it replaced saved tokens x vocab."""
    from pretrain.model.gpt import loss_fn

    model = _plain(tied=False)
    head, pipe_loss = _pipe_pieces(model)
    x, t = _inputs()
    x = x.requires_grad_()
    saved, out = _saved_bytes(lambda: head(x))
    saved_loss, _ = _saved_bytes(lambda: pipe_loss(head(x), t))
    assert out == B * T * C and max(saved, saved_loss) <= max(B * T * C, V * C) < B * T * V
    logits_saved, logits = _saved_bytes(lambda: loss_fn(F.linear(head(x), head.lm_head.weight), t))
    assert logits == 1 and logits_saved == B * T * V  # the measure sees logits where there are some


def _tp_body(rank, world_size):
    import torch.distributed as dist

    report = {}
    for tied in (True, False):
        model = _plain(tied)
        head, loss_fn = _pipe_pieces(model, dist.group.WORLD)
        x, t = _inputs()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = model.head(x1, targets=t)
        got = loss_fn(head(x2), t)
        ref.backward()
        got.backward()
        own = head.wte.weight if tied else head.lm_head.weight
        rows = V // world_size
        report[tied] = (abs(got.item() - ref.item()), (x2.grad - x1.grad).abs().max().item(),
                        (own.grad - _weight(model).grad[rank * rows:(rank + 1) * rows]).abs().max().item())
    return report


def test_vocab_parallel_pipe_loss_equals_the_plain_head():
    """TP=2: each rank's PipeHead holds half the vocabulary; the loss, the gradient of the head's
    input and each rank's rows of the weight gradient equal the plain head's within 1e-6."""
    for rank, report in enumerate(run_distributed(_tp_body, 2, timeout=120)):
        for tied, diffs in report.items():
            assert max(diffs) <= 1e-6, (rank, "tied" if tied else "untied", diffs)


COMMON = ["model.dropout=0.0", "model.vocab_size=512", "train.max_steps=4", "checkpoint.interval=0",
          "train.eval_interval=0"]


def test_pipeline_training_has_the_single_process_losses(tmp_path):
    """PP=2 (ZeRO-0, fp32), with and without activation checkpointing: every step's loss equals
    the single-process run's (which uses the same fused loss) within 1e-6."""
    check(run_train(tmp_path / "single", COMMON + ["parallel.zero_stage=0"]))
    ref = losses(tmp_path / "single")
    assert sorted(ref) == [1, 2, 3, 4]
    for name, extra in (("pp2", []), ("pp2-checkpointing", ["model.activation_checkpointing=true"])):
        check(run_train(tmp_path / name, COMMON + ["parallel.pipeline=2", "parallel.zero_stage=0", *extra], nproc=2))
        got = losses(tmp_path / name)
        assert got.keys() == ref.keys()
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-6), (name, step)
