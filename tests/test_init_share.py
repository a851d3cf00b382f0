"""Initial weights drawn per piece (issue 20): a rank draws about its own share of the initial
values (its tensor-parallel slice, its ZeRO-3 partition), and every layout still starts from
the same weights, bitwise: ZeRO-0 in one process, ZeRO-3 DP=2 (fp32 and bf16) and DP=4, TP=2
(alone and with ZeRO-3 DP=2) and PP=2; imported weights fill ZeRO-3 partitions too.

The piece geometry is checked in this process (`spec.local_blocks` against slices of the full
tensor); the layouts in spawned gloo groups (one of 2 processes, one of 4), each rank
counting the values it draws while `build_model` runs (`params.values_drawn`) and returning
what it holds, which is put back together here and compared with the plain model.
"""
from __future__ import annotations

import inspect
import os
import traceback

import pytest
import torch

from pretrain.config.schema import ModelConfig
from pretrain.model import params
from pretrain.model.gpt import GPT
from pretrain.parallel import spec
from tests.dist_util import run_distributed

SEED = 11
VARIANTS = {
    "gpt2": (ModelConfig(n_layer=2, d_model=48, n_head=4, seq_len=13), [1, 2, 4]),
    "llama-gqa-untied": (ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2, seq_len=16, position="rope",
                                     norm="rmsnorm", mlp="swiglu", d_ff=96, bias=False, tie_embeddings=False),
                         [1, 2]),
}


def _drawn_piece(name, full, m, seed, tp, tp_rank, start, stop):
    out = torch.full((stop - start,), float("nan"))
    spec.draw_piece(name, tuple(full), m, seed, tp, tp_rank, start, out)
    return out


