"""Known mistakes get one line naming the bad option or path: generation options, a data
directory that is not a prep output."""
from __future__ import annotations

import pytest
import torch

from fault_util import one_error_line
from train_util import TINY


@pytest.mark.parametrize("args,frag", [
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: must be at least 1"),
    (["--top-p", "7"], "--top-p 7.0: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--top-k", "-3"], "--top-k -3"),
    (["--device", "mps"], "--device mps: only cpu and cuda"),
    (["--device", "banana"], "--device 'banana': not a device"),
])
def test_generate_options_are_validated_before_loading(args, frag, capfd, tmp_path):
    from pretrain.generate import main

    assert main(["--checkpoint", str(tmp_path / "none"), *args]) == 2  # checked before the checkpoint
    one_error_line(capfd.readouterr().err, frag)


def test_generate_on_cuda_without_it_is_one_line(capfd, tmp_path):
    from pretrain.generate import main

    dev, frag = ("cuda:99", "only") if torch.cuda.is_available() else ("cuda", "no CUDA device is available")
    assert main(["--checkpoint", str(tmp_path / "none"), "--device", dev]) == 2
    one_error_line(capfd.readouterr().err, f"--device {dev}", frag)


def test_data_dir_without_manifest_is_named(tmp_path, capfd):
    from pretrain.train import main

    d = tmp_path / "not-prepped"
    d.mkdir()
    (d / "corpus.jsonl").write_text('{"text": "raw"}\n')
    assert main([*TINY, "data.synthetic=false", f"data.paths=[{d}]", "--check"]) == 2
    one_error_line(capfd.readouterr().err, f"data.paths: {d} has no manifest.json", "pretrain-prep")
