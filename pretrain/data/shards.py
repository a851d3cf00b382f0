"""Crash-safe shard writing for pretrain-prep.

Each split has a `ShardWriter` appending sequences to `{split}_{NNNNN}.bin.tmp`. A shard is
closed once adding the next sequence would pass `shard_size` tokens: its index is written to
`.idx.tmp`, both files are fsynced, hashed and renamed (`.bin` first, then `.idx`), so a
final name always means a complete file. `state()` / `restore()` capture the open shards
(length of the temp `.bin` and its sequence sizes) for the resume journal.
"""
from __future__ import annotations

import os
import re

import numpy as np

from pretrain.data.indexed import encode_index, sha256_file
from pretrain.data.manifest import fsync_dir

OUR_FILES = re.compile(r"^(train|valid|test)_\d{5}\.(bin|idx)(\.tmp)?$")


class RestoreFailed(Exception):
    pass


class ShardWriter:
    def __init__(self, out_dir: str, split: str, dtype: np.dtype, shard_size: int):
        self.out_dir, self.split = out_dir, split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_size = shard_size
        self.index = 0
        self.fh = None
        self.sizes: list[int] = []
        self.tokens = 0
        self.text_bytes = 0
        self.done: list[dict] = []

    def name(self, index=None) -> str:
        return f"{self.split}_{self.index if index is None else index:05d}"

    def _path(self, ext: str, tmp: bool = True) -> str:
        return os.path.join(self.out_dir, f"{self.name()}.{ext}" + (".tmp" if tmp else ""))

    def add(self, tokens: np.ndarray, text_bytes: int) -> bool:
        """Append one sequence; True when this closed a completed shard first."""
        closed = False
        if self.sizes and self.tokens + tokens.size > self.shard_size:
            self.close_shard()
            closed = True
        if self.fh is None:
            self.fh = open(self._path("bin"), "wb")
        self.fh.write(tokens.tobytes())
        self.sizes.append(int(tokens.size))
        self.tokens += int(tokens.size)
        self.text_bytes += int(text_bytes)
        return closed

    def close_shard(self) -> None:
        bin_tmp, idx_tmp = self._path("bin"), self._path("idx")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        with open(idx_tmp, "wb") as f:
            f.write(encode_index(np.asarray(self.sizes, dtype=np.int64), self.dtype))
            f.flush()
            os.fsync(f.fileno())
        info = {
            "name": self.name(),
            "documents": len(self.sizes),
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
            "bin_bytes": os.path.getsize(bin_tmp),
            "idx_bytes": os.path.getsize(idx_tmp),
            "bin_sha256": sha256_file(bin_tmp),
            "idx_sha256": sha256_file(idx_tmp),
        }
        os.replace(bin_tmp, self._path("bin", tmp=False))
        os.replace(idx_tmp, self._path("idx", tmp=False))
        fsync_dir(self.out_dir)
        self.done.append(info)
        self.index += 1
        self.sizes, self.tokens, self.text_bytes = [], 0, 0

    def finish(self) -> None:
        if self.sizes:
            self.close_shard()

    def state(self) -> dict:
        """The open shard, made durable (fsync), for the journal."""
        nbytes = 0
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            nbytes = self.fh.tell()
        return {"index": self.index, "sizes": list(self.sizes), "text_bytes": self.text_bytes,
                "bin_tmp_bytes": nbytes, "done": list(self.done)}

    def restore(self, st: dict) -> None:
        """Continue from a journal state; RestoreFailed if the files on disk do not match it."""
        for d in st["done"]:
            for ext in ("bin", "idx"):
                p = os.path.join(self.out_dir, f"{d['name']}.{ext}")
                if not os.path.isfile(p) or os.path.getsize(p) != d[f"{ext}_bytes"]:
                    raise RestoreFailed(f"{p} missing or of the wrong size")
        self.done = [dict(d) for d in st["done"]]
        self.index = int(st["index"])
        self.sizes = [int(x) for x in st["sizes"]]
        self.tokens = sum(self.sizes)
        self.text_bytes = int(st["text_bytes"])
        want = int(st["bin_tmp_bytes"])
        if want != self.tokens * self.dtype.itemsize:
            raise RestoreFailed("journal sizes disagree")
        tmp, final = self._path("bin"), self._path("bin", tmp=False)
        if self.sizes and not os.path.isfile(tmp) and os.path.isfile(final) and os.path.getsize(final) >= want:
            os.replace(final, tmp)  # completed after the journal: its first `want` bytes are the open shard
        # shards this run will write again may exist from after the journal: remove them
        for name in os.listdir(self.out_dir):
            m = re.match(rf"^{self.split}_(\d{{5}})\.(bin|idx)(\.tmp)?$", name)
            if m and int(m.group(1)) >= self.index and not (int(m.group(1)) == self.index and
                                                            m.group(2) == "bin" and m.group(3)):
                os.remove(os.path.join(self.out_dir, name))
        if self.sizes:
            if not os.path.isfile(tmp) or os.path.getsize(tmp) < want:
                raise RestoreFailed(f"{tmp} missing or shorter than the journal says")
            self.fh = open(tmp, "r+b")
            self.fh.truncate(want)
            self.fh.seek(want)
        elif os.path.exists(tmp):
            os.remove(tmp)


