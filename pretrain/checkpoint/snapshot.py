"""The training thread's part of a checkpoint save: DeepSpeed's `save_checkpoint` runs with
`Recorder` as its checkpoint engine, which keeps a CPU snapshot of every state dict DeepSpeed
asks it to save instead of writing it; `pretrain.checkpoint.writer` writes them afterwards."""
from __future__ import annotations

import torch

from pretrain import dsadapter


class Staging:
    """CPU buffers for the snapshot. With `keep` (async saves) the buffers of one save are reused by
    the next (same tensors in the same order): copying into memory already faulted in is several
    times faster than allocating it afresh; the price is one resident copy of the saved state.
    With `live` (synchronous saves: training waits until the files are written) every CPU tensor
    is written from the live state, with no copy, and DeepSpeed clones what it clones for its own
    torch.save engine (`Recorder.preserves_storage_sharing`): the files hold the same storages as
    DeepSpeed's own save (ZeRO's flat buffer written once, behind the module's views)."""

    def __init__(self, keep: bool, live: bool = False):
        self.keep, self.live, self.old, self.new, self.reuse = keep, live, [], [], iter(())

    def begin(self) -> None:
        self.reuse, self.new = iter(self.old if self.keep else ()), []

    def end(self) -> None:
        self.old = self.new if self.keep else []
        self.new, self.reuse = [], iter(())

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if self.live and t.device.type == "cpu":
            return t.detach()
        buf = next(self.reuse, None)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            self.reuse = iter(())  # out of step: fresh buffers from here on
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        self.new.append(buf)
        return buf


def snapshot(obj, staging: Staging):
    """`obj` with each tensor passed through `staging.copy`: a CPU copy that shares nothing with
    the live training state, or, in a live (synchronous) save, the CPU tensor itself."""
    if isinstance(obj, torch.Tensor):
        return staging.copy(obj)
    if isinstance(obj, dict):
        items = [(k, snapshot(v, staging)) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except TypeError:
            return dict(items)
    if isinstance(obj, list):
        return [snapshot(v, staging) for v in obj]
    if isinstance(obj, torch.Size):
        return obj  # immutable; zero_to_fp32 calls .numel() on ZeRO-3's param_shapes
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, staging) for v in obj)
    return obj  # numbers, strings, config objects: not changed by training


class Recorder(dsadapter.checkpoint_engine_base()):
    """A DeepSpeed checkpoint engine that keeps snapshots of what it is asked to save."""

    def __init__(self, staging: Staging):
        super().__init__()
        self.name, self.staging = "pretrain-recorder", staging
        self.files: list[tuple[str, object]] = []

    def create(self, info):
        pass

    def save(self, state_dict, path: str):
        self.files.append((path, snapshot(state_dict, self.staging)))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info):
        return True

    def preserves_storage_sharing(self):
        # A snapshot (async) is a copy already; a live save (sync) gets DeepSpeed's own clones.
        return self.staging.live
