"""Resharding: resume a checkpoint in another layout with the optimizer state kept. DP 2 -> 1
through DeepSpeed's universal checkpoint; TP 1 -> 2 -> 1 and PP 1 -> 2 -> 1 through our
consolidated copy; the refusals name the fix. Uses the session's trained "gpt2" run (DP=2,
ZeRO-1, checkpoints at steps 3 and 6; tests/conftest.py).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from interop_util import FAST, RUNS, copy_checkpoint, rewrite_state, step_dir  # noqa: E402
from train_util import check, losses, run_train  # noqa: E402

from pretrain.checkpoint import store  # noqa: E402
from pretrain.config.load import load_config  # noqa: E402
from pretrain.config.validate import resolve  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.interop.cli import main as convert  # noqa: E402
from pretrain.interop.ds_reader import load_model_weights  # noqa: E402


@pytest.mark.slow
def test_reshard_writes_a_universalcopy_checkpoint(trained):
    from pretrain.interop.reshard import check_reshard

    run = trained("gpt2")
    step3 = step_dir(run, 3)
    assert convert(["reshard", "--run", str(run), "--step", "3"]) == 0
    u = step3 / "universal"
    assert store.verify(u) is None and store.verify(step3) is None  # the original is untouched
    saved = store.read_state(step3)["layout"]
    assert json.loads((u / "manifest.json").read_text())["source_layout"] == saved and saved["dp"] == 2
    weights = load_model_weights(step3)
    for name, t in weights.items():  # DeepSpeed's per-parameter files (pickles of our own run)
        fp32 = torch.load(u / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False)
        fp32 = fp32["param"] if isinstance(fp32, dict) else fp32
        assert torch.equal(fp32.reshape(t.shape), t), name
        assert (u / "zero" / name / "exp_avg.pt").is_file() and (u / "zero" / name / "exp_avg_sq.pt").is_file()
    assert convert(["reshard", "--run", str(step3)]) == 0  # idempotent

    assert check_reshard(step3, saved, {**saved, "dp": 1}) == "universal"
    assert check_reshard(step3, saved, {**saved, "dp": 1, "zero_stage": 2}) == "universal"
    with pytest.raises(UserError, match="pretrain-convert reshard"):
        check_reshard(step_dir(run, 6), saved, {**saved, "dp": 1})  # no converted copy of step 6
    with pytest.raises(UserError, match="pretrain-convert reshard"):
        check_reshard(step_dir(run, 6), saved, {**saved, "dp": 1, "tp": 2})
    # what the universal format cannot do goes through our consolidated copy (written alongside)
    assert store.verify(step3 / "consolidated") is None
    for change in ({"tp": 2}, {"pp": 2}, {"zero_stage": 0}, {"zero_stage": 3}):
        assert check_reshard(step3, saved, {**saved, "dp": 1, **change}) == "consolidated", change
    assert not (step3 / "latest_universal").exists()  # DeepSpeed's stray pointer is removed


@pytest.mark.slow
def test_resume_dp2_checkpoint_at_dp1_gives_the_same_losses(trained, bpe_data, tmp_path):
    run = trained("gpt2")
    step3 = step_dir(run, 3)
    assert convert(["reshard", "--run", str(run), "--step", "3"]) == 0
    _, overrides = RUNS["gpt2"]
    out = tmp_path / "dp1"
    log = check(run_train(out, [*overrides, f"data.paths=[{bpe_data}]", f"checkpoint.resume={step3}", *FAST],
                          nproc=1))
    assert "resharded" in log and "at step 3" in log
    old, new = losses(run), losses(out)
    assert sorted(new) == [4, 5, 6]
    for s in (4, 5, 6):  # step 4: the weights; 5 and 6: also Adam's moments and step count
        assert new[s] == pytest.approx(old[s], rel=1e-6, abs=0), s
    a, b = load_model_weights(step_dir(run, 6)), load_model_weights(step_dir(out, 6))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


def _resume_gpt2(bpe_data, out: Path, tag: Path, *extra: str, nproc: int) -> str:
    """The "gpt2" run's config, resumed from `tag` in another layout."""
    _, overrides = RUNS["gpt2"]
    return check(run_train(out, [*overrides, f"data.paths=[{bpe_data}]", f"checkpoint.resume={tag}", *FAST, *extra],
                           nproc=nproc))


