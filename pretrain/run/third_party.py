"""Known-harmless behaviour of DeepSpeed and torch that we switch off, each with the reason.

`quiet_third_party()` runs once per training process, before `deepspeed.init_distributed`.
Everything here is narrow on purpose: one message or one op, matched exactly, so that real
warnings (ours or the libraries') still reach the user. tests/test_warnings.py counts what
is left in a run's output.
"""
from __future__ import annotations

import logging
import warnings

from pretrain import dsadapter

# DeepSpeed's messages we drop, and why each is harmless for this project.
_DEEPSPEED_HARMLESS = (
    # engine._do_optimizer_sanity_check: ZeRO checks `type(optimizer)` against a list that has
    # torch.optim.AdamW. Ours is GuardedAdamW, an AdamW subclass whose step() is AdamW's after a
    # finite-gradient check, so the list misses it by name only (the config already sets
    # zero_allow_untested_optimizer, and tests/test_train_zero.py trains it at every stage).
    "You are using ZeRO with an untested optimizer",
)


class _DropMessages(logging.Filter):
    def __init__(self, needles):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(n in msg for n in self.needles)


_FILTER = _DropMessages(_DEEPSPEED_HARMLESS)

# Python warnings we drop: (category, regex matched at the start of the message, why harmless).
_WARNINGS_HARMLESS = (
    # torch 2.13 renamed these collectives; the old names, which DeepSpeed 0.19.8's ZeRO calls,
    # are `@deprecated` wrappers whose whole body is a call of the new one. One line per call.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    # DeepSpeed's pipeline sends activations with an in-place dist.broadcast from the sending
    # rank, which leaves the tensor unchanged, so the backward pass through it is the identity.
    # tests/test_parallel_train.py::test_layout_matches_single_process[pp2] shows it: the
    # pipelined losses and gradient norms equal the single-process ones, step by step.
    (UserWarning, r"c10d::broadcast_: an autograd kernel was not registered"),
)


def quiet_third_party() -> None:
    """Drop the known-harmless third-party messages listed in this module (idempotent)."""
    ds_logger = logging.getLogger("DeepSpeed")
    if _FILTER not in ds_logger.filters:
        ds_logger.addFilter(_FILTER)
    for category, message in _WARNINGS_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
    dsadapter.skip_cpu_shm_comm_build()  # DeepSpeed's unused C++ shared-memory op on CPU
