"""What a process sees when it starts: tests/test_warm.py runs this module fresh and forked
(tests/warm.py) and compares the two outputs line by line."""
import atexit
import os
import signal
import sys

import torch

from pretrain import faults  # reads PRETRAIN_FAULTS when imported

print("name", __name__)
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("env", os.environ.get("PROBE"), os.environ.get("OMP_NUM_THREADS"), "HOME" in os.environ)
print("faults", faults.EVENTS)
print("handlers", {s.name: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                                           signal.SIGCHLD, signal.SIGPIPE)})
print("threads", torch.get_num_threads())
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "raise":
    raise ValueError("from the probe")
sys.exit(int(sys.argv[1]))
