"""pretrain-prep: every input format, round trips through the loader, determinism, bad records."""
import gzip
import json
import os
import sys

import numpy as np
import pytest

from pretrain.data.loader import open_dataset
from pretrain.data.manifest import read_manifest
from pretrain.data.prep import main as prep_main
from pretrain.data.tokenizer import tokenizer_from_manifest
from pretrain.errors import UserError

DOCS = ["Hello, world!", "日本語のテキストです。中文也可以。한국어", "emoji 🎉🚀👩‍👩‍👧 and ünïcödé e\u0301",
        "multi\nline\n\ndocument\twith tabs", "  leading and trailing spaces  "] + \
       [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) for i in range(40)]


def prep(args):
    argv = [str(a) for a in args] + ["--quiet"]
    return prep_main(argv if "--workers" in argv else argv + ["--workers", "1"])


def jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": 1}, ensure_ascii=False) + "\n")
    return path


def documents(out, split="train"):
    """Decoded documents of a split, read back through the loader's sources (EOS stripped)."""
    ds = open_dataset([str(out)], None, split, 8, 0, 10)
    tok = tokenizer_from_manifest(str(out))
    src = ds.sources[0]
    docs = []
    for d in range(len(src)):
        ids = src.document(d)
        assert ids[-1] == tok.eos_id
        docs.append(tok.decode(ids[:-1]))
    return docs


