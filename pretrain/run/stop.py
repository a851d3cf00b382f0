"""Stop requests: SIGTERM and SIGUSR1 (SLURM's warning before the time limit) ask the
trainer for a checkpoint and a clean exit with status 0.

`install()` is the first thing the trainer does (`python -m pretrain.train` installs it
even before importing torch, which takes seconds). The first signal sets `requested`;
from then on both signals are ignored (SIG_IGN) until the process ends: a scheduler and
a launcher that both signal, milliseconds apart, must not turn a clean, saved stop into
a kill. SIG_IGN also survives interpreter shutdown, where Python puts its own handlers
back to the default action.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        for sig in SIGNALS:  # absorb the rest until exit
            signal.signal(sig, signal.SIG_IGN)


_STOP: StopRequest | None = None


def install() -> StopRequest:
    """The process's stop request, with its handlers installed on the first call (main thread)."""
    global _STOP
    if _STOP is None:
        _STOP = StopRequest()
    return _STOP
