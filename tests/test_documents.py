"""Packed documents in one process (issue 22): isolation of documents by gradient, restarted
positions, the EOD loss mask, the global-batch token mean, the attention paths and the
start-up self-check, and the EOD rules (tests/test_documents_train.py trains with them)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pretrain.config.schema import DataConfig, ModelConfig
from pretrain.errors import UserError
from pretrain.model import documents
from pretrain.model.doc_check import self_check
from pretrain.model.documents import IGNORE_INDEX, Documents
from pretrain.model.gpt import GPT
from pretrain.run.batches import global_denominator, split

EOD = 0
ALL_ON = dict(mask=True, positions=True, mask_loss=True)
MODELS = {
    "gpt2": ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=24, dropout=0.0),
    "llama": ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=24, dropout=0.0, position="rope",
                         norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}


def _window(a_len: int = 9, T: int = 24, seed: int = 0) -> torch.Tensor:
    """(1, T + 1): document A of a_len tokens (the last one EOD), then document B."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(1, 50, (1, T + 1), generator=g)
    w[0, a_len - 1] = EOD
    return w


def _grad_of_a_from_b_loss(cfg: ModelConfig, docs: Documents | None, a_len: int = 9, ckpt: bool = False):
    """|d loss(B) / d embedding(A)|: the gradient of document B's loss with respect to the
    embedded tokens of document A (max abs), and B's loss."""
    model = GPT(cfg, 64, seed=1)
    for block in model.blocks:
        block.activation_checkpointing = ckpt
    inputs, labels, kwargs = split(_window(a_len), docs)
    labels = labels.clone()
    labels[:, :a_len] = IGNORE_INDEX  # B's loss only
    held = {}

    def keep(module, args, out):
        out.retain_grad()
        held["x"] = out

    model.embed.register_forward_hook(keep)
    loss = model(inputs, labels, **kwargs)
    loss.backward()
    return float(held["x"].grad[0, :a_len].abs().max()), float(loss.detach())


@pytest.mark.parametrize("name", list(MODELS))
def test_document_b_loss_has_exactly_zero_gradient_on_document_a(name):
    cfg = MODELS[name]
    on, _ = _grad_of_a_from_b_loss(cfg, Documents(EOD, **ALL_ON))
    assert on == 0.0
    on_ckpt, _ = _grad_of_a_from_b_loss(cfg, Documents(EOD, **ALL_ON), ckpt=True)
    assert on_ckpt == 0.0  # activation checkpointing recomputes with the same segments
    off, _ = _grad_of_a_from_b_loss(cfg, None)
    assert off > 1e-6
    # the mask alone isolates too (positions run on); positions alone do not
    assert _grad_of_a_from_b_loss(cfg, Documents(EOD, mask=True))[0] == 0.0
    assert _grad_of_a_from_b_loss(cfg, Documents(EOD, positions=True))[0] > 1e-6