def test_roundtrip_all_formats_byte(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    d.mkdir()
    part = [DOCS[0:10], DOCS[10:20], DOCS[20:30], DOCS[30:38], DOCS[38:]]
    jsonl(d / "a.jsonl", part[0])
    with gzip.open(d / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": x}) + "\n" for x in part[1])
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": x}) + "\n" for x in part[2]).encode()))
    pq.write_table(pa.table({"text": part[3], "n": list(range(len(part[3])))}), d / "d.parquet", row_group_size=3)
    td = d / "e_txt"
    td.mkdir()
    for i, x in enumerate(part[4]):
        (td / f"{i:02d}.txt").write_text(x, encoding="utf-8")
    out = tmp_path / "out"
    assert prep([d, "-o", out, "--tokenizer", "byte", "--split", "1", "--workers", "1"]) == 0
    assert documents(out) == DOCS
    m = read_manifest(str(out))
    assert m["vocab_size"] == 258 and m["token_dtype"] == "uint16" and m["eos_id"] == 256
    assert [os.path.basename(s["path"]) for s in m["sources"]][:4] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst",
                                                                       "d.parquet"]
    assert all({"path", "size", "mtime_ns"} <= set(s) for s in m["sources"])
    assert m["totals"]["documents"] == len(DOCS) and sum(m["bad_records"].values()) == 0
    sh = m["splits"]["train"]["shards"][0]
    assert {"documents", "tokens", "text_bytes", "bin_bytes", "idx_bytes", "bin_sha256", "idx_sha256"} <= set(sh)
    assert m["splits"]["train"]["tokens"] == sum(len(x.encode()) + 1 for x in DOCS)
    assert m["command"][0] == "pretrain-prep" and m["tokenizer"]["spec"] == "byte"


def test_txt_line_mode_bos_and_no_eos(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\n\nsecond 日本\r\nthird 🎉\n", encoding="utf-8")
    out = tmp_path / "out"
    assert prep([f, "-o", out, "--tokenizer", "byte", "--txt-mode", "line", "--split", "1", "--bos", "--no-eos"]) == 0
    ds = open_dataset([str(out)], None, "train", 4, 0, 1)
    seqs = [ds.sources[0].document(i) for i in range(len(ds.sources[0]))]
    assert [s[0] for s in seqs] == [257] * 3 and all(256 not in s for s in seqs)
    assert [bytes(s[1:].astype(np.uint8)).decode() for s in seqs] == ["first line", "second 日本", "third 🎉"]


def test_bpe_and_hf_roundtrip(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "bpe"
    assert prep([src, "-o", out, "--tokenizer", "bpe:300", "--split", "1", "--shard-size", "300"]) == 0
    m = read_manifest(str(out))
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["tokenizer"]["sha256"]
    assert m["vocab_size"] <= 300 and len(m["splits"]["train"]["shards"]) > 1
    assert documents(out) == DOCS
    out2 = tmp_path / "hf"
    assert prep([src, "-o", out2, "--tokenizer", f"hf:{out / 'tokenizer.json'}", "--split", "1",
                 "--shard-size", "300"]) == 0
    assert documents(out2) == DOCS
    for sh in m["splits"]["train"]["shards"]:  # same tokenizer, same shards
        for ext in ("bin", "idx"):
            assert (out / f"{sh['name']}.{ext}").read_bytes() == (out2 / f"{sh['name']}.{ext}").read_bytes()


def _mixed_corpus(d):
    d.mkdir()
    jsonl(d / "a.jsonl", DOCS * 3)
    with open(d / "b.jsonl", "ab") as f:
        f.write(b"{broken\n" + json.dumps({"text": ""}).encode() + b"\n")
    (d / "c.txt").write_text("\n".join(DOCS), encoding="utf-8")
    return d


def test_same_bytes_for_one_and_two_workers(tmp_path):
    d = _mixed_corpus(tmp_path / "in")
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        assert prep([d, "-o", out, "--tokenizer", "byte", "--workers", w, "--shard-size", "900",
                     "--chunk-bytes", "2Ki", "--split", "0.7,0.2,0.1"]) == 0
        outs.append(out)
    names = sorted(os.listdir(outs[0]))
    assert names == sorted(os.listdir(outs[1])) and len([n for n in names if n.endswith(".bin")]) > 5
    for n in names:
        if n.endswith((".bin", ".idx")):
            assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    m1, m2 = (read_manifest(str(o)) for o in outs)
    m1.pop("command"), m2.pop("command")
    assert m1 == m2
    assert set(m1["splits"]) == {"train", "valid", "test"}
    assert m1["bad_records"]["invalid_json"] == 1 and m1["bad_records"]["empty"] == 1


def test_split_is_by_document_hash(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [f"doc {i}" for i in range(400)])
    out = tmp_path / "o"
    assert prep([src, "-o", out, "--tokenizer", "byte", "--split", "0.5,0.5", "--seed", "7"]) == 0
    tr, va = documents(out, "train"), documents(out, "valid")
    assert sorted(tr + va) == sorted(f"doc {i}" for i in range(400)) and 150 < len(tr) < 250
    src2 = jsonl(tmp_path / "b.jsonl", [f"doc {i}" for i in reversed(range(400))])  # order does not matter
    out2 = tmp_path / "o2"
    assert prep([src2, "-o", out2, "--tokenizer", "byte", "--split", "0.5,0.5", "--seed", "7"]) == 0
    assert sorted(documents(out2, "train")) == sorted(tr)


BAD_LINES = [
    (b"{not json", "invalid_json", "invalid JSON"),
    (b"[1, 2]", "not_an_object", "not an object"),
    (b'{"other": "x"}', "missing_text", "no 'text' field"),
    (b'{"text": null}', "missing_text", "no 'text' field"),
    (b'{"text": 42}', "non_string_text", "not a string"),
    (b'{"text": "bad \xff\xfe utf8"}', "invalid_utf8", "invalid UTF-8"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8", "invalid UTF-8"),
    (b'{"text": "   "}', "empty", "empty document"),
]


def test_bad_records_skip_counts(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good one"}\n' + b"\n".join(x[0] for x in BAD_LINES) + b'\n{"text": "good two"}\n')
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(json.dumps({"text": f"t{i}"}).encode() + b"\n" for i in range(2000)))[:300])
    zs = tmp_path / "bad.jsonl.zst"
    zs.write_bytes(b"definitely not zstd")
    import zstandard

    zt = tmp_path / "trunc.jsonl.zst"
    data = zstandard.ZstdCompressor().compress(b"".join(b'{"text": "z%d"}\n' % i for i in range(3000)))
    zt.write_bytes(data[:len(data) // 2])
    pq = tmp_path / "bad.parquet"
    pq.write_bytes(b"PAR1 garbage")
    out = tmp_path / "out"
    assert prep([p, gz, zs, zt, pq, "-o", out, "--tokenizer", "byte", "--split", "1", "--max-bad-fraction", "1"]) == 0
    m = read_manifest(str(out))
    want = {"invalid_json": 1, "not_an_object": 1, "missing_text": 2, "non_string_text": 1, "invalid_utf8": 2,
            "empty": 1, "unreadable_file": 4}
    assert {k: v for k, v in m["bad_records"].items() if v} == want
    docs = documents(out)
    assert docs[:4] == ["good one", "bad \ufffd\ufffd utf8", "lone ? surrogate", "good two"]


@pytest.mark.parametrize("line,kind,reason", BAD_LINES)
def test_bad_records_fail(tmp_path, capfd, line, kind, reason):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good"}\n' + line + b"\n")
    rc = prep_main([str(p), "-o", str(tmp_path / "o"), "--tokenizer", "byte", "--on-bad-record", "fail", "--quiet"])
    err = capfd.readouterr().err
    assert rc == 2 and f"{p}:2: " in err and reason in err and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_truncated_gzip_fails_with_location(tmp_path, capfd):
    gz = tmp_path / "t.jsonl.gz"
    data = gzip.compress(b"".join(json.dumps({"text": f"t{i}"}).encode() + b"\n" for i in range(3000)))
    gz.write_bytes(data[:len(data) // 2])
    rc = prep_main([str(gz), "-o", str(tmp_path / "o"), "--tokenizer", "byte", "--on-bad-record", "fail", "--quiet"])
    err = capfd.readouterr().err
    assert rc == 2 and f"{gz}:" in err and "truncated" in err and "Traceback" not in err


def test_enormous_documents_are_split_not_dropped(tmp_path):
    big = ("日本語 text 🎉 " * 400)  # ~6 KB, multi-byte characters across the cut points
    src = jsonl(tmp_path / "a.jsonl", ["small", big])
    (tmp_path / "big.txt").write_text(big, encoding="utf-8")
    out = tmp_path / "o"
    assert prep([src, tmp_path / "big.txt", "-o", out, "--tokenizer", "byte", "--split", "1",
                 "--max-doc-bytes", "1000", "--chunk-bytes", "1500"]) == 0
    m = read_manifest(str(out))
    assert m["totals"]["documents"] == 3 and m["totals"]["documents_split"] == 2
    ds = open_dataset([str(out)], None, "train", 8, 0, 1)
    seqs = [ds.sources[0].document(i) for i in range(len(ds.sources[0]))]
    assert all(s.size <= 1001 for s in seqs) and len(seqs) > 10
    stream = np.concatenate(seqs)
    eos = np.flatnonzero(stream == 256)
    assert len(eos) == 3  # one EOS per document, not per piece
    parts = np.split(stream, eos + 1)[:3]
    assert [bytes(p[:-1].astype(np.uint8)).decode() for p in parts] == ["small", big, big]


def test_user_errors(tmp_path, capfd, monkeypatch):
    src = jsonl(tmp_path / "a.jsonl", ["x"])
    cases = [
        ([tmp_path / "missing.jsonl"], "no such file"),
        ([tmp_path / "*.nothing"], "glob matches no files"),
        ([src, "--split", "0.5,0.1"], "summing to 1"),
        ([src, "--shard-size", "lots"], "--shard-size"),
        ([src, "--tokenizer", "hf:gpt2"], "Nothing is downloaded"),
    ]
    (tmp_path / "x.csv").write_text("a,b")
    cases.append(([tmp_path / "x.csv"], "unsupported input type"))
    hf = tmp_path / "hfds"
    hf.mkdir()
    (hf / "dataset_info.json").write_text("{}")
    (hf / "state.json").write_text("{}")
    if "datasets" not in sys.modules:
        monkeypatch.setitem(sys.modules, "datasets", None)
        cases.append(([hf], r"pretrain[hf-datasets]"))
    for args, msg in cases:
        argv = [str(a) for a in args] + ["-o", str(tmp_path / "o")]
        if "--tokenizer" not in argv:
            argv += ["--tokenizer", "byte"]
        assert prep_main(argv + ["--quiet"]) == 2, args
        err = capfd.readouterr().err
        assert err.startswith("error: ") and msg in err and "Traceback" not in err, (args, err)


@pytest.mark.parametrize("fmt,module,extra", [("parquet", "pyarrow", "parquet"), ("jsonl.zst", "zstandard", "zstd")])
def test_missing_optional_extra_is_named(tmp_path, capfd, monkeypatch, fmt, module, extra):
    f = tmp_path / f"x.{fmt}"
    f.write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, module, None)
    assert prep_main([str(f), "-o", str(tmp_path / "o"), "--tokenizer", "byte", "--quiet"]) == 2
    assert f"pretrain[{extra}]" in capfd.readouterr().err


def test_rerun_is_up_to_date_and_other_options_need_overwrite(tmp_path, capfd):
    src = jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "o"
    base = [str(src), "-o", str(out), "--tokenizer", "byte"]
    assert prep_main(base) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capfd.readouterr()
    assert prep_main(base) == 0 and "up to date" in capfd.readouterr().out
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert prep_main(base + ["--seed", "9", "--quiet"]) == 2
    assert "--overwrite" in capfd.readouterr().err
    assert prep_main(base + ["--seed", "9", "--overwrite", "--quiet"]) == 0
    with pytest.raises(UserError):
        open_dataset([str(out)], None, "test", 8, 0, 1)
