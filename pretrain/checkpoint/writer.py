"""Writing a checkpoint: snapshot on the training thread, write + hash + commit in the background.

`CheckpointWriter.save` is collective (every rank calls it at the same step):

1. It waits for the previous save of this rank (and learns whether any rank's failed).
2. DeepSpeed's `save_checkpoint` runs with a recording checkpoint engine
   (pretrain.checkpoint.snapshot): every `checkpoint_engine.save(state_dict, path)` call keeps
   a CPU copy of the state dict instead of writing it (a synchronous save keeps the live
   tensors). This is all the training thread waits for (the copy off the device; on CPU a
   memory copy).
3. A background thread of each rank writes its own files (DeepSpeed's, two at a time, then
   `rng_<rank>.json`, and on rank 0 `state.json` and the tokenizer copy), hashing each file's
   bytes as they are written, and publishes `{name: {size, checksum}}` (pretrain.digest) in
   `.digests_<rank>.json`.
   Every file is written to a temporary name or a new step directory and renamed into place.
   Durability comes one save late (`_write`): before publishing its digests, each rank fsyncs
   its files of the previous save, by then written back by the kernel (fsyncing a save's own
   gigabytes would make it wait for the disk). The run's last save, and every save with
   `keep_last: 1`, is fsynced before it commits instead.
4. Rank 0's thread waits for every rank's digests, adds the few files DeepSpeed wrote by
   itself (its recovery scripts), writes `manifest.json` (the commit), moves `latest`, and prunes
   the checkpoints beyond `keep_last`: a newer kept one is on disk by then.

With `checkpoint.async_save: false` the training thread waits for step 4 inside `save`.
The next save, a stop and the exit wait for the previous commit (`wait`). A failed write
(disk full, read-only or permission) is reported by every rank at the next `wait` as one
line naming the file and the last committed step; the partial step directory is removed.
Nothing counts as committed before `manifest.json` exists, so a process killed at any moment
leaves the previous committed checkpoint as the one to resume.

Fault points for the crash tests (PRETRAIN_FAULTS, see pretrain/faults.py), kill@STEP:RANK style:
save_point0 (training thread, after the snapshot), save_point1 (after the first file),
save_point2 (in the middle of the first file), save_point3 (all own files written, digests not),
save_point4 (after the digests), kill_in_save (rank 0: digests gathered, before the manifest),
save_point6 (rank 0: manifest written, `latest` not), save_point7 (rank 0: before pruning).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import digest, dsadapter, faults
from pretrain.checkpoint import store
from pretrain.checkpoint.snapshot import Recorder, Staging
from pretrain.errors import IO_ERRORS, UserError


def io_error_line(e: OSError, path, ckpt_dir: Path) -> str | None:
    """The one-line message for a known I/O error while writing `path`; None for other errors."""
    known = IO_ERRORS.get(getattr(e, "errno", None))
    if known is None:
        return None
    return f"{known[0]} writing {path}; {last_committed(ckpt_dir)}"


def last_committed(ckpt_dir: Path) -> str:
    try:
        tag = (ckpt_dir / "latest").read_text().strip()
    except OSError:
        tag = ""
    m = store.TAG_RE.match(tag)
    if m and (ckpt_dir / tag / store.MANIFEST).is_file():
        return f"the last committed checkpoint is step {int(m.group(1))} ({ckpt_dir / tag})"
    return f"no checkpoint has been committed in {ckpt_dir}"


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes the bytes on their way to disk. A large block is hashed on a
    helper thread while this thread writes it (both release the GIL), so the hash costs little
    more than the write; `write` returns only when both are done, as torch.save may reuse its buffer."""

    PARALLEL_BYTES = 1 << 20

    def __init__(self, f, on_write=None):
        self.f, self.hasher, self.size, self.on_write = f, digest.new(), 0, on_write
        self.error: OSError | None = None  # torch.save reports a failed write as its own RuntimeError
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")

    def writable(self):
        return True

    def write(self, b):
        mv = memoryview(b).cast("B")
        hashed = self._pool.submit(self.hasher.update, mv) if len(mv) >= self.PARALLEL_BYTES else None
        if hashed is None:
            self.hasher.update(mv)
        try:
            self.f.write(mv)
        except OSError as e:
            self.error = e
            raise
        finally:
            if hashed is not None:
                hashed.result()
        self.size += len(mv)
        if self.on_write:
            self.on_write()
        return len(mv)

    def close(self):
        self._pool.shutdown()
        super().close()


