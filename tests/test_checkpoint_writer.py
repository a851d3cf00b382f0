"""The checkpoint writer's pieces, in one process: the digest of a file hashed while it is written,
which tensors a save writes from the live state and which it copies, and the
checksums a manifest may record."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.checkpoint.snapshot import Recorder, Staging
from pretrain.checkpoint.writer import _HashingFile
from train_util import TINY, check


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


def test_sync_staging_writes_the_live_state_and_async_staging_copies_it():
    flat = torch.arange(10.0)
    owner, view = torch.ones(4), flat[2:6]  # a view of a larger buffer (as in ZeRO's flat groups)
    live = Staging(keep=False, live=True)
    live.begin()
    a, b = live.copy(owner), live.copy(view)
    live.end()
    assert a.data_ptr() == owner.data_ptr() and b.data_ptr() == view.data_ptr()  # no copy
    # ... so DeepSpeed clones what it clones for its own torch.save (else the whole flat buffer is written)
    assert Recorder(live).preserves_storage_sharing() is True
    snap = Staging(keep=True)  # async saves copy everything: training goes on meanwhile
    snap.begin()
    c, d = snap.copy(owner), snap.copy(view)
    snap.end()
    assert c.data_ptr() != owner.data_ptr() and torch.equal(c, owner) and torch.equal(d, view)
    assert d.untyped_storage().nbytes() == 4 * 4  # the view's 4 floats, not the whole buffer
    assert Recorder(snap).preserves_storage_sharing() is False  # DeepSpeed need not clone: we copy


def test_the_writer_turns_off_zip_crc32_on_its_own_thread_only(tmp_path):
    """The digest replaces torch.save's zip CRC32s in the writer's files; the user's own torch.save
    calls, on other threads, keep them (torch's serialization config is per thread)."""
    import threading
    import zipfile

    from pretrain.checkpoint.writer import _zip_crc32

    seen = {}
    with _zip_crc32(False):
        torch.save({"x": torch.arange(1000.0)}, tmp_path / "writer.pt")
        other = threading.Thread(target=lambda: torch.save({"x": torch.arange(1000.0)}, tmp_path / "user.pt"))
        other.start()
        other.join()
    torch.save({"x": torch.arange(1000.0)}, tmp_path / "after.pt")
    for name in ("writer", "user", "after"):
        with zipfile.ZipFile(tmp_path / f"{name}.pt") as z:
            seen[name] = {i.CRC for i in z.infolist() if i.filename.endswith("/data/0")}
    assert seen["writer"] == {0} and 0 not in seen["user"] | seen["after"]
    assert torch.equal(torch.load(tmp_path / "writer.pt")["x"], torch.arange(1000.0))  # torch.load does not check it


def test_manifests_verify_by_the_algorithm_each_entry_names(tmp_path):
    """Checkpoints written before xxh3_128 record sha256: they still verify, and a flipped byte
    fails under either algorithm, named in the reason. (Files of no known structure: only the
    size and the checksum are checked, see test_checkpoint_integrity.py for .pt and .json files.)"""
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    (tag / "new.bin").write_bytes(b"a" * 5000)
    (tag / "old.bin").write_bytes(b"b" * 5000)
    files = {"new.bin": digest.file_entry(tag / "new.bin"),
             "old.bin": {"size": 5000, "sha256": hashlib.sha256(b"b" * 5000).hexdigest()}}
    assert list(files["new.bin"]) == ["size", digest.CHECKPOINT] and digest.CHECKPOINT != "sha256"
    (tag / store.MANIFEST).write_text(json.dumps({"files": files}))
    assert store.verify(tag, "full") is None
    for name, algo in (("new.bin", digest.CHECKPOINT), ("old.bin", "sha256")):
        good = (tag / name).read_bytes()
        (tag / name).write_bytes(b"x" + good[1:])
        assert store.verify(tag, "sizes") is None  # same size: only the checksum sees it
        assert store.verify(tag, "full") == f"{name} fails its {algo} check"
        (tag / name).write_bytes(good)


RECORD = """
import os, shutil
events = open(os.environ["EVENTS"], "a", buffering=1)
_fsync, _replace, _rmtree = os.fsync, os.replace, shutil.rmtree
def fsync(fd):
    events.write("fsync " + os.readlink(f"/proc/self/fd/{fd}") + "\\n")
    _fsync(fd)
def replace(src, dst, *a, **k):
    _replace(src, dst, *a, **k)
    events.write(f"commit {dst}\\n" if str(dst).endswith("manifest.json") else "")
def rmtree(path, *a, **k):
    events.write(f"delete {path}\\n")
    _rmtree(path, *a, **k)
os.fsync, os.replace, shutil.rmtree = fsync, replace, rmtree
from pretrain.train import program
program()
"""


@pytest.mark.parametrize("keep_last", [2, 1])
def test_older_checkpoints_are_deleted_only_once_a_newer_one_is_on_disk(tmp_path, keep_last):
    """Saves at steps 3, 6 and 9. A periodic save commits before its data is fsynced (that waits
    for the disk) and is fsynced at the next save, before anything older is deleted; the last
    save, and every save with keep_last 1, is fsynced before its commit."""
    out, log = tmp_path / "run", tmp_path / "events"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EVENTS": str(log)}
    env.pop("PRETRAIN_FAULTS", None)
    proc = subprocess.run([sys.executable, "-c", RECORD, *TINY, f"train.out_dir={out}", "train.max_steps=9",
                           "checkpoint.interval=3", f"checkpoint.keep_last={keep_last}"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    check(proc)
    events = log.read_text().splitlines()

    def at(kind, step, name=""):
        hits = [i for i, e in enumerate(events)
                if e.startswith(kind) and f"step_{step:08d}" in e and e.endswith(name)]
        assert hits, (kind, step, name, events)
        return hits[0]

    model = "mp_rank_00_model_states.pt"
    for step in (3, 6):
        if keep_last == 1:
            assert at("fsync", step, model) < at("commit", step)
        else:
            assert at("commit", step) < at("fsync", step, model) < at("commit", step + 3)
    assert at("fsync", 9, model) < at("commit", 9)  # the last save
    for gone in ((3, 6) if keep_last == 1 else (3,)):
        assert at("fsync", gone + 3, model) < at("delete", gone)  # the newer one is on disk first
    kept = (9,) if keep_last == 1 else (6, 9)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in kept]
