"""A prep run killed with SIGKILL and re-run with the same arguments ends identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pretrain.data.indexed import check_prefix
from pretrain.data.loader import open_dataset
from pretrain.data.prep import main as prep_main
from pretrain.data.tokenizer import train_bpe
from pretrain.errors import UserError


def _corpus(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "日本語", "emoji🎉", "über", "x"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] + str(j % 13) for j in range(50 + i % 200)) for i in range(1000)]
    src = tmp_path / "corpus.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tok = tmp_path / "tok.json"
    train_bpe(iter(docs[:200]), 400, str(tok))
    return src, tok


def _outputs(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))
            if n.endswith((".bin", ".idx")) or n == "tokenizer.json"}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(tmp_path):
    src, tok = _corpus(tmp_path)
    args = [str(src), "--tokenizer", f"hf:{tok}", "--shard-size", "4000", "--chunk-bytes", "8Ki",
            "--split", "0.9,0.1"]
    ref = tmp_path / "ref"
    assert prep_main(args + ["-o", str(ref), "--workers", "1", "--quiet"]) == 0
    ref_files = _outputs(ref)
    assert len(ref_files) > 20

    out = tmp_path / "out"
    for attempt in range(5):
        p = subprocess.Popen([sys.executable, "-m", "pretrain.data.prep"] + args + ["-o", str(out), "--workers", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None and not (out / "train_00001.idx").exists():
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not (out / "manifest.json").exists():
            break
        prep_main(args + ["-o", str(out), "--overwrite", "--quiet", "--workers", "1"])  # finished too fast
        for n in os.listdir(out):
            os.remove(out / n)
    assert not (out / "manifest.json").exists(), "prep finished before it could be killed"
    assert (out / ".prep_state.json").exists()
    # a half-written run never looks complete: no manifest, and every final-named shard is whole
    with pytest.raises(UserError, match="no manifest.json"):
        open_dataset([str(out)], None, "train", 16, 0, 1)
    for n in os.listdir(out):
        if n.endswith(".idx"):
            assert check_prefix(str(out / n[:-4])) == []

    r = subprocess.run([sys.executable, "-m", "pretrain.data.prep"] + args + ["-o", str(out), "--workers", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming after" in r.stderr
    assert _outputs(out) == ref_files
    m1 = json.loads((ref / "manifest.json").read_text())
    m2 = json.loads((out / "manifest.json").read_text())
    m1.pop("command"), m2.pop("command")
    assert m1 == m2
    assert not (out / ".prep_state.json").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
