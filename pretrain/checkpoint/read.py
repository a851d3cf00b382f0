"""Reading a checkpoint back: every file is checked before it is trusted, and a file that cannot be
read is named, never a traceback.

Two checks per file (`file_problem`):

- its structure, always and before anything is loaded: a `.pt` file opens as a zip archive whose
  records' local headers are sound and whose pickle parses to its end (the pickle is scanned,
  not run, and no tensor is read); a `.json` file parses. This catches a damaged zip header or
  directory, or a foreign file, before DeepSpeed reads it;
- its digest against the one `manifest.json` records (`pretrain.digest`: xxh3_128, sha256 in
  older manifests), with `checkpoint.verify: full` (the default); `sizes` skips this one.

At resume the digests of the files DeepSpeed loads are taken as it loads them (`hashing_reads`):
our checkpoint engine maps each file (torch.load with mmap=True) and hashes the same pages, so
the bytes are read once, for the hash, and then copied once, by DeepSpeed into its buffers,
as plain torch.load reads them once into a copy. A mismatch does not interrupt the load (a rank
raising inside DeepSpeed's load would leave the others waiting in its collectives): it is
reported afterwards, every rank agrees, and the checkpoint is dropped for the previous one
before any step runs on it.

Errors in the load itself (`engine_load`, and `load_pt` for our own readers) come out as
`Unreadable`, a UserError naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from pretrain import digest, dsadapter
from pretrain.errors import UserError


class Unreadable(UserError):
    """A checkpoint file that fails its checks or its load: `path` and what went wrong."""

    def __init__(self, path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: {why}")


def structure_problem(path: Path) -> str | None:
    """None when `path` has the structure its suffix promises (see the module docstring); else why not."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as z:
                records = z.infolist()
            pkl = [i for i in records if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkl) != 1 or any(i.compress_type != zipfile.ZIP_STORED for i in records):
                return "is not a torch checkpoint (no stored data.pkl record in its zip archive)"
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                starts = {info.filename: _record_start(f, info, size) for info in records}
                f.seek(starts[pkl[0].filename])  # stored, so read past zipfile's CRC32 check (the writer leaves it 0)
                for _ in pickletools.genops(f.read(pkl[0].compress_size)):
                    pass
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, IndexError, UnicodeDecodeError) as e:
        if path.suffix == ".json":
            return f"cannot read checkpoint state: not JSON ({type(e).__name__}: {e})"
        return f"is not a readable torch checkpoint ({type(e).__name__}: {e})"
    return None


def _record_start(f, info: zipfile.ZipInfo, size: int) -> int:
    """Where record `info`'s bytes start, past a local header that must agree with the directory
    (torch's reader takes the record's offset from it)."""
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if name_len != len(info.orig_filename.encode()):
        raise zipfile.BadZipFile(f"the local header of {info.filename} names another file")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > size:
        raise zipfile.BadZipFile(f"{info.filename} runs past the end of the file")
    return start


def file_problem(tag_dir: Path, name: str, entry: dict, mode: str) -> str | None:
    """None when file `name` of `tag_dir` passes its checks (`mode` 'full': also its digest;
    'structure': the structure only)."""
    path = tag_dir / name
    if mode == "full" and (problem := digest.mismatch(path, entry)):
        return f"{name} {problem}"
    if problem := structure_problem(path):
        return f"{name} {problem}"
    return None


def load_pt(path: Path):
    """torch.load of a checkpoint file (pickles: trusted runs only), any failure as Unreadable."""
    if not path.is_file():
        raise Unreadable(path, "missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file raises anything the unpickler can
        raise Unreadable(path, f"cannot be loaded ({type(e).__name__}: {e}); the file is damaged or "
                               "not from pretrain-train") from None


@contextlib.contextmanager
def reading(where: Path):
    """Turn an error from what a verified file holds (a foreign state dict: KeyError, a tensor of
    another shape: RuntimeError ...) into Unreadable naming `where`, so that no traceback reaches
    the user for a checkpoint that is not ours."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise Unreadable(where, f"holds something other than a pretrain-train checkpoint "
                                f"({type(e).__name__}: {e})") from None


class HashingReads:
    """The digests of one checkpoint's files, taken while the load reads them (see the module
    docstring): `checked` maps each file read to None or its problem."""

    def __init__(self, tag_dir: Path, files: dict, hashing: bool):
        self.tag_dir, self.files, self.hashing = Path(tag_dir).resolve(), files, hashing
        self.checked: dict[str, str | None] = {}

    def load(self, path, map_location):
        name = self._name(path)
        if name is None or not self.hashing:  # DeepSpeed's own way
            return torch.load(path, map_location=map_location, weights_only=False)
        # Mapped, not read: the hash below reads every page once, and DeepSpeed copies from there
        # (plain torch.load first copies every byte into fresh memory). A tensor DeepSpeed keeps
        # as it is (Adam's moments) stays a private mapping of the file until its first update.
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        problem = digest.mismatch(Path(path), self.files[name])
        self.checked[name] = f"{name} {problem}" if problem else None
        return state

    def _name(self, path) -> str | None:
        try:
            name = str(Path(path).resolve().relative_to(self.tag_dir))
        except ValueError:
            return None
        return name if name in self.files else None

    def problem(self) -> str | None:
        return next((p for p in self.checked.values() if p), None)


_reads: HashingReads | None = None  # the load in progress (one at a time, on the main thread)


@contextlib.contextmanager
def hashing_reads(tag_dir: Path, files: dict, hashing: bool):
    """While inside, our checkpoint engine hashes the files of `tag_dir` it loads (`hashing`)."""
    global _reads
    _reads = HashingReads(tag_dir, files, hashing)
    try:
        yield _reads
    finally:
        _reads = None


def reader():
    """DeepSpeed's checkpoint engine while it loads: torch.load (hashing, see HashingReads),
    remembering the last file read (`current`) so a failure after it can be blamed on it.
    (Built on first use: importing deepspeed costs seconds that --print-config and --plan need not pay.)"""
    class Reader(dsadapter.checkpoint_engine_base()):
        def __init__(self):
            super().__init__()
            self.name, self.current = "pretrain-reader", None

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            raise RuntimeError("pretrain-reader only loads")

        def load(self, path: str, map_location=None):
            self.current = Path(path)
            try:
                if _reads is not None:
                    return _reads.load(path, map_location)
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e:  # noqa: BLE001
                raise Unreadable(path, f"cannot be loaded ({type(e).__name__}: {e})") from None

        def commit(self, info):
            return True

    return Reader()


def engine_load(engine, tag_dir: Path, **kwargs):
    """`engine.load_checkpoint` of `tag_dir` with our checkpoint engine (`reader`): a failure of
    any kind (torch.load, or DeepSpeed choking on what it read) comes out as Unreadable naming the
    file DeepSpeed was reading."""
    ours = reader()
    with dsadapter.swap_checkpoint_engine(engine, ours):
        try:
            return engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, **kwargs)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- e.g. a KeyError from a foreign state dict
            raise Unreadable(ours.current or tag_dir, f"does not load ({type(e).__name__}: {e}); the file is "
                                                      "damaged or not from pretrain-train") from None
