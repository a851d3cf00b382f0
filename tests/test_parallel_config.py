"""Parallel layouts before any process exists: validation, rank order, the plan's layout section."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.config import load_config, resolve
from pretrain.errors import UserError
from pretrain.parallel.topology import coords_table
from pretrain.parallel.partition import stage_blocks
from pretrain.plan.report import format_plan

BASE = ["data.synthetic=true", "model.vocab_size=1000", "model.n_layer=4", "model.d_model=64", "model.n_head=4",
        "model.seq_len=32", "train.micro_batch_size=2", "train.precision=fp32", "train.device=cpu",
        "train.max_steps=10"]

# (overrides, world size, text the one-line message must contain)
INCOMPATIBLE = [
    (["parallel.pipeline=2", "parallel.zero_stage=2"], 2, "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"),
    (["parallel.pipeline=2", "parallel.zero_stage=3", "parallel.tensor=2"], 4,
     "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"),
    (["parallel.pipeline=2", "parallel.zero_stage=1", "parallel.offload_optimizer=true"], 2,
     "parallel.offload_optimizer needs parallel.zero_stage 2 or 3"),
    (["parallel.tensor=8", "model.d_model=64", "model.n_head=4"], 8, "model.n_head (4) must be divisible by parallel.tensor (8)"),
    (["parallel.tensor=4", "model.n_kv_head=2"], 4, "model.n_kv_head (2) must be divisible by parallel.tensor (4)"),
    (["parallel.tensor=2", "model.n_kv_head=1"], 2, "model.n_kv_head (1) must be divisible by parallel.tensor (2)"),
    (["parallel.tensor=2", "model.d_ff=129"], 2, "the MLP width (129, model.d_ff) must be divisible by parallel.tensor (2)"),
    (["parallel.pipeline=8", "model.n_layer=4"], 8, "model.n_layer (4) must be >= parallel.pipeline (8)"),
    (["parallel.tensor=2", "parallel.pipeline=2"], 6, "the world size (6) is not divisible by parallel.tensor (2) x "
                                                      "parallel.pipeline (2) = 4"),
    (["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=2"], 4,
     "parallel.data (2) x parallel.tensor (2) x parallel.pipeline (2) = 8, but the world size is 4"),
    (["parallel.tensor=3"], 4, "the world size (4) is not divisible by parallel.tensor (3)"),
    (["parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel needs parallel.tensor > 1"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "model.seq_len=33"], 2,
     "parallel.sequence_parallel splits model.seq_len (33) over parallel.tensor (2)"),
    (["parallel.pipeline=2", "train.global_batch_size=6"], 4,
     "train.global_batch_size (6) must be a multiple of train.micro_batch_size (2) x data-parallel size (2) = 4"),
    (["parallel.pipeline_partition=type:Block", "parallel.pipeline=2"], 2, "parallel.pipeline_partition must be one of"),
]


@pytest.mark.parametrize("overrides, world, needle", INCOMPATIBLE, ids=[" ".join(c[0]) for c in INCOMPATIBLE])
def test_incompatible_layout_rejected(overrides, world, needle):
    cfg = load_config(None, BASE + overrides)
    with pytest.raises(UserError) as e:
        resolve(cfg, world, None, cuda_available=False)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_rejections_happen_before_torch_or_a_process_group_exists():
    """resolve() runs first on every rank: no torch import, so no process group can exist yet."""
    code = (
        "import sys\n"
        "from pretrain.config import load_config, resolve\n"
        "from pretrain.errors import UserError\n"
        f"cases = {INCOMPATIBLE!r}\n"
        f"base = {BASE!r}\n"
        "for overrides, world, needle in cases:\n"
        "    try:\n"
        "        resolve(load_config(None, base + overrides), world, None, cuda_available=False)\n"
        "    except UserError as e:\n"
        "        assert needle in str(e), e\n"
        "    else:\n"
        "        raise SystemExit(f'accepted: {overrides}')\n"
        "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'torch imported'\n"
        "print('ok', len(cases))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr


@pytest.mark.parametrize("pp, dp, tp", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2), (2, 2, 2), (3, 2, 4)])
def test_layout_rank_order_is_deepspeeds(pp, dp, tp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world = pp * dp * tp
    cfg = load_config(None, BASE + [f"model.n_layer={max(4, pp)}", f"parallel.pipeline={pp}",
                                    f"parallel.tensor={tp}", "model.n_head=4" if tp < 4 else "model.n_head=8"])
    lay = resolve(cfg, world, None, cuda_available=False)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    table = coords_table(lay)
    assert [r for r, *_ in table] == list(range(world))
    for rank, p, d, t in table:
        c = topo.get_coord(rank)
        assert (c.pipe, c.data, c.model) == (p, d, t)
        assert lay.rank(p, d, t) == rank
    # tensor-parallel peers are adjacent ranks and share the data-parallel index (same batches)
    for rank, p, d, t in table:
        if t:
            assert table[rank - 1][1:3] == (p, d)


def test_plan_shows_ranks_and_stage_layers():
    cfg = load_config(None, BASE + ["model.n_layer=6", "parallel.pipeline=2", "parallel.tensor=2",
                                    "train.global_batch_size=16"])
    lay = resolve(cfg, 8, None, cuda_available=False)
    plan = format_plan(cfg, lay)
    assert "world 8 = data 2 x tensor 2 x pipeline 2" in plan
    for p, d in ((0, 0), (0, 1), (1, 0), (1, 1)):
        first = lay.rank(p, d, 0)
        assert f"pp {p}, dp {d}: ranks {first}-{first + 1} (tp 0-1)" in plan
    blocks = stage_blocks(cfg, lay.padded_vocab_size, 2)
    assert f"stage 0: {len(blocks[0])} blocks ({blocks[0].start}-{blocks[0].stop - 1}) + embedding" in plan
    assert f"stage 1: {len(blocks[1])} blocks ({blocks[1].start}-{blocks[1].stop - 1}) + head" in plan
    assert "1F1B schedule: 4 micro-batches per step" in plan
    assert "tied embeddings: stage 1 holds a copy of the token table" in plan


def test_plan_without_tensor_parallelism_lists_stage_ranks():
    cfg = load_config(None, BASE + ["parallel.pipeline=2", "train.global_batch_size=4"])
    lay = resolve(cfg, 4, None, cuda_available=False)
    plan = format_plan(cfg, lay)
    assert "pp 0: ranks 0-1 = dp 0-1" in plan and "pp 1: ranks 2-3 = dp 0-1" in plan
    assert "fewer micro-batches than stages" in plan  # 1 micro-batch per step, 2 stages