def clean_outputs(out_dir: str, also_manifest: bool = False, keep_tokenizer: bool = False) -> None:
    """Remove everything pretrain-prep writes into `out_dir` (never other files)."""
    names = {".prep_state.json"} | (set() if keep_tokenizer else {"tokenizer.json", "tokenizer.tiktoken"})
    if also_manifest:
        names.add("manifest.json")
    for name in os.listdir(out_dir):
        if OUR_FILES.match(name) or name in names or name.startswith(".prep_state.json.tmp"):
            os.remove(os.path.join(out_dir, name))


def new_stats(split_names) -> dict:
    from pretrain.data.manifest import BAD_KINDS

    return {"documents": 0, "sequences": 0, "tokens": 0, "text_bytes": 0, "input_bytes": 0, "documents_split": 0,
            "bad": {k: 0 for k in BAD_KINDS}, "split_docs": {n: 0 for n in split_names}}


class Outputs:
    """The writers of all splits plus the running statistics; what the resume journal captures."""

    def __init__(self, out_dir: str, fractions: list[float], dtype, shard_size: int):
        from pretrain.data.manifest import SPLITS

        self.names = SPLITS
        self.fractions = fractions
        self.writers = {i: ShardWriter(out_dir, SPLITS[i], dtype, shard_size) for i, f in enumerate(fractions) if f > 0}
        self.stats = new_stats([w.split for w in self.writers.values()])
        self.cur_split = 0  # split of the last sequence: continuation pieces of an enormous document follow it

    def consume(self, tokens, lengths, splits, nbytes, flags, progress: int) -> bool:
        """Write one chunk's sequences; True if a shard was completed."""
        st, closed, off = self.stats, False, 0
        for k in range(len(lengths)):
            n = int(lengths[k])
            if splits[k] >= 0:
                self.cur_split = int(splits[k])
            if flags[k] & 1:
                st["documents"] += 1
                st["split_docs"][self.names[self.cur_split]] += 1
                if not flags[k] & 2:
                    st["documents_split"] += 1
            closed |= self.writers[self.cur_split].add(tokens[off:off + n], int(nbytes[k]))
            off += n
        st["sequences"] += len(lengths)
        st["tokens"] += off
        st["text_bytes"] += int(np.sum(nbytes))
        st["input_bytes"] += int(progress)
        return closed

    def state(self) -> dict:
        return {"cur_split": self.cur_split, "stats": self.stats,
                "writers": {w.split: w.state() for w in self.writers.values()}}

    def restore(self, st: dict) -> None:
        try:
            for w in self.writers.values():
                w.restore(st["writers"][w.split])
            self.stats = st["stats"]
            self.cur_split = int(st["cur_split"])
        except (KeyError, TypeError, ValueError) as e:
            raise RestoreFailed(f"malformed journal ({e})") from None

    def close_files(self) -> None:
        for w in self.writers.values():
            if w.fh is not None:
                w.fh.close()
                w.fh = None

    def finish(self) -> dict:
        """Close the last shards; the manifest's 'splits' object."""
        out = {}
        for i, w in self.writers.items():
            w.finish()
            sh = w.done
            out[w.split] = {
                "fraction": self.fractions[i],
                "source_documents": self.stats["split_docs"].get(w.split, 0),
                "documents": sum(s["documents"] for s in sh),
                "tokens": sum(s["tokens"] for s in sh),
                "text_bytes": sum(s["text_bytes"] for s in sh),
                "bin_bytes": sum(s["bin_bytes"] for s in sh),
                "shards": sh,
            }
        return out
