"""The checkpoint writer's pieces, in one process: the digest of a file hashed while it is written,
which tensors a synchronous save writes from the live state and which it must copy, and the
checksums a manifest may record."""
from __future__ import annotations

import hashlib
import json

import torch

from pretrain import checkpoint, digest
from pretrain.checkpoint_writer import Staging, _HashingFile


def test_digest_hashed_beside_the_write_is_the_files_checksum(tmp_path):
    path = tmp_path / "x.pt"
    big = torch.randn(3 << 20)  # 12 MiB: hashed on the helper thread while written
    assert big.numel() * 4 >= 4 * _HashingFile.PARALLEL_BYTES
    with open(path, "wb") as f, _HashingFile(f) as w:
        torch.save({"big": big, "small": torch.arange(5)}, w)  # large and small blocks, in order
    data = path.read_bytes()
    assert w.size == len(data) and w.hasher.hexdigest() == digest.bytes_entry(data)[digest.CHECKPOINT]
    assert digest.file_entry(path) == {"size": len(data), digest.CHECKPOINT: w.hasher.hexdigest()}
    assert torch.equal(torch.load(path)["big"], big)


def test_sync_staging_writes_owned_tensors_live_and_copies_views():
    flat = torch.arange(10.0)
    owner, view = torch.ones(4), flat[2:6]  # a view of a larger buffer (as in ZeRO's flat groups)
    live = Staging(keep=False, live=True)
    live.begin()
    a, b = live.copy(owner), live.copy(view)
    live.end()
    assert a.data_ptr() == owner.data_ptr()  # no copy
    assert b.data_ptr() != view.data_ptr() and torch.equal(b, view)
    assert b.untyped_storage().nbytes() == 4 * 4  # torch.save writes 4 floats, not the whole buffer
    snap = Staging(keep=True)  # async saves copy everything: training goes on meanwhile
    snap.begin()
    c = snap.copy(owner)
    snap.end()
    assert c.data_ptr() != owner.data_ptr() and torch.equal(c, owner)


def test_manifests_verify_by_the_algorithm_each_entry_names(tmp_path):
    """Checkpoints written before xxh3_128 record sha256: they still verify, and a flipped byte
    fails under either algorithm, named in the reason."""
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    (tag / "new.pt").write_bytes(b"a" * 5000)
    (tag / "old.pt").write_bytes(b"b" * 5000)
    files = {"new.pt": digest.file_entry(tag / "new.pt"),
             "old.pt": {"size": 5000, "sha256": hashlib.sha256(b"b" * 5000).hexdigest()}}
    assert list(files["new.pt"]) == ["size", digest.CHECKPOINT] and digest.CHECKPOINT != "sha256"
    (tag / checkpoint.MANIFEST).write_text(json.dumps({"files": files}))
    assert checkpoint.verify(tag, "full") is None
    for name, algo in (("new.pt", digest.CHECKPOINT), ("old.pt", "sha256")):
        good = (tag / name).read_bytes()
        (tag / name).write_bytes(b"x" + good[1:])
        assert checkpoint.verify(tag, "sizes") is None  # same size: only the checksum sees it
        assert checkpoint.verify(tag, "full") == f"{name} fails its {algo} check"
        (tag / name).write_bytes(good)