def _max_rel_diff(ref: Path, out: Path, steps: list[int]) -> float:
    old, new = losses(ref), losses(out)
    assert sorted(new) == steps, new
    worst = max(abs(new[s] - old[s]) / abs(old[s]) for s in steps)
    assert worst <= 1e-6, {s: (old[s], new[s]) for s in steps}
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pipeline", "tensor"])
def test_resume_in_another_tensor_or_pipeline_degree_gives_the_same_losses(trained, bpe_data, tmp_path, kind):
    """1 -> 2 from the DP=2 ZeRO-1 run's step 3, then 2 -> 1 from the new run's step 4. The losses of
    the resumed steps equal those of the run it resumed within 1e-6 relative: the first one checks
    the weights, the later ones Adam's moments and step count."""
    from safetensors.torch import load_file

    run = trained("gpt2")
    assert convert(["reshard", "--run", str(run), "--step", "3"]) == 0
    if kind == "pipeline":  # ZeRO-1 -> 2 stages with ZeRO-1 -> one process with ZeRO-0
        wide, narrow = ["parallel.pipeline=2"], ["parallel.zero_stage=0"]
    else:  # ZeRO-1 -> TP=2 with ZeRO-2 (64 x 2 keeps the 384 padded rows of 128 x 1) -> TP=1 with ZeRO-1
        wide, narrow = ["parallel.tensor=2", "parallel.zero_stage=2", "model.vocab_multiple=64"], []
    two, one = tmp_path / f"{kind}2", tmp_path / f"{kind}1"
    log = _resume_gpt2(bpe_data, two, step_dir(run, 3), *wide, "checkpoint.interval=1", nproc=2)
    assert "(consolidated)" in log and "resumed from" in log and "at step 3" in log
    worst = [_max_rel_diff(run, two, [4, 5, 6])]

    step4 = step_dir(two, 4)
    assert convert(["reshard", "--run", str(step4)]) == 0
    fp32 = load_file(str(step4 / "consolidated" / "fp32.safetensors"))
    weights = load_model_weights(step4)
    assert sorted(fp32) == sorted(weights) and all(torch.equal(fp32[k], weights[k]) for k in weights)
    _resume_gpt2(bpe_data, one, step4, *narrow, nproc=1)
    worst.append(_max_rel_diff(two, one, [5, 6]))
    print(f"{kind} 1 -> 2, 2 -> 1: max relative loss difference {worst[0]:.2e}, {worst[1]:.2e}")


@pytest.mark.slow
def test_reshard_refusals_name_the_fix(trained, tmp_path, capsys):
    from pretrain.interop.reshard import check_reshard
    from pretrain.run.trainer import Trainer

    run = trained("gpt2")
    saved = store.read_state(step_dir(run, 3))["layout"]
    bf16 = copy_checkpoint(run, 3, tmp_path / "bf16")
    rewrite_state(bf16, lambda t: t.replace('"precision": "fp32"', '"precision": "bf16"'))
    with pytest.raises(UserError, match="fp32 runs only"):
        check_reshard(bf16, saved, {**saved, "dp": 1, "tp": 2})
    rewrite_state(bf16, lambda t: t.replace('"tp": 1', '"tp": 2'))  # as if saved at TP=2
    assert convert(["reshard", "--run", str(bf16)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fp32 runs only" in err and err.count("\n") == 1, err
    assert not (bf16 / "consolidated").exists() and not (bf16 / "universal").exists()
    # TP 2 pads the vocabulary to a multiple of 128 x 2 = 512; the checkpoint has 384 rows
    cfg = load_config(None, ["data.synthetic=true", "model.vocab_size=300", "parallel.tensor=2", "train.device=cpu"])
    trainer = Trainer(cfg, resolve(cfg, 2))
    msg = trainer._shape_mismatch("checkpoint X", {**trainer._model_shape(), "padded_vocab_size": 384})
    assert "padded vocabulary of 384 rows, this run 512" in msg and "set model.vocab_multiple=192" in msg
