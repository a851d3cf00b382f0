"""The .bin/.idx files we write parse with an independent reader built from REFERENCE.md's table."""
import json
import struct

import numpy as np
import pytest

from pretrain.data.indexed import IndexedReader, check_prefix, encode_index, token_dtype, write_pair
from pretrain.data.prep import main as prep_main
from pretrain.errors import UserError

CODES = {1: ("B", 1), 2: ("b", 1), 3: ("h", 2), 4: ("i", 4), 5: ("q", 8), 6: ("d", 8), 7: ("f", 4), 8: ("H", 2)}


def read_megatron(prefix):
    """Minimal reader written from the format table, with struct only (no project code)."""
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    assert idx[0:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", idx[9:17])
    assert version == 1
    code = idx[17]
    n, d1 = struct.unpack("<QQ", idx[18:34])
    sizes = struct.unpack(f"<{n}i", idx[34:34 + 4 * n])
    pointers = struct.unpack(f"<{n}q", idx[34 + 4 * n:34 + 12 * n])
    doc_idx = struct.unpack(f"<{d1}q", idx[34 + 12 * n:34 + 12 * n + 8 * d1])
    assert len(idx) == 34 + 12 * n + 8 * d1
    fmt, width = CODES[code]
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    seqs = [list(struct.unpack(f"<{s}{fmt}", data[p:p + s * width])) for s, p in zip(sizes, pointers)]
    return code, seqs, list(doc_idx)


def test_prep_output_parses_with_independent_reader(tmp_path):
    docs = ["hello", "héllo wörld", "日本語 🎉", "x" * 300]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "out"
    assert prep_main([str(src), "-o", str(out), "--tokenizer", "byte", "--split", "1", "--workers", "1",
                      "--quiet"]) == 0
    code, seqs, doc_idx = read_megatron(str(out / "train_00000"))
    assert code == 8  # uint16 for a vocabulary under 65500
    assert doc_idx == list(range(len(docs) + 1))
    assert seqs == [list(d.encode("utf-8")) + [256] for d in docs]


@pytest.mark.parametrize("vocab,code", [(258, 8), (65499, 8), (65500, 4), (200000, 4)])
def test_dtype_rule_and_int32_pairs(tmp_path, vocab, code):
    dt = token_dtype(vocab)
    docs = [np.array([1, 2, 3]), np.array([vocab - 1]), np.array([0, 7])]
    write_pair(str(tmp_path / "p"), docs, dt)
    c, seqs, doc_idx = read_megatron(str(tmp_path / "p"))
    assert c == code
    assert seqs == [d.tolist() for d in docs]
    assert doc_idx == [0, 1, 2, 3]
    r = IndexedReader(str(tmp_path / "p"))
    assert r.get(1).tolist() == [vocab - 1] and r.structure_problems() == []


def test_encode_index_layout():
    b = encode_index(np.array([3, 1]), np.uint16)
    assert b[:9] == b"MMIDIDX\x00\x00" and len(b) == 34 + 12 * 2 + 8 * 3
    assert struct.unpack("<QBQQ", b[9:34]) == (1, 8, 2, 3)
    assert struct.unpack("<2i2q3q", b[34:]) == (3, 1, 0, 6, 0, 1, 2)


def test_reader_rejects_bad_files(tmp_path):
    p = str(tmp_path / "p")
    write_pair(p, [np.arange(10), np.arange(5)], np.uint16)
    raw = bytearray(open(p + ".idx", "rb").read())
    bad = bytearray(raw)
    bad[0:3] = b"XXX"
    open(p + ".idx", "wb").write(bytes(bad))
    with pytest.raises(UserError, match="magic"):
        IndexedReader(p)
    open(p + ".idx", "wb").write(bytes(raw[:-4]))
    with pytest.raises(UserError, match="needs"):
        IndexedReader(p)
    open(p + ".idx", "wb").write(bytes(raw))
    with open(p + ".bin", "r+b") as f:
        f.truncate(20)
    assert any("truncated" in x for x in check_prefix(p))
