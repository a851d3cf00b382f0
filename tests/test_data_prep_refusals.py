"""pretrain-prep refuses what it cannot turn into a dataset: garbage inputs, no record with the
text key, too many bad records; reads `.json` JSON lines; one `error:` line, exit 2, and no
dataset (manifest or shards) left behind."""
from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest

from fault_util import one_error_line
from pretrain.data.manifest import read_manifest
from pretrain.data.prep import main as prep_main


def _prep(args, capfd, *extra) -> tuple[int, str]:
    rc = prep_main([str(a) for a in args] + ["--tokenizer", "byte", "--workers", "1", "--split", "1", "--quiet",
                                             *extra])
    return rc, capfd.readouterr().err


def _assert_no_dataset(out):
    left = set(os.listdir(out)) if os.path.isdir(out) else set()
    assert left <= {".prep.lock"}, left


def _elf() -> bytes:
    exe = shutil.which("true") or "/bin/true"
    with open(exe, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF"
    return data


GARBAGE = {
    "empty.jsonl": (lambda: b"", "hold no records"),
    "blank.jsonl": (lambda: b"\n\n   \n\t\n", "hold no records"),
    "random.jsonl": (lambda: bytes(range(256)) * 8 + os.urandom(3000), "invalid_json"),
    "elf.jsonl": (_elf, "invalid_json"),
    "elf.txt": (_elf, "binary"),
    "plain.jsonl.gz": (lambda: b"just some plain text\nnot gzip at all\n", "unreadable_file"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_input_fails_with_one_line_and_writes_no_dataset(tmp_path, capfd, name):
    make, kind = GARBAGE[name]
    src = tmp_path / name
    src.write_bytes(make())
    out = tmp_path / "out"
    rc, err = _prep([src, "-o", out], capfd)
    assert rc == 2
    one_error_line(err, "no document survived", kind, str(out))
    _assert_no_dataset(out)


def test_no_record_with_the_text_key_names_the_keys_that_exist(tmp_path, capfd):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"content": f"doc {i}", "id": i}) + "\n" for i in range(5)))
    rc, err = _prep([src, "-o", tmp_path / "out"], capfd)
    assert rc == 2
    one_error_line(err, "no document survived", "missing_text 5", "no 'text' field (keys: content, id)",
                   "--text-key")
    _assert_no_dataset(tmp_path / "out")
    rc, _ = _prep([src, "-o", tmp_path / "out", "--text-key", "content"], capfd)
    assert rc == 0 and read_manifest(str(tmp_path / "out"))["totals"]["documents"] == 5


def test_parquet_without_the_text_column_names_the_columns(tmp_path, capfd):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x", "y"], "lang": ["en", "de"]}), src)
    rc, err = _prep([src, "-o", tmp_path / "out"], capfd)
    assert rc == 2
    one_error_line(err, "no document survived", "missing_text 2", "columns: ['body', 'lang']")


def test_bad_fraction_over_the_limit_fails_with_counts_by_kind(tmp_path, capfd):
    src = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": f"good {i}"}) for i in range(18)] + ["{broken", "[1]", '{"text": 5}']
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc, err = _prep([src, "-o", out], capfd)  # 3 of 21 = 14% > the default 5%
    assert rc == 2
    one_error_line(err, "3 of 21 records (14.3%)", "--max-bad-fraction 0.05", "invalid_json 1",
                   "not_an_object 1", "non_string_text 1", f"{src}:19")
    _assert_no_dataset(out)
    rc, err = _prep([src, "-o", out], capfd, "--max-bad-fraction", "0.2")
    assert rc == 0, err
    m = read_manifest(str(out))
    assert m["totals"]["documents"] == 18 and m["bad_records"]["invalid_json"] == 1


def test_empty_documents_and_invalid_utf8_do_not_count_as_bad(tmp_path, capfd):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"".join([b'{"text": "ok"}\n', b'{"text": ""}\n' * 5, b'{"text": "bad \xff"}\n' * 5]))
    rc, err = _prep([src, "-o", tmp_path / "out"], capfd)
    assert rc == 0, err
    m = read_manifest(str(tmp_path / "out"))
    assert m["totals"]["documents"] == 6 and m["bad_records"]["empty"] == 5


def test_json_lines_named_json_are_read_by_name_and_in_a_directory(tmp_path, capfd):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(3)))
    (d / "sub" / "b.json.gz").write_bytes(gzip.compress(b'{"text": "b0"}\n{"text": "b1"}\n'))
    (d / "tokenizer.json").write_text('{\n  "model": {}\n}\n')  # pretty-printed: not JSON lines
    rc, err = _prep([d / "a.json", "-o", tmp_path / "one"], capfd)
    assert rc == 0, err
    assert read_manifest(str(tmp_path / "one"))["totals"]["documents"] == 3
    rc, err = _prep([d, "-o", tmp_path / "all"], capfd)
    assert rc == 0, err
    assert f"skipping {d / 'tokenizer.json'}" in err
    m = read_manifest(str(tmp_path / "all"))
    assert m["totals"]["documents"] == 5 and sum(m["bad_records"].values()) == 0
    assert [s["format"] for s in m["sources"]] == ["jsonl", "jsonl.gz"]


def _corpus(path, n=3000):
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(100))}) + "\n"
                            for _ in range(n)))
    return path


def test_disk_full_during_prep_is_one_line_and_a_rerun_resumes_to_the_same_bytes(tmp_path, capfd):
    import subprocess

    from fault_util import small_fs
    from pretrain.data.inspect import main as shards_main

    src = _corpus(tmp_path / "big.jsonl")  # 1.7 MB of text: 3.4 MB of uint16 tokens, on a 2 MB disk
    args = ["--shard-size", "100K"]
    rc, err = _prep([src, "-o", tmp_path / "ref", *args], capfd)
    assert rc == 0, err
    with small_fs(tmp_path / "fs", size="2m") as fs:
        out = fs / "out"
        rc, err = _prep([src, "-o", out, *args], capfd)
        assert rc == 2
        one_error_line(err, f"writing {out}", "the disk is full", "journal", "re-run pretrain-prep with the same "
                       "arguments to resume")
        assert not (out / "manifest.json").exists()
        assert not [f for f in os.listdir(out) if ".json.tmp" in f]  # no half-written journal or manifest
        assert shards_main(["verify", str(out), "--quiet"]) == 1
        assert "unfinished" in capfd.readouterr().err
        subprocess.run(["mount", "-o", "remount,size=20m", str(fs)], check=True)
        rc, err = _prep([src, "-o", out, *args], capfd)
        assert rc == 0, err
        names = sorted(f for f in os.listdir(tmp_path / "ref") if f.endswith((".bin", ".idx")))
        assert names == sorted(f for f in os.listdir(out) if f.endswith((".bin", ".idx")))
        for n in names:
            assert (out / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), n
        assert shards_main(["verify", str(out), "--quiet"]) == 0


def test_output_on_a_read_only_file_system_is_one_line(tmp_path, capfd):
    from fault_util import small_fs

    src = _corpus(tmp_path / "a.jsonl", 20)
    with small_fs(tmp_path / "ro", readonly=True, populate=lambda d: (d / "existing").mkdir()) as ro:
        for out in (ro / "new", ro / "existing"):
            rc, err = _prep([src, "-o", out], capfd)
            assert rc == 2
            one_error_line(err, "the file system is read-only", "no dataset was written")
