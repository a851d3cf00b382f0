"""Run the trainer in this process and record, per training step, everything that makes the host
wait for the device: device-to-host reads, synchronizations and blocking host-to-device copies.

    python tests/sync_probe.py OUT_PREFIX TRAINER_ARGS...      # writes OUT_PREFIX.rank{R}.json
    python tests/sync_probe.py --summary OUT_PREFIX INTERVAL MAX_STEPS   # per step, by kind (tools/gpu_suite.sh)

Counted (each event: [steps completed before it, kind, caller file:line, first caller outside
torch and outside the caller's file]):

* reads: torch.Tensor.item / __bool__ / __float__ / __int__ / cpu / tolist / numpy (kind: the
  method's name), each a copy from the device to the host on a GPU;
* synchronizations (kind "sync:<what>"): DeepSpeed's accelerator `synchronize` (the class of
  `get_accelerator()`, CPU's included: DeepSpeed calls it on CPU too, e.g. its throughput
  timer), torch.cuda.synchronize, torch.accelerator.synchronize and torch.cuda's
  Stream/Event.synchronize -- patched to count even where they do nothing;
* blocking host-to-device copies (kind "h2d:<how>"): `Tensor.to` / `cuda` / `copy_` of a host
  tensor to the device without non_blocking (or, on a GPU, with it from unpinned memory), and
  `torch.tensor` / `torch.as_tensor` of host data onto a named device. On a GPU a host tensor is
  one in CPU memory moved to a CUDA device. On CPU, where both are CPU memory, host tensors are
  tracked: those made by torch.from_numpy, torch.tensor / as_tensor without a device and
  Tensor.cpu / pin_memory, and their views and clones (indexing, clone, detach, contiguous);
  a move to a named device with non_blocking makes a tensor a device one (on CPU: the same
  object). So a copy that on a GPU would block shows here at the same call.

On CUDA the probe also turns on torch's sync debug mode and counts its warnings (kind
"sync:cuda-debug": every synchronizing CUDA call, from C++).

Steps are counted through `faults.after_step`.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import sys
import warnings
import weakref

import torch

READS = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")
VIEWS = ("__getitem__", "clone", "detach", "contiguous")  # a host tensor's views and copies stay host tensors
_TORCH = f"{os.sep}torch{os.sep}"


class Probe:
    def __init__(self):
        self.events: list = []
        self.done = 0  # steps completed
        self._host: dict = {}  # id -> weakref of a host tensor (CPU: tracked, see the module docstring)
        self._undo: list = []
        self._inside = 0  # inside a counted call: what it does (torch.cuda.synchronize, a debug warning) counts once
        self._gpu = torch.cuda.is_available()

    # ------------------------------------------------------------------ recording
    def record(self, kind: str, frame) -> None:
        if self._inside:
            return
        g, here = frame, frame.f_code.co_filename
        while g.f_back is not None and (_TORCH in g.f_code.co_filename or g.f_code.co_filename == here):
            g = g.f_back  # the first caller outside torch and outside the reading function's file
        self.events.append([self.done, kind, f"{frame.f_code.co_filename}:{frame.f_lineno}",
                            f"{g.f_code.co_filename}:{g.f_lineno}"])

    def counted(self, kind: str, orig, *args, **kwargs):
        """orig(*args, **kwargs), recorded as `kind` at the caller of the patched function."""
        self.record(kind, sys._getframe(2))
        self._inside += 1
        try:
            return orig(*args, **kwargs)
        finally:
            self._inside -= 1

    def _patch(self, owner, name: str, make) -> None:
        if not hasattr(owner, name):
            return
        own = vars(owner)
        self._undo.append((owner, name, own[name] if name in own else None))
        setattr(owner, name, make(getattr(owner, name)))

    # ------------------------------------------------------------------ host tensors
    def is_host(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self._gpu:
            return t.device.type == "cpu"
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def mark(self, t, host: bool):
        if isinstance(t, torch.Tensor) and not self._gpu:
            if host:
                self._host[id(t)] = weakref.ref(t)
            else:
                self._host.pop(id(t), None)
        return t

    def on_device(self, dev) -> bool:
        """Whether a named device is the accelerator's (on CPU: every named device is)."""
        return dev is not None and (torch.device(dev).type != "cpu" or not self._gpu)

    def blocking(self, src, non_blocking: bool) -> bool:
        """Whether a copy out of host tensor `src` blocks the host: not non_blocking, or (GPU) unpinned."""
        return not non_blocking or (self._gpu and not src.is_pinned())

    # ------------------------------------------------------------------ patches
    def install(self) -> None:
        probe, T = self, torch.Tensor

        for name in READS:
            def read(orig, name=name):
                def wrapped(self, *args, **kwargs):
                    out = probe.counted(name, orig, self, *args, **kwargs)
                    return probe.mark(out, True) if name == "cpu" else out
                return wrapped
            self._patch(T, name, read)

        def view(orig):
            def wrapped(self, *args, **kwargs):
                out = orig(self, *args, **kwargs)
                return probe.mark(out, True) if probe.is_host(self) else out
            return wrapped
        for name in VIEWS + ("pin_memory",):
            self._patch(T, name, view)

        def to(orig):
            def wrapped(self, *args, **kwargs):
                dev = kwargs.get("device")
                if dev is None and args and isinstance(args[0], (str, int, torch.device, torch.Tensor)):
                    dev = args[0].device if isinstance(args[0], torch.Tensor) else args[0]
                nb = kwargs.get("non_blocking", next((a for a in args if isinstance(a, bool)), False))
                moved = probe.on_device(dev)
                if moved and probe.is_host(self) and probe.blocking(self, nb):
                    out = probe.counted("h2d:to", orig, self, *args, **kwargs)
                elif probe._gpu and dev is not None and torch.device(dev).type == "cpu" and self.device.type != "cpu":
                    out = probe.counted("d2h:to", orig, self, *args, **kwargs)
                else:
                    out = orig(self, *args, **kwargs)
                return probe.mark(out, False) if moved else out  # on the device now (CPU: maybe `self`)
            return wrapped
        self._patch(T, "to", to)

        def cuda(orig):
            def wrapped(self, *args, **kwargs):
                if probe.is_host(self) and probe.blocking(self, kwargs.get("non_blocking", False)):
                    return probe.counted("h2d:cuda", orig, self, *args, **kwargs)
                return orig(self, *args, **kwargs)
            return wrapped
        self._patch(T, "cuda", cuda)

        def copy_(orig):
            def wrapped(self, src, non_blocking=False):
                if probe.is_host(src) and not probe.is_host(self) and probe.blocking(src, non_blocking):
                    return probe.counted("h2d:copy_", orig, self, src, non_blocking)
                return orig(self, src, non_blocking)
            return wrapped
        self._patch(T, "copy_", copy_)

        def make(name):
            def patcher(orig):
                def wrapped(data, *args, **kwargs):
                    host_data = not isinstance(data, torch.Tensor) or probe.is_host(data)
                    if probe.on_device(kwargs.get("device")) and host_data:
                        return probe.counted(f"h2d:{name}", orig, data, *args, **kwargs)
                    out = orig(data, *args, **kwargs)
                    return probe.mark(out, True) if host_data and kwargs.get("device") is None else out
                return wrapped
            return patcher
        self._patch(torch, "tensor", make("tensor"))
        self._patch(torch, "as_tensor", make("as_tensor"))

        def from_numpy(orig):
            def wrapped(*args, **kwargs):
                return probe.mark(orig(*args, **kwargs), True)
            return wrapped
        self._patch(torch, "from_numpy", from_numpy)

        def sync(kind):
            def patcher(orig):
                def wrapped(*args, **kwargs):
                    return probe.counted(f"sync:{kind}", orig, *args, **kwargs)
                return wrapped
            return patcher
        from deepspeed.accelerator import get_accelerator

        self._patch(type(get_accelerator()), "synchronize", sync("accelerator"))
        self._patch(torch.cuda, "synchronize", sync("torch.cuda"))
        if hasattr(torch, "accelerator"):
            self._patch(torch.accelerator, "synchronize", sync("torch.accelerator"))
        self._patch(torch.cuda.Stream, "synchronize", sync("cuda.Stream"))
        self._patch(torch.cuda.Event, "synchronize", sync("cuda.Event"))
        if self._gpu:
            self._cuda_debug()

    def _cuda_debug(self) -> None:
        """torch's sync debug mode: a warning at every synchronizing CUDA call, counted here."""
        probe, show = self, warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" not in str(message):
                return show(message, category, filename, lineno, file, line)
            f = sys._getframe(1)
            while f.f_back is not None and f.f_code.co_filename == warnings.__file__:
                f = f.f_back
            probe.record("sync:cuda-debug", f)
            return None

        warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")
        self._patch(warnings, "showwarning", lambda orig: showwarning)
        torch.cuda.set_sync_debug_mode("warn")

    def uninstall(self) -> None:
        if self._gpu:
            torch.cuda.set_sync_debug_mode("default")
        while self._undo:
            owner, name, orig = self._undo.pop()
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)


