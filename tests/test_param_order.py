"""A model whose parameters are registered in another order still resumes exactly: the
checkpoint records each optimizer group's parameter names (state.json), the reader names
ZeRO-0's positional optimizer state by them, and the resume loads the state by name.

The reordered model is the same GPT with each block registering its MLP before its
attention (patched in the launched trainer processes); initial weights depend on the names
only, so both orders train the same model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_util import TINY, check, losses, run_ranks  # noqa: E402

from pretrain.checkpoint import store  # noqa: E402
from pretrain.interop.cli import main as convert  # noqa: E402

REORDER = """
import pretrain.model.layers as layers
_init = layers.Block.__init__
def _mlp_first(self, cfg):
    _init(self, cfg)
    for key in ("ln_1", "attn"):  # registered after ln_2 and mlp: another parameter order
        self._modules[key] = self._modules.pop(key)
layers.Block.__init__ = _mlp_first
from pretrain.train import program
program()
"""


def _train(out: Path, overrides, nproc: int, reorder: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULTS", None)
    prog = ["-c", REORDER] if reorder else ["-m", "pretrain.train"]
    args = [*prog, *TINY, f"train.out_dir={out}", *overrides]
    if nproc > 1:
        return run_ranks([sys.executable, *args], env, nproc, timeout=400)
    return subprocess.run([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("zero, nproc", [(0, 1), (1, 2), (2, 2), (3, 2)])
def test_reordered_model_resumes_exactly(tmp_path, zero, nproc):
    layout = [f"parallel.zero_stage={zero}"]
    check(_train(tmp_path / "ref", layout, nproc))  # 6 steps, checkpoints at 3 and 6
    step3 = tmp_path / "ref" / "checkpoints" / store.tag_for(3)
    groups = json.loads((step3 / "state.json").read_text())["optimizer_groups"]
    assert list(groups) == ["mp_rank_00"] and len(groups["mp_rank_00"]) == 2
    assert groups["mp_rank_00"][0][:2] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"]

    resume = [*layout, f"checkpoint.resume={step3}"]
    refused = _train(tmp_path / "refused", resume, nproc, reorder=True)
    out = refused.stdout
    assert refused.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]  # one line from each rank
    assert "orders the model's parameters differently" in out and "pretrain-convert reshard" in out
    assert convert(["reshard", "--run", str(step3)]) == 0
    out = check(_train(tmp_path / "resumed", resume, nproc, reorder=True))
    assert "(consolidated)" in out
    saved = json.loads((tmp_path / "resumed" / "checkpoints" / store.tag_for(6) / "state.json").read_text())
    assert saved["optimizer_groups"]["mp_rank_00"][0][:2] == ["blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
