"""The checkpoint writer's pieces, in one process: the digest of a file hashed while it is written,
and which tensors a synchronous save writes from the live state and which it must copy."""
from __future__ import annotations

import hashlib

import torch

from pretrain.checkpoint_writer import Staging, _HashingFile


def test_digest_hashed_beside_the_write_is_the_files_sha256(tmp_path):
    path = tmp_path / "x.pt"
    big = torch.randn(3 << 20)  # 12 MiB: hashed on the helper thread while written
    assert big.numel() * 4 >= 4 * _HashingFile.PARALLEL_BYTES
    with open(path, "wb") as f, _HashingFile(f) as w:
        torch.save({"big": big, "small": torch.arange(5)}, w)  # large and small blocks, in order
    data = path.read_bytes()
    assert w.size == len(data) and w.sha.hexdigest() == hashlib.sha256(data).hexdigest()
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
