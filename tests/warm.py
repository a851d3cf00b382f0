"""`python -m MODULE ARGS` as a process forked from a warm interpreter.

A fresh interpreter spends seconds of CPU importing torch, torch._dynamo and DeepSpeed before
the trainer does anything (docs/PERFORMANCE.md, "Test suite"), and the suite starts hundreds
of trainer processes on 2 cores. multiprocessing's forkserver imports those libraries once, in its server, and forks
each process from it. The child is otherwise the program: it runs MODULE as `__main__`
(runpy, like `python -m`) with its own environment, argv, cwd and stdout/stderr, and runs
the atexit handlers at the end. Only third-party modules are preloaded: pretrain's own are
imported fresh in each child, so anything they read at import (PRETRAIN_FAULTS) is the
child's. What the children do share is the server's hash seed (str hashes, hence set order),
which fresh interpreters draw each; the tests that start real interpreters (signals, launchers,
torchrun, the installed script) keep covering ranks that disagree on it. PRETRAIN_TEST_FRESH=1
starts every process fresh.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import runpy
import subprocess
import sys
import tempfile

# What a trainer process imports before pretrain's first line runs (torch._dynamo: via
# torch.optim; deepspeed.runtime.engine: DeepSpeed's own lazy imports at initialize).
PRELOAD = ["numpy", "yaml", "torch", "torch._dynamo", "torch.distributed", "deepspeed",
           "deepspeed.runtime.engine", "deepspeed.runtime.pipe", "deepspeed.runtime.zero"]

FRESH = "PRETRAIN_TEST_FRESH"  # =1: every process a fresh interpreter, as before (to compare)

_context = None


def forking() -> bool:
    """Whether processes are forked from the server (not with PRETRAIN_TEST_FRESH=1)."""
    return os.environ.get(FRESH) != "1"


def enabled(cmd) -> bool:
    """Whether `cmd` is forked: `python -m pretrain...`, while forking."""
    found = module_of(cmd)
    return forking() and found is not None and found[0].startswith("pretrain.")


def context():
    """The forkserver context. Its server starts here, once, with OMP_NUM_THREADS=1 as every test
    process has: the OpenMP runtime reads it when torch loads."""
    global _context
    if _context is None:
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            forkserver.ensure_running()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = old
        _context = ctx
    return _context


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _main(module: str, args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    _redirect(1, out)
    _redirect(2, err)
    # PYTHONUNBUFFERED's effect, which the server's streams were made without.
    sys.stdout = sys.stdout or open(1, "w", closefd=False)
    sys.stderr = sys.stderr or open(2, "w", closefd=False)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # the interpreter would at exit; multiprocessing ends in os._exit


class Forked:
    """Popen's poll / wait / kill for a forkserver child."""

    def __init__(self, proc, args):
        self.proc, self.args = proc, args

    def poll(self):
        return self.proc.exitcode

    def wait(self, timeout=None):
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.proc.exitcode

    def kill(self):
        if self.proc.exitcode is None:
            self.proc.kill()


def module_of(cmd) -> tuple[str, list[str]] | None:
    """(MODULE, ARGS) for `[sys.executable, "-m", MODULE, *ARGS]`, else None."""
    cmd = [str(c) for c in cmd]
    if len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m":
        return cmd[2], cmd[3:]
    return None


def start(cmd, env: dict, out: str, err: str | None = None) -> Forked:
    """Fork `cmd` (`python -m MODULE ...`) in this cwd, stdout to `out`, stderr to `err` or `out`."""
    module, args = module_of(cmd)
    proc = context().Process(target=_main, args=(module, args, dict(env), os.getcwd(), str(out), str(err or out)))
    proc.start()
    return Forked(proc, [str(c) for c in cmd])


def run(cmd, env: dict, timeout: float = 300, split: bool = False) -> subprocess.CompletedProcess:
    """Like subprocess.run(cmd, env=env, text=True, timeout=timeout) with stdout and stderr
    captured (together, or apart with split=True)."""
    with tempfile.TemporaryDirectory(prefix="warm_") as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err") if split else None
        proc = start(cmd, env, out, err)
        try:
            rc = proc.wait(timeout)
        finally:
            proc.kill()
            proc.proc.join(5)
        read = lambda p: open(p).read() if p and os.path.exists(p) else ""  # noqa: E731
        return subprocess.CompletedProcess(proc.args, rc, stdout=read(out), stderr=read(err) if split else None)
