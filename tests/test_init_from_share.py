"""checkpoint.init_from reads each rank's share (issue 20): a rank building its piece of the model
from one of our checkpoints or from an import-hf directory reads only the blocks of each tensor
its piece holds, not the whole model.

In this process: the readers of `pretrain.interop.stored` give every block of a tensor saved as
tensor-parallel pieces or ZeRO partitions (against the full tensor), and `WeightsSource.read_piece`
fills any range of any tensor-parallel piece like `spec.local_piece` of the full tensor; the
chunk digests of an init directory catch a flipped byte.

Spawned: a checkpoint saved at TP=2 (ZeRO-0) and an import-hf directory are each built into a
ZeRO-3 DP=2 model in 2 gloo processes (`build_model(source=...)`, as the trainer does); each
rank counts the bytes it reads (`stored.bytes_read`): at most half of every tensor plus the
partial rows at its partition's two ends, and the partitions put together are the weights.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch

from pretrain.config.schema import ModelConfig
from pretrain.errors import UserError
from pretrain.interop import stored
from pretrain.interop.init_weights import WeightsSource, init_dir_of, verify_weights, weights_source, write_init
from pretrain.model import params
from pretrain.model.gpt import GPT
from pretrain.parallel import spec
from tests.dist_util import run_distributed

LLAMA = ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, seq_len=16, position="rope", norm="rmsnorm",
                    mlp="swiglu", d_ff=96, bias=False, tie_embeddings=False)
GPT2 = ModelConfig(n_layer=2, d_model=48, n_head=4, seq_len=13)


def _ranges(n: int) -> list[tuple[int, int]]:
    out = [(0, n), (3, n - 5), (n // 2, n // 2 + 1)]
    for dp in (2, 3, 4):  # ZeRO-3 partitions of the piece
        per = -(-n // dp)
        out += [(min(k * per, n), min((k + 1) * per, n)) for k in range(dp)]
    return [(a, b) for a, b in out if a < b]


# ============================================================================ in this process
@pytest.mark.parametrize("m, tps", [(LLAMA, (1, 2)), (GPT2, (1, 2, 4))], ids=["llama-gqa", "gpt2"])
def test_blocks_of_tensor_parallel_pieces_and_flat_partitions_are_blocks_of_the_full_tensor(m, tps, tmp_path):
    """`TensorParallel` over the pieces of `spec.local_piece` (qkv regrouped, column and row
    splits, vocabulary rows), each piece stored as ZeRO-style flat partitions of two torch
    files (`Flat`), gives every block of the full tensor; so `read_piece` gives every range of
    every piece."""
    full_sd = GPT(m, 64, seed=3).state_dict()
    files = stored.Files()
    for tp in tps:
        pieces, flats = {}, ({}, {})  # two "ranks" of flat partitions, the second one padded
        for name, full in full_sd.items():
            parts = []
            for r in range(tp):
                piece = spec.local_piece(name, full, m, tp, r).reshape(-1)
                half = -(-piece.numel() // 2)
                key = f"{name}/{r}"
                flats[0][key], flats[1][key] = piece[:half].clone(), torch.cat([piece[half:], torch.zeros(5)])
                segments = [(tmp_path / f"{tp}_0.pt", (key,), 0, half),
                            (tmp_path / f"{tp}_1.pt", (key,), 0, piece.numel() - half)]
                parts.append(stored.Flat(files, spec.local_piece(name, full, m, tp, r).shape, segments))
            pieces[name] = stored.TensorParallel(name, parts, m)
        for i in (0, 1):
            torch.save(flats[i], tmp_path / f"{tp}_{i}.pt")
        for name, full in full_sd.items():
            t, (R, C) = pieces[name], params.matrix_shape(full.shape)
            assert t.shape == tuple(full.shape), name
            matrix = full.reshape(R, C)
            for rows in [(0, R), (1, R - 1), (R // 3, R // 2 + 1)]:
                for cols in [(0, C), (C // 4, C - C // 4)]:
                    if rows[0] < rows[1] and cols[0] < cols[1]:
                        got = t.block(rows, cols)
                        assert torch.equal(got, matrix[rows[0]:rows[1], cols[0]:cols[1]]), (tp, name, rows, cols)
        source = WeightsSource(pieces, 64, "test")
        for name, full in full_sd.items():
            for r in range(tp):
                want = spec.local_piece(name, full, m, tp, r).reshape(-1)
                for a, b in _ranges(want.numel()):
                    out = torch.full((b - a,), float("nan"))
                    source.read_piece(name, tuple(full.shape), m, tp, r, a, out)
                    assert torch.equal(out, want[a:b]), (tp, r, name, a, b)


def test_vocabulary_rows_are_padded_and_positions_cut():
    """The source's rows beyond its vocabulary are zero in the run's padded vocabulary; learned
    positions beyond model.seq_len are not read; any other shape is refused, naming the tensor."""
    sd = GPT(GPT2, 50, seed=1).state_dict()
    src = weights_source(sd, 64, "test")
    wte = src("embed.wte.weight", (64, 48))
    assert torch.equal(wte[:50], sd["embed.wte.weight"]) and not wte[50:].any()
    block = src.read_block("embed.wte.weight", (64, 48), (40, 60), (0, 48))
    assert torch.equal(block[:10], sd["embed.wte.weight"][40:]) and not block[10:].any()
    assert torch.equal(src("embed.wpe.weight", (10, 48)), sd["embed.wpe.weight"][:10])
    with pytest.raises(UserError, match="blocks.0.attn.qkv.weight has shape"):
        src("blocks.0.attn.qkv.weight", (144, 40))
    with pytest.raises(UserError, match="lack blocks.9"):
        src("blocks.9.ln_1.weight", (48,))


def test_init_chunks_catch_a_flipped_byte(tmp_path, monkeypatch):
    """write_init records the file's digest (what read_init checks) and one per chunk, which
    `verify_weights` checks (each rank its share of them); a flipped byte fails its chunk."""
    from pretrain import digest
    from pretrain.interop import init_weights

    monkeypatch.setattr(init_weights, "CHUNK", 4096)
    sd = GPT(GPT2, 50, seed=1).state_dict()
    d = write_init(tmp_path / "init", sd, {"model": {}, "vocab_rows": 50})
    meta = init_weights._read_meta(d)
    path = d / init_weights.WEIGHTS
    assert meta[digest.CHECKPOINT] == digest.file_digest(path)
    assert len(meta["chunks"][digest.CHECKPOINT]) == -(-path.stat().st_size // 4096) > 10
    verify_weights(d, meta)
    data = bytearray(path.read_bytes())
    data[5 * 4096 + 7] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"fails its xxh3_128 check \(bytes 20480 to 24576\)"):
        verify_weights(d, meta)


# ============================================================================ spawned: ZeRO-3 DP=2
MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2", "model.d_ff=160",
         "model.seq_len=32", "model.vocab_size=301", "model.position=rope", "model.norm=rmsnorm",
         "model.mlp=swiglu", "model.bias=false", "model.tie_embeddings=false"]
BASE = ["data.synthetic=true", "train.device=cpu", "train.precision=fp32", "logging.tensorboard=false",
        "model.dropout=0.0", *MODEL]


def _cfg(overrides):
    """The built model: 301 rows padded to 384 (the TP=2 source pads to a multiple of 64 x 2: the same)."""
    from pretrain.config.load import load_config

    return load_config(None, BASE + ["model.vocab_multiple=128"] + overrides)


def _build(source_of, world):
    """This rank's ZeRO-3 DP=2 model built from `source_of(cfg, layout)`: the bytes it read and
    its partition (range of the flat parameter) of each parameter."""
    from pretrain import dsadapter
    from pretrain.config.validate import resolve
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology

    cfg = _cfg(["parallel.zero_stage=3"])
    layout = resolve(cfg, world, None, cuda_available=False)
    source = source_of(cfg, layout)
    before = stored.bytes_read()
    model = build_model(cfg, layout, Topology(layout), torch.device("cpu"), source=source)
    read = stored.bytes_read() - before
    held = {}
    for name, p in model.named_parameters():
        t, start, stop = dsadapter.zero3_partition(p)
        held[spec.plain_name(name, cfg.model.n_layer)] = (tuple(dsadapter.param_full_shape(p)), start,
                                                          t[:stop - start].clone())
    return {"read": read, "held": held, "padded": layout.padded_vocab_size}


def _body(rank, world_size, ckpt, init):
    import deepspeed

    from pretrain import dsadapter
    from pretrain.checkpoint import store
    from pretrain.interop.init_weights import checkpoint_source, init_source

    os.environ.setdefault("LOCAL_RANK", "0")
    dsadapter.skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    tag = store.resolve_tag_dir(str(ckpt))
    cases = {"checkpoint-tp2": lambda cfg, lay: checkpoint_source(tag, lay.padded_vocab_size, "test"),
             "import": lambda cfg, lay: init_source(str(init), cfg, lay, log=lambda s: None)}
    report = {}
    for case, source_of in cases.items():
        try:
            report[case] = _build(source_of, world_size)
        except Exception:  # noqa: BLE001 - reported per case by the parent
            report[case] = traceback.format_exc()
    return report


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A checkpoint trained 1 step at TP=2 (ZeRO-0), its weights, and an import-hf directory of them."""
    from pretrain.checkpoint import store
    from pretrain.interop.ds_reader import load_model_weights
    from train_util import check, run_train

    root = tmp_path_factory.mktemp("init_from_share")
    check(run_train(root / "tp2", [*BASE, "model.vocab_multiple=64", "parallel.tensor=2", "parallel.zero_stage=0",
                                   "train.max_steps=1",
                                   "checkpoint.interval=1", "schedule.warmup_steps=0"], nproc=2))
    weights = load_model_weights(store.resolve_tag_dir(str(root / "tp2")))
    cfg = _cfg([])
    from dataclasses import asdict

    sd = {k: (v[:301] if spec.rule_of(k).vocab else v) for k, v in weights.items()}  # the real vocabulary rows
    init = write_init(root / "init", sd, {"model": asdict(cfg.model), "vocab_rows": 301, "architecture": "test",
                                          "source": "test"})
    return root / "tp2", init_dir_of(init), weights


