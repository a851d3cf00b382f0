"""Run a test body in N local processes (forked from tests/warm.py's server, or spawned; gloo).

    def _body(rank, world_size, a, b):      # top-level, so spawn can pickle it
        group = dist.group.WORLD
        ...
        return something_picklable

    results = run_distributed(_body, 2, a, b, timeout=60)   # [rank0_result, rank1_result]

* Each child gets ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``, joins a gloo
  process group on a free localhost port, and destroys it on every exit path.
* A child exception fails the caller with :class:`DistributedTestError` carrying the rank
  and the child's traceback (so ``pytest.raises(..., match=...)`` works on the message).
* A child that dies (non-zero exit, signal) fails the caller and the other ranks are
  killed. A run that has not finished ``timeout`` seconds after every rank joined the
  process group (a hang, e.g. a peer that never enters a collective) raises
  :class:`DistributedTimeout` and kills every child; the gloo op timeout is set to the same
  value. Start-up (spawn + import torch + rendezvous) is bounded separately by
  ``startup_timeout``, so a loaded machine does not turn into false timeouts.
"""
from __future__ import annotations

import datetime
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import warm


class DistributedTestError(AssertionError):
    """A child process raised or died."""


class DistributedTimeout(DistributedTestError):
    """The children did not all finish within the timeout."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout: float,
           startup_timeout: float, backend: str, args: tuple, result_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    exit_code = 0
    try:
        # Rendezvous within startup_timeout (peers may still be importing torch); collectives
        # then time out after `timeout`.
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=(rank == 0),
                              timeout=datetime.timedelta(seconds=startup_timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        open(os.path.join(result_dir, f"rank{rank}.ready"), "w").close()
        result = fn(rank, world_size, *args)
        with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        exit_code = 1
        with open(os.path.join(result_dir, f"rank{rank}.err"), "wb") as f:
            pickle.dump((time.time(), traceback.format_exc()), f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's finalization: its destructors of C++ objects (gloo's threads,
    # tensors they hold) can abort a process whose work is done ("terminate called without an
    # active exception", seen once in CI as a rank dying with signal 6 after its checks).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _failure_report(fn_name: str, procs: list, result_dir: str, killed: tuple = ()) -> str:
    """Hard deaths first (likely the cause), then Python exceptions by time raised."""
    dead, raised = [], []
    for rank, p in enumerate(procs):
        err = os.path.join(result_dir, f"rank{rank}.err")
        if os.path.exists(err):
            with open(err, "rb") as f:
                t, tb = pickle.load(f)
            raised.append((t, rank, tb))
        elif p.exitcode not in (0, None) and rank not in killed:
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            dead.append(f"rank {rank} died ({how}) without a Python exception")
    parts = dead + [f"rank {rank} raised:\n{tb}" for _, rank, tb in sorted(raised)]
    return f"{fn_name} failed: " + ("\n".join(parts) if parts else "no rank reported an error")


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any,
                    timeout: float = 60.0, startup_timeout: float = 120.0,
                    backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return the
    per-rank return values. ``fn`` must be a module-level function.

    ``timeout`` bounds the body: it counts from the moment every rank has joined the
    process group (so a slow, loaded machine's interpreter/torch start-up does not eat
    it); ``startup_timeout`` bounds getting there."""
    name = getattr(fn, "__name__", repr(fn))
    result_dir = tempfile.mkdtemp(prefix="dist_util_")
    ctx = warm.context() if warm.forking() else mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(rank, fn, world_size, port, float(timeout), float(startup_timeout), backend,
                               args, result_dir))
             for rank in range(world_size)]
    try:
        old_omp = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children before torch loads
        try:
            for p in procs:
                p.start()
        finally:
            if old_omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old_omp
        deadline = time.monotonic() + startup_timeout
        started = False
        while True:
            if not started and all(os.path.exists(os.path.join(result_dir, f"rank{r}.ready"))
                                   for r in range(world_size)):
                started = True
                deadline = time.monotonic() + timeout
            codes = [p.exitcode for p in procs]
            if all(c == 0 for c in codes):
                break
            if any(c not in (0, None) for c in codes):
                # Give the peers a moment to fail on their own (their errors help), then report.
                grace = min(time.monotonic() + 2.0, deadline)
                while time.monotonic() < grace and any(p.is_alive() for p in procs):
                    time.sleep(0.05)
                _kill(procs)
                raise DistributedTestError(_failure_report(name, procs, result_dir))
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                _kill(procs)
                report = _failure_report(name, procs, result_dir, killed=tuple(alive))
                what = f"{timeout:g}s" if started else f"{startup_timeout:g}s of start-up (process group not joined)"
                raise DistributedTimeout(f"{name}: ranks {alive} still running after {what} "
                                         f"(hang or deadlock); killed.\n{report}")
            time.sleep(0.05)
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        _kill(procs)
        shutil.rmtree(result_dir, ignore_errors=True)


def _kill(procs: list) -> None:
    """Kill and reap the children we started (only those)."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.kill()
    for p in started:
        p.join(5)