def test_positions_restart_and_eod_inputs_carry_no_loss():
    w = torch.tensor([[7, 8, EOD, 9, EOD, EOD, 4, 5, 6]])
    inputs, labels, kwargs = split(w, Documents(EOD, **ALL_ON))
    assert kwargs["doc"].tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert kwargs["pos"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert labels.tolist() == [[8, EOD, IGNORE_INDEX, EOD, IGNORE_INDEX, IGNORE_INDEX, 5, 6]]
    assert w.tolist() == [[7, 8, EOD, 9, EOD, EOD, 4, 5, 6]]  # the batch itself is never written
    # options off: labels as they are, no segments
    inputs, labels, kwargs = split(w, Documents(EOD))
    assert kwargs == {} and labels.tolist() == [w[0, 1:].tolist()]


@pytest.mark.parametrize("name", list(MODELS))
def test_a_document_after_another_equals_it_alone_at_the_window_start(name):
    """Mask and restarted positions: B's logits do not depend on what came before it in the window."""
    model = GPT(MODELS[name], 64, seed=2).eval()
    docs = Documents(EOD, mask=True, positions=True)
    w = _window(a_len=7)[:, :-1]
    b = w[:, 7:]
    with torch.no_grad():
        packed = model(w, **dict(zip(("doc", "pos"), docs.segments(w))))
        alone = model(b)
    torch.testing.assert_close(packed[:, 7:], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flex_path_equals_sdpa_path():
    """FlexAttention's forward (its unfused reference on CPU, which has no backward there) gives
    the SDPA path's outputs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 8) for _ in range(3))
    doc = torch.tensor([[0] * 5 + [1] * 20 + [2] * 15, [0] * 40])
    sdpa, flex = (documents.attend(q, k, v, doc, path) for path in ("sdpa", "flex"))
    torch.testing.assert_close(sdpa, flex, rtol=1e-5, atol=1e-5)
    # one document per row = plain causal attention
    torch.testing.assert_close(sdpa[1], documents.attend(q, k, v, None)[1], rtol=1e-5, atol=1e-6)
    assert (sdpa[0] - documents.attend(q, k, v, None)[0]).abs().max() > 1e-3


@torch.no_grad()
def test_the_block_mask_is_made_once_per_micro_batch_not_per_layer(monkeypatch):
    """Every layer of a forward gets the same ids tensor: FlexAttention's BlockMask (and the CPU
    tiles) are made from it once; a new micro-batch's ids make new ones."""
    import torch.nn.attention.flex_attention as fa

    made = []
    real = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **kw: made.append(1) or real(*a, **kw))
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    doc = torch.tensor([[0] * 10 + [1] * 14])
    first = [documents.attend(q, k, v, doc, "flex") for _ in range(3)]  # three layers
    assert len(made) == 1 and all(torch.equal(first[0], o) for o in first[1:])
    documents.attend(q, k, v, doc.clone(), "flex")  # the next micro-batch
    assert len(made) == 2
    assert documents._tiles_of(doc) is documents._tiles_of(doc)


def test_cpu_tiles_equal_one_masked_attention_outputs_and_gradients():
    """The CPU path's query tiles (each against the keys its documents reach) give the whole
    masked attention's outputs and gradients: short documents, a document longer than a tile,
    and one document filling the window."""
    torch.manual_seed(0)
    T = 2 * documents.TILE + 88
    ids = torch.randint(1, 50, (3, T))
    ids[0, torch.rand(T) < 1 / 30] = EOD  # short documents
    ids[1, [5, 400]] = EOD  # one longer than a tile
    for rows, first_keys in ((2, None), (3, [0, 0, 0])):  # the window-long row reaches key 0
        doc = documents.document_ids(ids[:rows], EOD)
        tiles = documents._tiles_of(doc)
        assert len(tiles) == 3 and [t[2] for t in tiles] == (first_keys or [0, 6, 401])
        q, k, v = (torch.randn(rows, 2, T, 8, requires_grad=True) for _ in range(3))
        got = documents.attend(q, k, v, doc)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=documents.block_causal_mask(doc))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_got = torch.autograd.grad(got.square().sum(), [q, k, v])
        g_want = torch.autograd.grad(want.square().sum(), [q, k, v])
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    short = documents.document_ids(ids[:1], EOD)
    assert documents._tiles_of(short)[2][2] > documents.TILE  # short documents: a band near the diagonal


def test_global_token_mean_over_micro_batches_with_different_masked_counts():
    """Each micro-batch's summed token loss over N / grad_accum is the whole batch's token mean,
    whatever the split; each micro-batch's own mean (averaged) is not."""
    docs = Documents(EOD, mask=True, positions=True, mask_loss=True)
    # init_std 1: token losses that differ a lot, so the two means are far apart
    model = GPT(dataclasses.replace(MODELS["gpt2"], init_std=1.0), 64, seed=3)
    batch = torch.cat([_window(a_len=3, seed=4), _window(a_len=12, seed=5), _window(a_len=20, seed=6),
                       _window(a_len=24, seed=7)])
    batch[0, [6, 9, 15]] = EOD  # micro-batch 0 masks more targets than micro-batch 1
    inputs, labels, kwargs = split(batch, docs)
    with torch.no_grad():
        whole = float(model(inputs, labels, **kwargs))  # the mean over every unmasked target
        for gas in (2, 4):
            micro = [split(m, docs) for m in batch.chunk(gas)]
            den = global_denominator([m[1] for m in micro], None, gas, 1)
            assert float(den) * gas == float((labels != IGNORE_INDEX).sum())
            global_mean = sum(float(model(i, t, denominator=den, **kw)) for i, t, kw in micro) / gas
            assert global_mean == pytest.approx(whole, rel=1e-6)
            mean_of_means = sum(float(model(i, t, **kw)) for i, t, kw in micro) / gas
            assert abs(mean_of_means - whole) > 1e-3 * whole  # against 1e-6 above
    counts = [int((split(m, docs)[1] != IGNORE_INDEX).sum()) for m in batch.chunk(2)]
    assert counts[0] != counts[1]