@pytest.fixture(scope="module")
def built(sources):
    ckpt, init, _ = sources
    out = {}
    for rank, rep in enumerate(run_distributed(_body, 2, ckpt, init, timeout=300)):
        for case, res in rep.items():
            assert isinstance(res, dict), f"{case}, rank {rank}:\n{res}"
            out.setdefault(case, []).append(res)
    return out


def _joined(ranks) -> dict:
    parts = {}
    for r in ranks:
        for name, (shape, start, t) in r["held"].items():
            parts.setdefault(name, (shape, []))[1].append((start, t))
    return {n: torch.cat([t for _, t in sorted(p)]).view(shape) for n, (shape, p) in parts.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["checkpoint-tp2", "import"])
def test_zero3_ranks_build_the_source_weights(built, sources, case):
    _, _, weights = sources
    got = _joined(built[case])
    assert got.keys() == weights.keys()
    for name, t in weights.items():
        if case == "import" and spec.rule_of(name).vocab:  # imported: the real rows, then zero padding
            assert torch.equal(got[name][:301], t[:301]) and not got[name][301:].any(), name
        else:
            assert torch.equal(got[name], t), (case, name)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["checkpoint-tp2", "import"])
def test_each_rank_reads_about_its_share(built, sources, case):
    """Each rank reads its half of every tensor plus at most the partial rows at its partition's
    two ends (from an import, the zero padding rows of the vocabulary are not read: the first
    rank's half holds more of the stored rows); before, every rank read every byte."""
    _, _, weights = sources
    total, share, slack = 0, [0, 0], 0
    for name, t in weights.items():
        rows, cols = params.matrix_shape(t.shape)
        stored_rows = 301 if case == "import" and spec.rule_of(name).vocab else rows
        total += 4 * stored_rows * cols
        for r in (0, 1):  # rank r's partition: rows [r * rows / 2, (r + 1) * rows / 2) of which it reads the stored
            share[r] += 4 * cols * max(0, min((r + 1) * rows / 2, stored_rows) - r * rows / 2)
        slack += 2 * 4 * cols
    read = [r["read"] for r in built[case]]
    assert sum(read) >= total, (read, total)
    for r, n in enumerate(read):
        assert n <= share[r] + slack, (case, read, share, slack, total)
    assert max(share) + slack < 0.6 * total, "the model is too small for the check to tell a share from the whole"