# ----------------------------------------------------------------------------- writer
class CheckpointWriter:
    WRITE_THREADS = 2  # files of one rank written at once (see _write_pts)
    # torch.save's zip CRC32 of every record: a second, slower checksum of the bytes the digest
    # covers, checked by unzip but not by torch.load. Off on the writer's threads (tools/bench_ckpt.py
    # --zip-crc turns it on to measure the digest's cost alone).
    ZIP_CRC32 = False

    def __init__(self, ckpt_dir: Path, keep_last: int, async_save: bool, timeout_s: float,
                 tokenizer_dir: Path | None = None, resumed_step: int | None = None):
        self.ckpt_dir, self.keep_last, self.async_save = Path(ckpt_dir), keep_last, async_save
        self.timeout_s, self.tokenizer_dir = timeout_s, tokenizer_dir
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._tag_dir: Path | None = None
        self._kept = resumed_step  # a committed step that is not rewritten (resumed from it, or saved already)
        self._staging = Staging(keep=async_save, live=not async_save)
        # This rank's files of the last save, not yet fsynced (see _write). After a resume, rank 0
        # covers the checkpoint it resumed from (on disk long ago, unless the restart was quick).
        self._unsynced: list[Path] = []
        if resumed_step is not None and self.rank == 0:
            tag = self.ckpt_dir / store.tag_for(resumed_step)
            self._unsynced = [*sorted(tag.rglob("*")), tag]

    # ------------------------------------------------------------------ training thread
    def save(self, engine, step: int, state: dict, durable: bool = False) -> Path:
        """Snapshot and start writing the checkpoint of `step` (collective). Returns its directory.
        `durable`: fsync it in this save (the run's last save); else the next save does (_write)."""
        self.wait()
        tag_dir = self.ckpt_dir / store.tag_for(step)
        problem, already = None, False
        if self.rank == 0:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                # (`latest` left behind by a kill between manifest and latest is repaired at resume)
                already = step == self._kept and store.verify(tag_dir, "sizes") is None
                if tag_dir.exists() and not already:
                    shutil.rmtree(tag_dir)  # a partial save of this step from a killed run
                tag_dir.mkdir(exist_ok=True)
            except OSError as e:
                problem = io_error_line(e, getattr(e, "filename", None) or tag_dir, self.ckpt_dir)
                if problem is None:
                    raise
        problem, already = store.broadcast_from_rank0((problem, already))
        if problem:
            raise UserError(problem)
        durable = durable or self.keep_last == 1  # no older checkpoint stays to fall back on
        if already:  # e.g. the final save right after a periodic one
            if durable:
                try:
                    self._sync(self._unsynced)
                except OSError as e:
                    raise UserError(io_error_line(e, e.filename, self.ckpt_dir) or f"fsync of {e.filename} failed: {e}")
                self._unsynced = []
            return tag_dir
        recorder = Recorder(self._staging)
        scripts: list[str] = []
        # DeepSpeed's recovery scripts are copied (and hashed) by the writer thread instead.
        with dsadapter.swap_checkpoint_engine(engine, recorder), \
                dsadapter.defer_recovery_scripts(engine, scripts.append):
            self._staging.begin()
            try:
                engine.save_checkpoint(str(self.ckpt_dir), tag=tag_dir.name, save_latest=False)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the copies off the device are complete
            finally:
                self._staging.end()
        files = [(Path(p), sd) for p, sd in recorder.files]
        recorder.files.clear()  # the writer thread alone holds the snapshots (and frees each once written)
        small = {f"rng_{self.rank:05d}.json": json.dumps(store.rng_state())}
        if self.rank == 0:
            small[store.STATE] = json.dumps(state, indent=1, sort_keys=True)
        faults.kill_if("save_point0", step, self.rank)
        self._tag_dir, self._error, self._kept = tag_dir, None, step
        self._thread = threading.Thread(target=self._write,
                                        args=(tag_dir, step, files, small, bool(scripts), durable),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        if not self.async_save:
            self.wait()
        return tag_dir

    def wait(self) -> None:
        """Wait for this rank's pending save (collective when one was pending); UserError if any rank's failed."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        errors = [None] * self.world
        dist.all_gather_object(errors, self._error)
        bad = next((e for e in errors if e), None)
        if bad:
            if self.rank == 0 and self._tag_dir is not None and not (self._tag_dir / store.MANIFEST).exists():
                shutil.rmtree(self._tag_dir, ignore_errors=True)  # never committed: free the space
            raise UserError(bad)

    # ------------------------------------------------------------------ background thread
    def _write(self, tag_dir: Path, step: int, files, small: dict, scripts: bool, durable: bool) -> None:
        """Durability is confirmed one save late, when it is nearly free: the manifest commits a
        save whose data may still be in the page cache (like DeepSpeed's own save), and each rank
        fsyncs its files of the previous save before publishing the digests of this one, so rank 0
        prunes older checkpoints only once a newer kept one is on disk. A kill leaves the page
        cache intact; after a power loss, a newest checkpoint whose data did not reach the disk
        fails the size check at resume, and the previous one is used. `durable` (the last save,
        or keep_last 1): this save is fsynced before its digests instead."""
        current = tag_dir
        try:
            self._sync(self._unsynced)
            self._unsynced = []
            own, digests = [path for path, _ in files], {}
            for path, entry in self._write_pts(files, step):
                digests[str(path.relative_to(tag_dir))] = entry
            for name, text in small.items():
                current = tag_dir / name
                digests[name] = _write_bytes(current, text.encode())
                own.append(current)
            if self.rank == 0:
                extras = self._rank0_extras(tag_dir, scripts)
                digests.update(extras)
                own += [tag_dir / name for name in extras]
            own += sorted({p.parent for p in own})  # their directory entries
            if durable:
                self._sync(own)
            else:
                self._unsynced = own
            faults.kill_if("save_point3", step, self.rank)
            current = tag_dir / f".digests_{self.rank:05d}.json"
            # Read once by rank 0's commit and deleted: renamed into place (never seen half
            # written) but not fsynced, which would wait for this rank's data to reach the disk.
            store.write_atomic(current, json.dumps({"files": digests}), durable=False)
            faults.kill_if("save_point4", step, self.rank)
            if self.rank == 0:
                current = tag_dir / store.MANIFEST
                self._commit(tag_dir, step, durable)
        except OSError as e:
            current = getattr(e, "filename", None) or current
            self._fail(tag_dir, io_error_line(e, current, self.ckpt_dir) or f"writing {current} failed: {e.strerror or e}")
        except UserError as e:
            self._fail(tag_dir, str(e))
        except BaseException as e:  # noqa: BLE001 - reported on the training thread
            self._fail(tag_dir, f"checkpoint save of step {step} failed: {type(e).__name__}: {e}")

    @staticmethod
    def _sync(paths: list[Path]) -> None:
        """fsync files and directories; those gone since (pruned) are skipped. An OSError names its path."""
        for path in paths:
            try:
                store.fsync_path(path)
            except FileNotFoundError:
                continue

    def _fail(self, tag_dir: Path, message: str) -> None:
        self._error = message
        try:  # tell rank 0's commit not to wait for this rank
            store.write_atomic(tag_dir / f".digests_{self.rank:05d}.json", json.dumps({"error": message}))
        except OSError:
            pass

    def _write_pts(self, files: list, step: int) -> list:
        """Write DeepSpeed's files of this rank, WRITE_THREADS at a time: rank 0 (a data-parallel
        rank 0 in general) writes the model states beside its optimizer partition, the others one
        partition, so writing its files one after another would make every save wait for rank 0.
        Each snapshot is dropped as soon as it is on disk. Returns [(path, digest entry)]."""

        def one(i: int, path: Path, sd) -> dict:
            try:
                entry = self._write_pt(path, sd, step, first=i == 0)
            except OSError as e:
                e.filename = e.filename or str(path)  # name the file whichever thread failed
                raise
            if i == 0:
                faults.kill_if("save_point1", step, self.rank)
            return entry

        with ThreadPoolExecutor(min(self.WRITE_THREADS, max(len(files), 1)), "checkpoint-write") as pool:
            jobs = [(path, pool.submit(one, i, path, sd)) for i, (path, sd) in enumerate(files)]
            files.clear()  # the pool's work items alone hold the snapshots now
            return [(path, job.result()) for path, job in jobs]

    def _write_pt(self, path: Path, sd, step: int, first: bool) -> dict:
        calls = [0]

        def mid_file():
            calls[0] += 1
            if first and calls[0] == 2:
                faults.kill_if("save_point2", step, self.rank)

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f, _HashingFile(f, mid_file) as w, _zip_crc32(self.ZIP_CRC32):
            try:
                torch.save(sd, w)
            except RuntimeError:
                if w.error is not None:
                    raise w.error from None
                raise
            f.flush()
        return {"size": w.size, digest.CHECKPOINT: w.hasher.hexdigest()}

    def _rank0_extras(self, tag_dir: Path, scripts: bool) -> dict:
        """The run's tokenizer copy and DeepSpeed's recovery scripts, with their digests."""
        out = {}
        if self.tokenizer_dir is not None and self.tokenizer_dir.is_dir():
            for f in sorted(self.tokenizer_dir.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    out[f"tokenizer/{f.name}"] = _write_bytes(tag_dir / "tokenizer" / f.name, f.read_bytes())
        if scripts:
            for src in dsadapter.recovery_script_files():
                out[src.name] = _write_bytes(tag_dir / src.name, src.read_bytes())
        return out

    def _commit(self, tag_dir: Path, step: int, durable: bool) -> None:
        files, deadline = {}, time.monotonic() + self.timeout_s
        for r in range(self.world):
            f = tag_dir / f".digests_{r:05d}.json"
            while not f.is_file():
                if time.monotonic() > deadline:
                    raise UserError(f"checkpoint of step {step}: rank {r} did not finish writing its files within "
                                    f"{self.timeout_s:.0f} s (parallel.timeout_minutes); {last_committed(self.ckpt_dir)}")
                time.sleep(0.02)
            got = json.loads(f.read_text())
            if got.get("error"):
                raise UserError(got["error"])
            files.update(got["files"])
        faults.kill_if("kill_in_save", step, 0)
        manifest = {"format": 2, "step": step, "files": dict(sorted(files.items()))}
        store.write_atomic(tag_dir / store.MANIFEST, json.dumps(manifest, indent=1), durable=durable)
        faults.kill_if("save_point6", step, 0)
        store.write_atomic(self.ckpt_dir / "latest", tag_dir.name + "\n", durable=durable)
        if not durable:
            self._unsynced += [tag_dir / store.MANIFEST, self.ckpt_dir / "latest", self.ckpt_dir]
        faults.kill_if("save_point7", step, 0)
        for r in range(self.world):
            (tag_dir / f".digests_{r:05d}.json").unlink(missing_ok=True)
        store.prune(self.ckpt_dir, self.keep_last)


def _zip_crc32(on: bool):
    """torch.save computes zip CRC32s (`on`) or not, on this thread only (torch's config is per
    thread); torch before 2.6 always computes them."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(getattr(config, "save", None), "compute_crc32"):
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": on})


def _write_bytes(path: Path, data: bytes) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return digest.bytes_entry(data)