# ============================================================================ in this process
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pieces_drawn_alone_are_slices_of_the_full_value(variant, monkeypatch):
    """Any range of any tensor-parallel piece, drawn by itself, equals that range of the piece
    of the full value (small tiles, so that ranges start and end inside tiles)."""
    monkeypatch.setattr(params, "TILE", 40)
    m, tps = VARIANTS[variant]
    V = 160
    full_sd = GPT(m, V, seed=SEED).state_dict()
    for name, full in full_sd.items():
        for tp in tps:
            for r in range(tp):
                want = spec.local_piece(name, full, m, tp, r).reshape(-1)
                n = want.numel()
                ranges = [(0, n), (5, n - 7), (n // 2, n // 2 + 1), (n // 2,) * 2]
                for dp in (2, 3, 4, 7):  # ZeRO-3 partitions of the piece
                    per = -(-n // dp)
                    ranges += [(min(k * per, n), min((k + 1) * per, n)) for k in range(dp)]
                for start, stop in ranges:
                    got = _drawn_piece(name, full.shape, m, SEED, tp, r, start, stop)
                    assert torch.equal(got, want[start:stop]), (name, tp, r, start, stop)


def test_a_piece_draws_about_its_share(monkeypatch):
    """Row and column slices, and ranges of them, draw their own values plus at most the
    partial tile rows at their two ends; 'zeros' and 'ones' draw nothing."""
    monkeypatch.setattr(params, "TILE", 256)
    m = ModelConfig(n_layer=2, d_model=64, n_head=4, seq_len=16, d_ff=512)
    full = {"blocks.0.mlp.fc.weight": (512, 64), "blocks.0.mlp.proj.weight": (64, 512),
            "embed.wte.weight": (1024, 64)}
    for name, shape in full.items():
        th, tw = params.tile_shape(name, shape)
        for tp in (1, 2, 4, 8):
            width = shape[1] // tp if spec.rule_of(name).tp_dim == 1 else shape[1]
            for r in range(tp):
                n = shape[0] * shape[1] // tp
                for start, stop in [(0, n), (n // 4, n // 2), (3, n - 3)]:
                    before = params.values_drawn()
                    _drawn_piece(name, shape, m, SEED, tp, r, start, stop)
                    drawn = params.values_drawn() - before
                    assert stop - start <= drawn <= stop - start + 2 * th * max(width, tw), \
                        (name, tp, r, start, stop, drawn)
    before = params.values_drawn()
    for name, value in (("blocks.0.ln_1.weight", 1.0), ("blocks.0.attn.qkv.bias", 0.0), ("head.ln_f.bias", 0.0)):
        assert torch.equal(params.initial_value(name, (64,), m, SEED), torch.full((64,), value)), name
    assert params.values_drawn() == before


def test_values_do_not_depend_on_the_number_of_rows():
    """The padded vocabulary differs between layouts (a multiple of vocab_multiple x tp): the
    real rows keep their values."""
    m = VARIANTS["gpt2"][0]
    a = params.initial_value("embed.wte.weight", (1000, 48), m, SEED)
    b = params.initial_value("embed.wte.weight", (1003, 48), m, SEED)
    assert torch.equal(a, b[:1000])


def test_deepspeed_partitions_through_the_method_we_override():
    """dsadapter.partition_zero3 leaves DeepSpeed's broadcast out by overriding
    `Init._zero_init_param`, which `Init(module=...)` calls for every parameter."""
    import deepspeed

    from pretrain import dsadapter

    init = deepspeed.zero.Init
    convert = inspect.getsource(init._convert_to_zero_parameters)
    ours = inspect.getsource(init._zero_init_param)
    assert "self._zero_init_param(" in convert, "DeepSpeed: Init(module=...) no longer calls _zero_init_param " \
        "(pretrain.dsadapter.partition_zero3)"
    assert "broadcast" in ours and "self._convert_to_deepspeed_param(param)" in ours and "param.partition()" in ours, \
        "DeepSpeed: Init._zero_init_param changed (pretrain.dsadapter.partition_zero3)"
    assert issubclass(dsadapter._partitioning_init(), init)


# ============================================================================ spawned layouts
MODEL = ["model.n_layer=2", "model.d_model=512", "model.n_head=8", "model.seq_len=65",
         "model.vocab_size=2001", "model.vocab_multiple=1"]  # odd rows: partitions end inside rows and tiles
BASE = ["data.synthetic=true", "train.device=cpu", "train.precision=fp32", *MODEL]
CASES = {
    2: {"zero3-dp2": ["parallel.zero_stage=3"], "tp2": ["parallel.tensor=2", "parallel.zero_stage=0"],
        "pp2": ["parallel.pipeline=2", "parallel.zero_stage=0"], "zero3-dp2-imported": ["parallel.zero_stage=3"],
        "zero3-dp2-bf16": ["parallel.zero_stage=3", "train.precision=bf16"]},
    4: {"zero3-dp4": ["parallel.zero_stage=3"], "zero3-dp2-tp2": ["parallel.zero_stage=3", "parallel.tensor=2"]},
}


def _cfg(overrides):
    from pretrain.config.load import load_config

    return load_config(None, BASE + overrides)


def _imported(name, shape):
    """Stand-in imported weights (`build_model(source=...)`): a function of (name, shape)."""
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) / 1000 + len(name)


def _build(cfg, world, source=None):
    """This rank's model for `cfg`: what it drew, where it sits, and what it holds by plain
    name (ZeRO-3: its partition's range of the flat tensor-parallel piece)."""
    from pretrain import dsadapter
    from pretrain.config.validate import resolve
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology

    layout = resolve(cfg, world, None, cuda_available=False)
    topo = Topology(layout)
    torch.manual_seed(SEED)
    before = params.values_drawn()
    model = build_model(cfg, layout, topo, torch.device("cpu"), source=source)
    drawn = params.values_drawn() - before
    held = {}
    for name, p in model.named_parameters():
        plain = spec.plain_name(name, cfg.model.n_layer)
        part = dsadapter.zero3_partition(p)
        if part is None:
            held[plain] = p.detach().clone()
        else:
            t, start, stop = part
            held[plain] = (tuple(dsadapter.param_full_shape(p)), start, t[:stop - start].clone())
    return {"drawn": drawn, "pp": topo.pp_rank, "dp": topo.dp_rank, "tp": topo.tp_rank, "held": held}


def _body(rank, world_size):
    import deepspeed

    from pretrain import dsadapter

    os.environ.setdefault("LOCAL_RANK", "0")
    dsadapter.skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    report = {}
    for case, overrides in CASES[world_size].items():
        try:
            report[case] = _build(_cfg(overrides), world_size, _imported if "imported" in case else None)
        except Exception:  # noqa: BLE001 - reported per case by the parent
            report[case] = traceback.format_exc()
    return report


@pytest.fixture(scope="module")
def built():
    out = {}
    for world in CASES:
        for rank, rep in enumerate(run_distributed(_body, world, timeout=300)):
            for case, res in rep.items():
                assert isinstance(res, dict), f"{case}, rank {rank}:\n{res}"
                out.setdefault(case, []).append(res)
    return out


@pytest.fixture(scope="module")
def plain():
    """ZeRO-0 in one process: the plain GPT under the same seed."""
    cfg = _cfg([])
    torch.manual_seed(SEED)
    return cfg, GPT(cfg.model, cfg.model.vocab_size).state_dict()


def _whole(ranks, m):
    """One plain state dict from every rank's holdings: ZeRO-3 ranges joined per
    tensor-parallel rank, the tensor-parallel pieces merged (`spec.merge_state`)."""
    per_tp = {}
    for r in ranks:
        mine = per_tp.setdefault(r["tp"], {})
        for name, value in r["held"].items():
            if torch.is_tensor(value):
                mine[name] = value
            else:
                mine.setdefault(name, []).append(value)
    for mine in per_tp.values():
        for name, value in mine.items():
            if isinstance(value, list):
                shape = value[0][0]
                flat = torch.cat([t for _, _, t in sorted(value, key=lambda v: v[1])])
                assert flat.numel() == torch.Size(shape).numel(), name
                mine[name] = flat.view(shape)
    return spec.merge_state([per_tp[t] for t in sorted(per_tp)], m)


@pytest.mark.parametrize("case", ["zero3-dp2", "zero3-dp4", "tp2", "zero3-dp2-tp2", "pp2", "zero3-dp2-bf16"])
def test_every_layout_starts_from_the_plain_weights(built, plain, case):
    """(bf16: ZeRO-3 keeps its parameters in the training precision, drawn in fp32 and rounded.)"""
    cfg, ref = plain
    got = _whole(built[case], cfg.model)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        rows = got[name][:t.shape[0]] if spec.rule_of(name).vocab else got[name]  # TP=2 pads the vocabulary
        assert torch.equal(rows, t.to(rows.dtype)), (case, name)
        assert rows.dtype == (torch.bfloat16 if "bf16" in case else torch.float32), (case, name)


@pytest.mark.parametrize("case", ["zero3-dp4", "tp2", "zero3-dp2-tp2"])
def test_each_rank_draws_about_its_share(built, plain, case):
    """A rank draws its share of the drawn values -- of a tensor split by tensor parallelism
    1/tp, under ZeRO-3 of every tensor 1/(dp x tp) -- plus at most two tile rows per
    parameter; together the ranks draw every value. Before, every rank drew every value."""
    cfg, ref = plain
    tp = 2 if "tp2" in case else 1
    share = slack = total = 0
    for name, t in ref.items():
        rule = spec.rule_of(name)
        if rule.init in ("zeros", "ones"):
            continue
        rows, cols = params.matrix_shape(t.shape)
        if rule.vocab:
            rows = -(-rows // tp) * tp  # padded to a multiple of tp
        total += rows * cols
        if case.startswith("zero3"):
            share += rows * cols / 4
        else:
            share += rows * cols / (tp if rule.tp_dim is not None else 1)
        slack += 2 * params.tile_shape(name, t.shape)[0] * cols
    drawn = [r["drawn"] for r in built[case]]
    assert sum(drawn) >= total, (case, drawn, total)
    for d in drawn:
        assert d <= share + slack, (case, drawn, share, slack, total)
    assert share + slack < 0.8 * total, "the model is too small for the check to tell a share from the whole"


def test_imported_weights_fill_the_zero3_partitions(built, plain):
    """`source=` (checkpoint.init_from, imported weights) under ZeRO-3: each rank's partition
    holds its range of the source's tensors, and nothing is drawn."""
    cfg, ref = plain
    got = _whole(built["zero3-dp2-imported"], cfg.model)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(got[name], _imported(name, t.shape)), name
    assert [r["drawn"] for r in built["zero3-dp2-imported"]] == [0, 0]