@contextlib.contextmanager
def counting():
    """In this process: the probe's patches installed; yields the list of events."""
    probe = Probe()
    probe.install()
    try:
        yield probe.events
    finally:
        probe.uninstall()


def per_step(events: list, interval: int, max_steps: int, logging: bool = False) -> dict:
    """{kind: count per step} over the steps 2..max_steps - 1 (the first sets up, the last logs and
    saves) that do not log (`logging`: that do), an event's step being its steps completed + 1."""
    steps = [s for s in range(2, max_steps) if (s % interval == 0) == logging]
    counts: dict = {}
    for done, kind, *_ in events:
        if done + 1 in steps:
            counts[kind] = counts.get(kind, 0) + 1
    return {k: v / max(len(steps), 1) for k, v in sorted(counts.items())}


def summary(prefix: str, interval: int, max_steps: int) -> int:
    """Print reads, synchronizations and blocking copies per step, per rank: at steps that do not
    log (the target: none) and at logging steps."""
    from pathlib import Path

    files = sorted(Path(prefix).parent.glob(Path(prefix).name + ".rank*.json"))
    if not files:
        print(f"sync_probe: no {prefix}.rank*.json")
        return 1
    for f in files:
        events = json.loads(f.read_text())
        rank = f.name.rsplit(".rank", 1)[1].split(".")[0]
        for logging in (False, True):
            counts = per_step(events, interval, max_steps, logging)
            groups = {"reads": sum(v for k, v in counts.items() if k in READS),
                      "synchronizations": sum(v for k, v in counts.items() if k.startswith("sync:")),
                      "blocking copies": sum(v for k, v in counts.items() if k.startswith(("h2d:", "d2h:")))}
            print(f"SYNCS rank {rank}, per {'logging' if logging else 'non-logging'} step: "
                  + ", ".join(f"{k} {v:g}" for k, v in groups.items())
                  + (f" ({', '.join(f'{k} {v:g}' for k, v in counts.items())})" if counts else ""))
    return 0


def main() -> int:
    if sys.argv[1] == "--summary":
        return summary(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    from pretrain import faults

    prefix = sys.argv[1]
    sys.argv = ["pretrain.train"] + sys.argv[2:]
    probe = Probe()
    probe.install()

    def after_step(orig=faults.after_step):
        probe.done += 1
        orig()

    faults.after_step = after_step

    def write():
        with open(f"{prefix}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(probe.events, f)

    atexit.register(write)  # the trainer ends with os._exit after its atexit handlers (pretrain.train.leave)
    runpy.run_module("pretrain.train", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
