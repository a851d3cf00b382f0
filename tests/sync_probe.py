"""Run the trainer in this process and record every device-to-host read, per training step.

    python tests/sync_probe.py OUT_PREFIX TRAINER_ARGS...

Patches torch.Tensor.item / __bool__ / __float__ / __int__ / cpu / tolist / numpy (each a copy
from the device to the host on a GPU) and counts completed steps through `faults.after_step`.
Writes OUT_PREFIX.rank{R}.json: [[steps completed before the read, method, caller file:line, first caller outside torch
and outside the caller's file], ...].
"""
import atexit
import json
import os
import runpy
import sys

import torch

from pretrain import faults

READS = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")
events, done = [], [0]


def _patch(name):
    orig = getattr(torch.Tensor, name)

    def wrapped(self, *args, **kwargs):
        f = g = sys._getframe(1)
        while g.f_back is not None and (f"{os.sep}torch{os.sep}" in g.f_code.co_filename
                                        or g.f_code.co_filename == f.f_code.co_filename):
            g = g.f_back  # the first caller outside torch and outside the reading function's file
        events.append([done[0], name, f"{f.f_code.co_filename}:{f.f_lineno}",
                       f"{g.f_code.co_filename}:{g.f_lineno}"])
        return orig(self, *args, **kwargs)

    setattr(torch.Tensor, name, wrapped)


def _after_step(orig=faults.after_step):
    done[0] += 1
    orig()


def main():
    prefix = sys.argv[1]
    sys.argv = ["pretrain.train"] + sys.argv[2:]
    for name in READS:
        _patch(name)
    faults.after_step = _after_step

    def write():
        with open(f"{prefix}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(events, f)

    atexit.register(write)  # the trainer ends with os._exit after its atexit handlers (pretrain.train.leave)
    runpy.run_module("pretrain.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
