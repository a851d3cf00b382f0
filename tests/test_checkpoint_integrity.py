"""Every checkpoint byte that is loaded is verified (issue: a flipped byte is caught, never trained on).

One run, DP=2, ZeRO-1, fp32, committed at steps 3 and 6. A copy of it gets one byte flipped in the
newest checkpoint at one of six places; then:
- resume warns naming the file, falls back to step 3, and the losses of steps 4-6 equal the
  uninterrupted run's, bitwise;
- generate, export-hf, reshard and init_from refuse with one line naming the file (exit 2, no
  traceback).
A file of random bytes (or a foreign torch file) whose manifest matches gets the same treatment,
and `checkpoint.verify=sizes` (the opt-out) loads a flipped tensor byte without a word.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fault_util import one_error_line, run_split, train_cmd
from pretrain import digest
from pretrain.generate import main as generate_main
from pretrain.interop.cli import main as convert_main
from pretrain.interop.inspect import main as inspect_main
from train_util import check, losses, run_train

RUN = ["parallel.zero_stage=1", "logging.tensorboard=false"]
STEP6 = Path("checkpoints") / "step_00000006"
MODEL = "mp_rank_00_model_states.pt"
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _zip_directory(path: Path) -> int:
    """An offset inside the zip archive's central directory (a record's file-name field)."""
    data = path.read_bytes()
    return data.rindex(b"PK\x01\x02") + 46  # the last central header's name, past its fixed 46 bytes


# (name, file in step 6, where the byte is flipped)
PLACES = [
    ("zip header", MODEL, lambda p: 8),  # the first local header's compression method
    ("zip directory", MODEL, _zip_directory),
    ("model states", MODEL, lambda p: p.stat().st_size // 2),
    ("optimizer partition of rank 1", OPTIM1, lambda p: p.stat().st_size // 2),
    ("state.json", "state.json", lambda p: p.stat().st_size // 2),
    ("RNG file", "rng_00001.json", lambda p: p.stat().st_size // 2),
]
IDS = [p[0] for p in PLACES]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """The run (committed at steps 3 and 6) and its losses, never touched by the tests."""
    out = tmp_path_factory.mktemp("six") / "run"
    check(run_train(out, [*RUN, "train.max_steps=6", "checkpoint.keep_last=3"], nproc=2))
    return out, losses(out)


def _damaged(six, tmp_path, place) -> tuple[Path, Path]:
    """A copy of the run with one byte of step 6 flipped at `place`; (run, flipped file)."""
    _, name, where = place
    run = shutil.copytree(six[0], tmp_path / "run")
    path = run / STEP6 / name
    _flip(path, where(path))
    return run, path


def _rewrite(run: Path, name: str, data: bytes) -> Path:
    """Replace file `name` of step 6 by `data` and record its digest: the manifest matches."""
    path = run / STEP6 / name
    path.write_bytes(data)
    manifest = json.loads((run / STEP6 / "manifest.json").read_text())
    manifest["files"][name] = digest.file_entry(path)
    (run / STEP6 / "manifest.json").write_text(json.dumps(manifest))
    return path


def _resume_falls_back(run: Path, bad: Path, want: dict) -> None:
    log = check(run_train(run, [*RUN, "train.max_steps=6"], nproc=2))
    warning = next(ln for ln in log.splitlines() if "warning: skipping checkpoint" in ln)
    assert str(run / STEP6) in warning and bad.name in warning, warning
    assert f"resumed from {run / 'checkpoints' / 'step_00000003'} at step 3" in log
    assert "Traceback" not in log
    got = losses(run)
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]  # bitwise: == on floats


@pytest.mark.slow
@pytest.mark.parametrize("place", PLACES, ids=IDS)
def test_resume_skips_a_flipped_byte_and_matches_the_uninterrupted_run(six, tmp_path, place):
    run, bad = _damaged(six, tmp_path, place)
    _resume_falls_back(run, bad, six[1])


def _commands(run: Path, tmp_path: Path) -> dict:
    """Each loading command on `run`, in-process: name -> a call returning its exit status."""
    return {
        "generate": lambda: generate_main(["--checkpoint", str(run), "--prompt", "a", "--tokenizer", "byte",
                                           "--max-new-tokens", "2"]),
        "export-hf": lambda: convert_main(["export-hf", "--run", str(run), "--out", str(tmp_path / "hf"),
                                           "--no-tokenizer"]),
        "reshard": lambda: convert_main(["reshard", "--run", str(run)]),
        "inspect": lambda: inspect_main([str(run)]),
    }


def _refuses(call, capfd, bad: Path) -> str:
    capfd.readouterr()
    rc = call()
    err = capfd.readouterr().err
    assert rc == 2, err[-2000:]
    return one_error_line(err, bad.name)


def _init_from_refuses(run: Path, tmp_path: Path, bad: Path) -> str:
    proc = run_split(train_cmd(tmp_path / "new", [*RUN, f"checkpoint.init_from={run}", "train.max_steps=2"]))
    assert proc.returncode == 2, proc.stderr[-3000:]
    return one_error_line(proc.stderr, bad.name)


@pytest.mark.slow
@pytest.mark.parametrize("place", PLACES, ids=IDS)
def test_commands_refuse_a_flipped_byte_with_one_line(six, tmp_path, capfd, place):
    run, bad = _damaged(six, tmp_path, place)
    for name, call in _commands(run, tmp_path).items():
        if name != "inspect":  # inspect reports, below
            _refuses(call, capfd, bad)
    _init_from_refuses(run, tmp_path, bad)
    capfd.readouterr()
    assert inspect_main([str(run)]) == 1  # inspect reports the damage (exit 1) instead of refusing
    assert bad.name in capfd.readouterr().out


@pytest.mark.slow
def test_the_intact_run_passes_every_command(six, tmp_path, capfd):
    """The control for the refusals above: the same commands succeed on the undamaged copy."""
    run = shutil.copytree(six[0], tmp_path / "run")
    for name, call in _commands(run, tmp_path).items():
        assert call() == 0, (name, capfd.readouterr().err[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("content", ["random bytes", "foreign torch file"])
def test_a_file_whose_manifest_matches_but_is_not_ours_is_one_line_everywhere(six, tmp_path, capfd, content):
    """The digest cannot catch a file written whole by something else with its manifest entry
    updated: the structure check (random bytes) or the load (a torch file of another dict) does."""
    run = shutil.copytree(six[0], tmp_path / "run")
    if content == "random bytes":
        data = os.urandom((run / STEP6 / MODEL).stat().st_size)
    else:
        path = tmp_path / "foreign.pt"
        torch.save({"weights": torch.ones(3)}, path)
        data = path.read_bytes()
    bad = _rewrite(run, MODEL, data)
    for name, call in _commands(run, tmp_path).items():
        if name != "inspect":
            _refuses(call, capfd, bad)
    _init_from_refuses(run, tmp_path, bad)
    _resume_falls_back(run, bad, six[1])


@pytest.mark.slow
def test_verify_sizes_is_an_opt_out_that_loads_a_flipped_byte(six, tmp_path):
    run, _ = _damaged(six, tmp_path, PLACES[2])  # the middle of the model states
    log = check(run_train(run, [*RUN, "train.max_steps=7", "checkpoint.verify=sizes"], nproc=2))
    assert "warning: skipping" not in log and f"resumed from {run / STEP6} at step 6" in log


def test_the_load_hashes_the_bytes_it_reads(tmp_path):
    """Our checkpoint engine (inside DeepSpeed's load) maps each file of the checkpoint and hashes
    it: the state dict comes back whole, with each file's verdict recorded, never raised (a raise
    inside DeepSpeed's load would leave the other ranks in its collectives); `sizes` hashes nothing."""
    from pretrain.checkpoint.read import hashing_reads, reader

    path = tmp_path / "a.pt"
    torch.save({"w": torch.arange(100_000.0)}, path)
    files = {"a.pt": digest.file_entry(path)}
    with hashing_reads(tmp_path, files, hashing=True) as reads:
        assert torch.equal(reader().load(str(path), "cpu")["w"], torch.arange(100_000.0))
        reader().load(str(tmp_path / ".." / tmp_path.name / "a.pt"), "cpu")  # the same file by another path
    assert reads.checked == {"a.pt": None} and reads.problem() is None
    _flip(path, path.stat().st_size // 2)
    with hashing_reads(tmp_path, files, hashing=True) as reads:
        reader().load(str(path), "cpu")
    assert reads.problem() == f"a.pt fails its {digest.CHECKPOINT} check"
    with hashing_reads(tmp_path, files, hashing=False) as reads:
        reader().load(str(path), "cpu")
    assert reads.checked == {}
