"""pretrain-shards verify / show."""
import json
import os
import shutil

import numpy as np
import pytest

from pretrain.data.indexed import write_pair
from pretrain.data.inspect import main as shards_main
from pretrain.data.prep import main as prep_main


@pytest.fixture()
def data(tmp_path):
    src = tmp_path / "a.jsonl"
    docs = ["first document 日本語 🎉"] + [f"doc {i} " * (i % 6 + 1) for i in range(60)]
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "out"
    assert prep_main([str(src), "-o", str(out), "--tokenizer", "byte", "--split", "1", "--workers", "1",
                      "--shard-size", "300", "--quiet"]) == 0
    return out


def test_verify_ok_and_show(data, capfd):
    assert shards_main(["verify", str(data)]) == 0
    assert "all shards ok" in capfd.readouterr().out
    assert shards_main(["show", str(data)]) == 0
    out = capfd.readouterr().out
    assert "first document 日本語 🎉" in out and "tokens/document" in out and "vocab 258" in out
    assert shards_main(["show", str(data), "--doc", "3", "--max-chars", "5"]) == 0
    assert "doc 2" in capfd.readouterr().out


@pytest.mark.parametrize("damage,msg", [
    ("truncate", "truncated"), ("magic", "bad magic"), ("flip", "sha256 mismatch"),
    ("version", "unsupported index version"), ("pointer", "pointer"), ("token", ">= vocabulary"),
])
def test_verify_detects(data, capfd, damage, msg):
    p = str(data / "train_00001")
    if damage == "truncate":
        with open(p + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(p + ".bin") - 4)
    elif damage in ("magic", "version", "pointer"):
        with open(p + ".idx", "r+b") as f:
            raw = bytearray(f.read())
            if damage == "magic":
                raw[0] = ord("X")
            elif damage == "version":
                raw[9] = 2
            else:
                n = int.from_bytes(raw[18:26], "little")
                raw[34 + 4 * n + 8] ^= 0x10  # second pointer
            f.seek(0)
            f.write(raw)
    elif damage == "flip":
        with open(p + ".bin", "r+b") as f:
            f.seek(3)
            f.write(b"\x01")
    else:  # an id beyond the vocabulary, written as a consistent pair
        with open(p + ".bin", "r+b") as f:
            f.write(np.array([300], dtype="<u2").tobytes())
    assert shards_main(["verify", str(data), "--quiet"]) == 1
    err = capfd.readouterr().err
    assert msg in err and "problem(s) found" in err


def test_verify_leftover_tmp_and_bare_prefixes(data, tmp_path, capfd):
    shutil.copy(data / "train_00000.bin", data / "train_00000.bin.tmp")
    assert shards_main(["verify", str(data), "--quiet"]) == 1
    assert "leftover temporary file" in capfd.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    write_pair(str(bare / "x_text_document"), [np.arange(5), np.arange(3)], np.uint16)
    assert shards_main(["verify", str(bare)]) == 0
    assert shards_main(["verify", str(bare / "x_text_document"), "--vocab-size", "4"]) == 1
    capfd.readouterr()
    assert shards_main(["show", str(bare / "x_text_document"), "--tokenizer", "byte"]) == 0
    assert "2 documents, 8 tokens" in capfd.readouterr().out


def test_user_errors(tmp_path, capfd):
    assert shards_main(["verify", str(tmp_path / "nope")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    (tmp_path / "manifest.json").write_text("{bad")
    assert shards_main(["show", str(tmp_path)]) == 2
    assert "unreadable manifest" in capfd.readouterr().err


@pytest.mark.parametrize("state", ["no_manifest", "journal", "tmp_only"])
def test_verify_refuses_unfinished_prep_output(data, tmp_path, capfd, state):
    run = tmp_path / "unfinished"
    shutil.copytree(data, run)
    if state in ("no_manifest", "journal"):
        (run / "manifest.json").unlink()
    if state == "journal":
        (run / ".prep_state.json").write_text("{}")
        os.rename(run / "train_00002.bin", run / "train_00002.bin.tmp")
    if state == "tmp_only":  # killed before the first shard closed: temporary files only
        for f in os.listdir(run):
            if f != ".prep.lock":
                os.remove(run / f)
        (run / "train_00000.bin.tmp").write_bytes(b"\x00" * 8)
    assert shards_main(["verify", str(run)]) == 1
    captured = capfd.readouterr()
    assert "all shards ok" not in captured.out
    problems = [ln for ln in captured.err.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 1 and "unfinished: re-run pretrain-prep with the same arguments to resume" in problems[0]
    assert str(run) in problems[0] and "Traceback" not in captured.err
    if state == "journal":
        assert "no manifest.json, .prep_state.json, 1 .tmp shard file(s)" in problems[0]