@pytest.mark.parametrize("path", ["sdpa", "flex"])
@pytest.mark.parametrize("name", list(MODELS))
def test_self_check_passes_on_the_real_paths(name, path):
    got = self_check(MODELS[name], Documents(EOD, **ALL_ON, path=path), torch.device("cpu"), 64)
    assert got["b_change"] == 0.0 and got["a_change"] > 0.1 and got["b_alone"] < 1e-4


def test_self_check_fails_on_a_path_built_without_the_mask():
    with pytest.raises(UserError) as e:
        self_check(MODELS["gpt2"], Documents(EOD, **ALL_ON, path="causal"), torch.device("cpu"), 64)
    msg = str(e.value)
    assert "\n" not in msg and "data.reset_attention_mask" in msg and "ignores the document mask" in msg
    assert "data.document_attention" in msg  # the fix


def _manifest(d, **fields):
    d.mkdir()
    m = {"format": "pretrain-shards", "eos_id": 256, "bos_id": 257, "eos_appended": True, "bos_prepended": False,
         "tokenizer": {"special_tokens": {"<|endoftext|>": 256, "<|startoftext|>": 257}}, **fields}
    (d / "manifest.json").write_text(json.dumps(m))
    return str(d)


@pytest.fixture
def fake_manifests(monkeypatch):
    from pretrain.data import manifest

    # the rules' fields only (a real manifest's other checks are tests/test_documents_train.py's)
    monkeypatch.setattr(manifest, "is_manifest_dir", lambda p: (Path(p) / "manifest.json").is_file())
    monkeypatch.setattr(manifest, "read_manifest", lambda p: json.loads((Path(p) / "manifest.json").read_text()))


def test_eod_comes_from_the_manifest_and_its_rules_name_the_fix(tmp_path, fake_manifests):
    from pretrain.data.eod import resolve_eod

    on = DataConfig(reset_attention_mask=True)
    good = _manifest(tmp_path / "good")
    assert resolve_eod(on, [good], 258) == 256
    assert resolve_eod(DataConfig(eod_mask_loss=True, eod_token_id=256), [good], 258) == 256
    cases = {
        "no_eos": (_manifest(tmp_path / "no_eos", eos_appended=False), on, "without --no-eos"),
        "bos_is_eod": (_manifest(tmp_path / "bos", bos_id=256, bos_prepended=True), on, "split in two"),
        "pad": (_manifest(tmp_path / "pad", eos_id=3, tokenizer={"special_tokens": {"<pad>": 3}}), on, "'<pad>'"),
        "explicit_differs": (good, DataConfig(reset_attention_mask=True, eod_token_id=5), "remove data.eod_token_id"),
        "bare_prefix": (str(tmp_path / "bare"), on, "set data.eod_token_id"),
    }
    for name, (path, d, fix) in cases.items():
        with pytest.raises(UserError) as e:
            resolve_eod(d, [path], 258)
        assert fix in str(e.value) and "\n" not in str(e.value), name
    other = _manifest(tmp_path / "other", eos_id=7, tokenizer={"special_tokens": {"</s>": 7}})
    with pytest.raises(UserError, match="different EOD ids"):
        resolve_eod(on, [good, other], 258)
    with pytest.raises(UserError, match="outside the vocabulary"):
        resolve_eod(DataConfig(reset_attention_mask=True, eod_token_id=300), [str(tmp_path / "bare")], 258)
    assert resolve_eod(DataConfig(reset_attention_mask=True, eod_token_id=9), [str(tmp_path / "bare")], 258) == 9
