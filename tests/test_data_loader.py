"""Loader: sample windows, epochs, DP slicing, exact resume (also across DP sizes), blending, validation."""
import json
import os

import numpy as np
import pytest
import torch

from pretrain.data.indexed import write_pair
from pretrain.data.loader import micro_batches, open_dataset
from pretrain.data.prep import main as prep_main
from pretrain.errors import UserError

SEQ = 16


def make(tmp_path, name, docs, *extra):
    src = tmp_path / f"{name}.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    out = tmp_path / name
    assert prep_main([str(src), "-o", str(out), "--tokenizer", "byte", "--split", "1", "--workers", "1",
                      "--shard-size", "700", "--quiet", *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    docs = [f"doc {i} " + "abcdefghij"[i % 10] * (i % 37 + 1) + " 日本🎉" for i in range(150)]
    return make(tmp, "d", docs)


def test_windows_cover_each_epoch(data):
    ds = open_dataset([data], None, "train", SEQ, 3, 100)
    assert len(ds) == 100 and ds.vocab_size == 258 and ds.tokenizer_dir == data
    src, ix = ds.sources[0], ds.index[0]
    assert ix.per_epoch == (src.tokens - 1) // SEQ
    for e in (0, 1):
        order = ix.epoch(e)[0]
        stream = np.concatenate([src.document(int(d)) for d in order])
        starts = []
        for i in range(e * ix.per_epoch, (e + 1) * ix.per_epoch):
            s, ep, start = ds.locate(i)
            assert (s, ep) == (0, e)
            x = ds.get(i)
            assert x.dtype == np.int64 and x.shape == (SEQ + 1,)
            assert np.array_equal(x, stream[start:start + SEQ + 1])
            starts.append(start)
        assert sorted(starts) == [k * SEQ for k in range(ix.per_epoch)]  # every window exactly once
    assert not np.array_equal(ix.epoch(0)[0], ix.epoch(1)[0])  # documents reshuffled each epoch
    assert ds[0].tolist() == ds.get(0).tolist() and ds[-1].tolist() == ds.get(99).tolist()
    with pytest.raises(IndexError):
        ds[100]


def test_deterministic_and_fingerprint(data, tmp_path):
    a = open_dataset([data], None, "train", SEQ, 3, 50)
    b = open_dataset([data], None, "train", SEQ, 3, 5000, cache_dir=str(tmp_path / "cache"))
    assert a.fingerprint == b.fingerprint
    assert all(np.array_equal(a.get(i), b.get(i)) for i in range(0, 400, 7))
    assert os.listdir(tmp_path / "cache" / "sample_index")
    c = open_dataset([data], None, "train", SEQ, 3, 50, cache_dir=str(tmp_path / "cache"))  # from the cache
    assert all(np.array_equal(a.get(i), c.get(i)) for i in range(0, 400, 7))
    assert open_dataset([data], None, "train", SEQ, 4, 50).fingerprint != a.fingerprint
    assert open_dataset([data], None, "train", SEQ + 1, 3, 50).fingerprint != a.fingerprint


def test_dp_slices_disjoint_and_cover(data):
    ds = open_dataset([data], None, "train", SEQ, 1, 1000)
    mb, dp = 3, 2
    g = mb * dp
    steps = ds.index[0].per_epoch // g
    its = [micro_batches(ds, mb, r, dp, 0) for r in range(dp)]
    seen = []
    for t in range(steps):
        rows = [next(it) for it in its]
        assert all(isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.shape == (mb, SEQ + 1) for x in rows)
        want = np.stack([ds.get(i) for i in range(t * g, (t + 1) * g)])
        assert np.array_equal(torch.cat(rows).numpy(), want)
        seen += [ds.locate(i)[2] for i in range(t * g, (t + 1) * g)]
    assert len(set(seen)) == len(seen) == steps * g  # disjoint, and together the epoch (less a remainder)


def test_resume_exact_and_dp_resize(data):
    ds = open_dataset([data], None, "train", SEQ, 5, 1000)
    its = [micro_batches(ds, 2, r, 2, 0) for r in range(2)]
    run = [[next(it) for it in its] for _ in range(6)]
    consumed = 3 * 4
    its2 = [micro_batches(ds, 2, r, 2, consumed) for r in range(2)]
    for t in range(3, 6):
        for r in range(2):
            assert torch.equal(next(its2[r]), run[t][r])
    one = micro_batches(ds, 4, 0, 1, consumed)  # DP 2 -> 1, same global batch of 4
    for t in range(3, 6):
        assert torch.equal(next(one), torch.cat(run[t]))
    with pytest.raises(UserError):
        micro_batches(ds, 2, 2, 2, 0)  # checked at the call, before any batch
    with pytest.raises(UserError):
        micro_batches(ds, 0, 0, 1, 0)


def test_blend_ratios(tmp_path):
    a = make(tmp_path, "a", ["aaaa " * (i % 9 + 3) for i in range(60)])
    b = make(tmp_path, "b", ["1234 " * (i % 5 + 2) for i in range(60)])
    for w in ([0.7, 0.3], [1, 3], [0.05, 0.95]):
        ds = open_dataset([a, b], w, "train", SEQ, 0, 10000)
        from_a = 0
        for i in range(10000):
            x = ds.get(i)
            is_a = bool(np.isin(x, [ord("a"), ord(" "), 256]).all())
            is_b = bool(np.isin(x, [ord(c) for c in "1234 "] + [256]).all())
            assert is_a != is_b or (is_a and is_b and set(x.tolist()) <= {32, 256})
            from_a += is_a and not is_b
        assert abs(from_a / 10000 - w[0] / sum(w)) < 0.01, (w, from_a)
    d = open_dataset([a, b], None, "train", SEQ, 0, 1000)  # default: proportional to tokens
    ta, tb = (s.tokens for s in d.sources)
    assert np.allclose(d.weights, [ta / (ta + tb), tb / (ta + tb)])
    with pytest.raises(UserError, match="one per path"):
        open_dataset([a, b], [1.0], "train", SEQ, 0, 10)
    with pytest.raises(UserError, match="non-negative"):
        open_dataset([a, b], [1.0, -1.0], "train", SEQ, 0, 10)


def _copy(src, dst):
    os.makedirs(dst)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as f, open(os.path.join(dst, n), "wb") as g:
            g.write(f.read())
    return dst


@pytest.mark.parametrize("damage,msg", [
    ("truncate", "bin_bytes"), ("magic", "magic"), ("flip", "sha256"), ("delete", "missing"),
])
def test_corrupt_data_rejected_at_open(data, tmp_path, damage, msg):
    d = _copy(data, str(tmp_path / "c"))
    p = os.path.join(d, "train_00001")
    if damage == "truncate":
        with open(p + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(p + ".bin") - 2)
    elif damage == "magic":
        with open(p + ".idx", "r+b") as f:
            f.write(b"NOTMAGIC!")
    elif damage == "flip":
        with open(p + ".bin", "r+b") as f:
            f.seek(11)
            b = f.read(1)
            f.seek(11)
            f.write(bytes([b[0] ^ 0x01]))
    else:
        os.remove(p + ".bin")
    with pytest.raises(UserError, match=msg):
        open_dataset([d], None, "train", SEQ, 0, 10)
    if damage == "flip":  # the cheap structural mode cannot see a flipped byte, full verification does
        open_dataset([d], None, "train", SEQ, 0, 10, verify="structure")


def test_missing_split_and_paths(data, tmp_path):
    with pytest.raises(UserError, match="'valid'"):
        open_dataset([data], None, "valid", SEQ, 0, 10)
    with pytest.raises(UserError, match="no such"):
        open_dataset([str(tmp_path / "nope")], None, "train", SEQ, 0, 10)
    with pytest.raises(UserError, match="fewer than seq_len"):
        open_dataset([data], None, "train", 10**7, 0, 10)
    with pytest.raises(UserError):
        open_dataset([], None, "train", SEQ, 0, 10)


def test_bare_megatron_prefix(data, tmp_path):
    p = str(tmp_path / "bare")
    write_pair(p, [np.arange(i, i + 20) % 50000 for i in range(30)], np.uint16)
    ds = open_dataset([p], None, "train", SEQ, 0, 20)
    assert ds.vocab_size is None and ds.tokenizer_dir is None and len(ds) == 20
    assert ds.get(3).shape == (SEQ + 1,)
    with pytest.raises(UserError, match="'valid'"):
        open_dataset([p], None, "valid", SEQ, 0, 10)
    with pytest.raises(UserError, match="no data source"):
        open_dataset([data, p], [1, 1], "valid", SEQ, 0, 10, missing_split="skip")
    both = make(tmp_path, "tv", [f"text {i} " * 9 for i in range(80)], "--split", "0.5,0.5")
    v = open_dataset([p, both], [1, 1], "valid", SEQ, 0, 10, missing_split="skip")
    assert len(v.sources) == 1 and v.vocab_size == 258 and v.get(0).shape == (SEQ + 1,)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "flipped"])
def test_damaged_index_cache_is_rebuilt_with_a_warning(data, tmp_path, capfd, damage):
    cache = str(tmp_path / "cache")
    ref = open_dataset([data], None, "train", SEQ, 3, 500, cache_dir=cache)
    want = [ref[i].copy() for i in range(0, 500, 37)]
    files = [os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f.endswith(".npy")]
    assert files
    for f in files:
        raw = open(f, "rb").read()
        with open(f, "wb") as fh:
            fh.write({"garbage": b"not a zip at all" * 10, "truncated": raw[:len(raw) // 2], "empty": b"",
                      "flipped": raw[:-1] + bytes([raw[-1] ^ 1])}[damage])  # flipped: one bit of a value
    capfd.readouterr()
    again = open_dataset([data], None, "train", SEQ, 3, 500, cache_dir=cache)
    got = [again[i] for i in range(0, 500, 37)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    err = capfd.readouterr().err
    assert "warning: damaged sample-index cache" in err and "rebuilding it" in err and "Traceback" not in err
    assert open_dataset([data], None, "train", SEQ, 3, 500, cache_dir=cache)  # rewritten: read back quietly
    assert "damaged" not in capfd.readouterr().err
