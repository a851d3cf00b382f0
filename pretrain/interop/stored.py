"""Tensors read in parts from the files that hold them, so that a rank reads its share only.

A `Stored` tensor has a shape and gives any block of it -- rows [r0, r1) x columns [c0, c1)
of its matrix view (`params.matrix_shape`: shape[0] x the rest) -- reading only the bytes of
those rows and columns:

* `Loaded`           -- a tensor already in memory (nothing read);
* `SafetensorsEntry` -- one tensor of a safetensors file (`safe_open(...).get_slice`);
* `Flat`             -- a tensor laid end to end over pieces of other tensors, e.g. a
  parameter's ZeRO partitions in the flat groups of the ranks' optimizer files
  (`pretrain.interop.ds_reader`), or zeros (a moment never stepped);
* `TensorParallel`   -- the full plain tensor of a parameter saved as tensor-parallel pieces
  (undoing the per-rank qkv regrouping, `spec.qkv_permutation`).

Files are opened through `Files`: a safetensors handle, or a torch file loaded with
`mmap=True`, kept until `release()`. Both map the file and copy nothing: a block handed out
is a view whose bytes are read when it is copied, and the pages read stay in the process's
memory while the file is mapped. So readers release them when they move on to the next layer
(`layer_key`; a block handed out keeps only its own file mapped, until it is freed).

`bytes_read()` counts the bytes of the blocks handed out (the tests' measure of a rank's share).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pretrain.checkpoint.read import Unreadable
from pretrain.model.params import matrix_shape, rule_of
from pretrain.parallel import spec

_read = 0  # bytes of the blocks handed out by this process (`bytes_read`)

Range = tuple[int, int]


def fill_piece(read, name: str, full: tuple, m, tp: int, tp_rank: int, start: int, out: torch.Tensor) -> None:
    """Elements [start, start + out.numel()) of tensor-parallel rank `tp_rank`'s flattened piece
    (`spec.local_piece`) of the full tensor `name` of shape `full` into `out` (1-D), from the
    blocks `read(rows, cols)` of the full tensor that hold them (`spec.local_blocks`): a ZeRO-3
    partition reads its own rows (whole at its two ends), a tensor-parallel piece its slice."""
    blocks, skip = spec.local_blocks(name, full, m, tp, tp_rank, start, start + out.numel())
    at = -skip  # where the next block starts in `out`
    for rows, cols in blocks:
        block = read(rows, cols).reshape(-1)
        a, b = max(at, 0), min(at + block.numel(), out.numel())
        out[a:b].copy_(block[a - at:b - at])
        at += block.numel()


def layer_key(name: str) -> str:
    """The layer of plain parameter `name` ('embed', a block's index, 'head'): readers keep a
    layer's files open while they read its tensors, and release them when the next layer starts."""
    head, _, rest = name.partition(".")
    return rest.partition(".")[0] if head == "blocks" else head


def bytes_read() -> int:
    """Bytes of stored tensors this process has read so far (blocks of files, not tensors already in memory)."""
    return _read


def _count(t: torch.Tensor) -> torch.Tensor:
    global _read
    _read += t.numel() * t.element_size()
    return t


class Files:
    """Files opened for reading parts of their tensors, each opened once until `release`."""

    def __init__(self):
        self._open: dict[tuple, object] = {}

    def safetensors(self, path: Path):
        key = ("st", str(path))
        if key not in self._open:
            from safetensors import SafetensorError, safe_open

            try:
                self._open[key] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise Unreadable(path, f"not a readable safetensors file ({e})") from None
        return self._open[key]

    def torch(self, path: Path):
        """A torch file (a pickle: trusted checkpoints only) loaded with its tensors mapped, not read."""
        key = ("pt", str(path))
        if key not in self._open:
            if not Path(path).is_file():
                raise Unreadable(path, "missing; the checkpoint is incomplete")
            try:
                self._open[key] = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            except Exception as e:  # noqa: BLE001 -- a damaged or foreign file raises anything the unpickler can
                raise Unreadable(path, f"cannot be loaded ({type(e).__name__}: {e}); the file is damaged or "
                                       "not from pretrain-train") from None
        return self._open[key]

    def get(self, path: Path, *keys):
        """The object at `keys` in the torch file at `path`; Unreadable naming the file if it has none."""
        obj = self.torch(path)
        try:
            for k in keys:
                obj = obj[k]
        except (KeyError, IndexError, TypeError):
            raise Unreadable(path, f"holds no {'/'.join(map(str, keys))}: not a checkpoint file of pretrain-train "
                                   "(or written by an older DeepSpeed)") from None
        return obj

    def release(self) -> None:
        """Drop the open files (a block still held keeps its own file mapped until it is freed)."""
        self._open.clear()


class Stored:
    """A tensor of `shape` in files; `block` reads rows x columns of its matrix view."""

    shape: tuple

    def block(self, rows: Range, cols: Range) -> torch.Tensor:
        raise NotImplementedError

    def full(self) -> torch.Tensor:
        r, c = matrix_shape(self.shape)
        return self.block((0, r), (0, c)).reshape(self.shape)


class Loaded(Stored):
    """A tensor already in memory."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape = t, tuple(t.shape)

    def block(self, rows, cols):
        return self.t.reshape(matrix_shape(self.shape))[rows[0]:rows[1], cols[0]:cols[1]]


class SafetensorsEntry(Stored):
    """Tensor `name` of a safetensors file."""

    def __init__(self, files: Files, path: Path, name: str, shape):
        self.files, self.path, self.name, self.shape = files, Path(path), name, tuple(shape)

    def block(self, rows, cols):
        (r0, r1), (c0, c1) = rows, cols
        part = self.files.safetensors(self.path).get_slice(self.name)
        if len(self.shape) == 2:
            t = part[r0:r1, c0:c1]
        else:  # a vector (a matrix of one column), or more dimensions: whole rows, then the columns
            t = part[r0:r1].reshape(r1 - r0, -1)[:, c0:c1]
        return _count(t)


class Flat(Stored):
    """A tensor of `shape` whose flattened values are `segments` end to end: each
    (path, keys, offset, numel) is `numel` values from `offset` on in the flattened tensor
    found by indexing the torch file at `path` with `keys`; path None: zeros."""

    def __init__(self, files: Files, shape, segments: list, dtype=torch.float32):
        self.files, self.shape, self.segments, self.dtype = files, tuple(shape), segments, dtype
        have = sum(s[3] for s in segments)
        if have != torch.Size(self.shape).numel():
            raise ValueError(f"segments of {have} values for a tensor of shape {self.shape}")

    def _tensor(self, path, keys) -> torch.Tensor:
        return self.files.get(path, *keys).reshape(-1)

    def values(self, a: int, b: int) -> list[torch.Tensor]:
        """Flattened values [a, b) as views of the files, segment by segment."""
        parts, at = [], 0
        for path, keys, offset, numel in self.segments:
            x, y = max(a, at), min(b, at + numel)
            if x < y:
                parts.append(torch.zeros(y - x, dtype=self.dtype) if path is None
                             else self._tensor(path, keys).narrow(0, offset + x - at, y - x))
            at += numel
        return parts

    def block(self, rows, cols):
        (r0, r1), (c0, c1) = rows, cols
        width = matrix_shape(self.shape)[1]
        parts = self.values(r0 * width, r1 * width)
        if len(parts) == 1:  # a view: only the block's own bytes are read when it is copied
            return _count(parts[0].view(r1 - r0, width)[:, c0:c1])
        return _count(torch.cat(parts)).view(r1 - r0, width)[:, c0:c1]  # rows across a partition edge


class TensorParallel(Stored):
    """The full plain tensor `name` of model `m` from its tensor-parallel pieces (rank order):
    the inverse of `spec.local_piece`, read block by block from the pieces that hold it."""

    def __init__(self, name: str, pieces: list[Stored], m):
        self.name, self.pieces = name, pieces
        self.shape = spec.full_shape(name, pieces[0].shape, len(pieces))
        self.rule = rule_of(name)
        self._where: Optional[torch.Tensor] = None
        if self.rule.regroup and len(pieces) > 1:  # full row r sits at row where[r] of the regrouped tensor
            perm = spec.qkv_permutation(m.n_head, m.n_kv_head or m.n_head, m.d_model // m.n_head, len(pieces))
            self._where = torch.empty_like(perm)
            self._where[perm] = torch.arange(len(perm))

    def block(self, rows, cols):
        (r0, r1), (c0, c1) = rows, cols
        tp, dim = len(self.pieces), self.rule.tp_dim
        if tp == 1 or dim is None:
            return self.pieces[0].block(rows, cols)
        R, C = matrix_shape(self.shape)
        parts = []
        if dim == 1:  # columns: each piece holds C / tp of them
            w = C // tp
            for r in range(c0 // w, -(-c1 // w)):
                parts.append(self.pieces[r].block(rows, (max(c0, r * w) - r * w, min(c1, (r + 1) * w) - r * w)))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        per = R // tp
        at = torch.arange(r0, r1) if self._where is None else self._where[r0:r1]
        runs = []  # [piece, first local row, rows]: consecutive rows of one piece joined
        for pos in at.tolist():
            piece, row = divmod(pos, per)
            if runs and runs[-1][0] == piece and runs[-1][1] + runs[-1][2] == row:
                runs[-1][2] += 1
            else:
                runs.append([piece, row, 1])
        parts = [self.pieces[p].block((row, row + n), cols) for p, row, n in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
