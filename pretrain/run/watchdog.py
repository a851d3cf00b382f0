"""The hang watchdog: a run that stops making progress writes down where every rank is and
exits non-zero, so the auto-resume wrapper restarts it from its last checkpoint instead of
letting a stuck job burn its allocation.

    wd = Watchdog(out_dir, rank, step_timeout=600, startup_timeout=1800).start()  # every rank
    while training:
        train_step()
        wd.step_done(step)               # a clock read and three stores: no sync, no lock
        with wd.grace("checkpoint"):     # validation, saves: the start-up allowance
            save()
    wd.stop()                            # before the final barrier / destroy_process_group

Deadlines. From start() to the first step_done: `startup_timeout` (compilation, data warm-up,
the first collectives). After each step_done: `step_timeout`. Inside `grace(what)`:
`startup_timeout` from the block's start, so a save or validation may be slow but one that
hangs still ends the run; leaving the block restarts the clock that was running before it.
A daemon thread checks the deadline every `poll` seconds; after stop() it never fires.

When a deadline passes, on every rank (each rank's thread fires by itself, within about one
step of the others, since no rank can step ahead of a collective its peers do not reach):
1. `<out_dir>/hang/rank<N>.txt`: what timed out, the Python stacks of every thread
   (faulthandler; the main thread is labelled), and the collectives this rank has in flight
   according to PyTorch's flight recorder (NCCL's own, or the one gloo shares; on only when
   TORCH_FR_BUFFER_SIZE is set before the process group starts: enable_flight_recorder()),
   or a line saying there is none. The recorder's full dump goes to `hang/fr_trace_<N>` for
   `python -m torch.distributed.flight_recorder.fr_trace <out_dir>/hang -p fr_trace_`.
2. Who is missing, over a gloo group of the watchdog's own (made by start(): the default group
   may be the one stuck in a collective). A monitored barrier among the watchdog threads names
   the ranks whose watchdog does not answer within `min(step_timeout, 60)` s (process frozen,
   node gone, main thread holding the GIL). When every watchdog answers, the ranks compare how
   many collectives each has issued on each process group: a member behind its peers, and
   waiting in no collective itself, did not arrive (it is stuck elsewhere: a sleep, I/O, the
   data loader).
3. One line through print_fn, e.g. `hang: no step completed in 15 s (last step 5); ranks [1]
   did not arrive (at collective 6 of process group 0); stacks in out/hang/`, and
   os._exit(EXIT_HANG) once every rank that answered has written its files.

So every rank exits within about step_timeout + poll, or twice step_timeout when a rank is
frozen. A rank whose watchdog cannot run (its main thread never gives up the GIL) does not exit
by itself: the others name it, and the launcher (torchrun) ends it when they exit. EXIT_HANG
(4) is not among the auto-resume wrapper's final codes (2, 3): the run is restarted.
"""
from __future__ import annotations

import faulthandler
import math
import os
import pickle
import re
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

EXIT_HANG = 4
FLIGHT_RECORDER_ENTRIES = 2000


def enable_flight_recorder(entries: int = FLIGHT_RECORDER_ENTRIES) -> None:
    """Before the process group starts: have PyTorch keep its last `entries` collectives, so a
    hang report can list the ones in flight (a value already in the environment wins)."""
    if "TORCH_FR_BUFFER_SIZE" in os.environ or "TORCH_NCCL_TRACE_BUFFER_SIZE" in os.environ:
        return
    os.environ[_recorder_variable()] = str(entries)


class Watchdog:
    def __init__(self, out_dir, rank: int, step_timeout: float | None, startup_timeout: float | None,
                 print_fn=print, poll: float | None = None):
        """step_timeout None or 0: off (start() starts nothing; the other calls cost as much)."""
        self.enabled = bool(step_timeout)
        step_timeout = step_timeout or math.inf
        startup_timeout = startup_timeout or math.inf
        if self.enabled and not 0 < step_timeout <= startup_timeout:
            raise ValueError(f"need 0 < step_timeout ({step_timeout}) <= startup_timeout ({startup_timeout})")
        self.hang_dir = Path(out_dir) / "hang"
        self.rank = rank
        self.step_timeout, self.startup_timeout = float(step_timeout), float(startup_timeout)
        self.settle = min(self.step_timeout, 60.0)  # how long a rank waits for the others' watchdogs
        self.poll = poll if poll is not None else min(1.0, self.step_timeout / 10)
        self.print_fn = print_fn
        self.group = None  # the watchdog's own gloo group (more than one rank)
        self.last_step = None
        self._phase = ("first step", self.startup_timeout)
        self._deadline = math.inf
        self._stopped = threading.Event()
        self._thread = None

    def start(self) -> "Watchdog":
        """Start the clock (startup_timeout) and the thread. With a process group of more than
        one rank this is a collective (it creates the watchdog's gloo group): call it at the
        same point on every rank."""
        if not self.enabled:
            return self
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.settle))
        self._arm("first step", self.startup_timeout)
        self._thread = threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def step_done(self, step: int) -> None:
        """A step completed (every step: plain stores, read by the thread without a lock)."""
        self.last_step = step
        self._phase = ("step", self.step_timeout)
        self._deadline = time.monotonic() + self.step_timeout

    @contextmanager
    def grace(self, what: str):
        """Work that may outlast a step (a save, a validation) gets startup_timeout."""
        before = self._phase
        self._arm(what, self.startup_timeout)
        try:
            yield
        finally:
            self._arm(*before)

    def stop(self) -> None:
        """A clean end: the thread exits and never fires (it is a daemon: it never keeps the
        process alive either)."""
        self._stopped.set()
        self._deadline = math.inf

    def _arm(self, what: str, limit: float) -> None:
        self._phase = (what, limit)
        self._deadline = time.monotonic() + limit

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll):
            if time.monotonic() > self._deadline:
                self._fire()
                return

    # ------------------------------------------------------------------ firing
    def _fire(self) -> None:
        """Stacks to the file, who is missing to the log, then exit EXIT_HANG whatever fails."""
        what, limit = self._phase
        if what == "step":
            reason = f"no step completed in {limit:g} s (last step {self.last_step})"
        elif what == "first step":
            reason = f"the first step did not complete in {limit:g} s"
        else:
            reason = f"{what} did not finish in {limit:g} s"
        try:
            self._dump(reason)
            verdict, answered = self._missing()
            self.print_fn(f"hang: {reason}; {verdict}; stacks in {self.hang_dir}/")
            if answered:  # leave together, once every rank has written its files and its line
                dist.barrier(group=self.group)
        except BaseException as e:  # noqa: BLE001 - the exit below must happen
            print(f"hang: {reason}; the watchdog failed: {e!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_HANG)

    def _dump(self, reason: str) -> None:
        self.hang_dir.mkdir(parents=True, exist_ok=True)
        with open(self.hang_dir / f"rank{self.rank}.txt", "w") as f:
            f.write(f"rank {self.rank}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
            for t in threading.enumerate():  # faulthandler names threads by id only
                f.write(f"thread 0x{t.ident:016x} is {t.name}\n")
            f.write("\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
            try:
                flight = self._in_flight()
            except Exception as e:  # noqa: BLE001 - private API: the stacks matter more
                flight = f"collectives in flight: reading the flight recorder failed: {e!r}"
            f.write("\n" + flight + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _in_flight(self) -> str:
        """The flight recorder's view of this rank: the collectives not yet retired."""
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        raw = _flight_recorder(backend) if backend else None
        if raw is None:
            return "collectives in flight: no flight recorder available (no process group, or none in this torch)"
        entries = pickle.loads(raw).get("entries", [])
        if not entries:
            return ("collectives in flight: unknown, the flight recorder is off (set TORCH_FR_BUFFER_SIZE=2000 "
                    "before the process group starts)")
        (self.hang_dir / f"fr_trace_{self.rank}").write_bytes(raw)
        active = [e for e in entries if not e.get("retired")]
        if not active:
            return f"collectives in flight ({backend} flight recorder): none on this rank"
        lines = [f"collectives in flight ({backend} flight recorder):"]
        for e in active:
            group = e.get("process_group") or ("?", "?")
            lines.append(f"  {e.get('profiling_name')} #{e.get('collective_seq_id')} on process group {group[0]} "
                         f"({group[1]}), state {e.get('state')}, input sizes {e.get('input_sizes')}")
        return "\n".join(lines)

    def _missing(self) -> tuple[str, bool]:
        """Which ranks did not arrive, as seen from this rank (module docstring, step 2), and
        whether every rank's watchdog answered."""
        if self.group is None:
            return "a single process", False
        try:
            dist.monitored_barrier(self.group, timeout=timedelta(seconds=self.settle), wait_all_ranks=True)
        except RuntimeError as e:
            return _unanswered(str(e), self.settle), False
        counts = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(counts, _collective_counts(self.group), group=self.group)
        return _laggards(counts), True


def _unanswered(message: str, settle: float) -> str:
    """What a failed monitored barrier says: rank 0 lists the ranks that did not reach it; the
    others only learn that rank 0 did not answer them (rank 0 did not answer anyone then)."""
    listed = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    if listed:
        ranks = [int(r) for r in listed.group(1).split(",")]
        return f"ranks {ranks} did not arrive (their watchdog did not answer in {settle:g} s: frozen or gone)"
    if re.search(r"from rank 0\b", message):
        return "rank 0 did not confirm the watchdogs' barrier (rank 0 is gone, or its log names the ranks missing)"
    return f"the watchdogs' barrier failed: {message.strip().splitlines()[-1]}"


def _laggards(counts: list) -> str:
    """From every rank's {group: collectives issued}: the members behind their
    peers in some group and ahead in none (a rank ahead is itself waiting in a collective)."""
    per_group = {}
    for rank, mine in enumerate(counts):
        for name, n in mine.items():
            per_group.setdefault(name, {})[rank] = n
    behind, waiting = {}, set()  # behind: rank -> {(group, the collective its peers wait in)}
    for name, seen in per_group.items():
        top = max(seen.values())
        for rank, n in seen.items():
            if n < top:
                behind.setdefault(rank, set()).add((name, top))
            if n > min(seen.values()):
                waiting.add(rank)
    stuck = sorted(set(behind) - waiting) or sorted(behind)  # all behind and waiting: a cycle
    if not stuck:
        return "no rank is behind the others in the collectives it issued (see the stacks)"
    where = sorted(set().union(*(behind[r] for r in stuck)))
    return f"ranks {stuck} did not arrive (at {', '.join(f'collective {n} of process group {g}' for g, n in where)})"


# ---------------------------------------------------------------------- torch internals
# The functions below use PyTorch's private c10d API (there is no public one for any of it):
# the per-group collective counters and the flight recorder.

def _recorder_variable() -> str:
    """The variable that sizes the flight recorder: a torch with the shared recorder (gloo too)
    reads TORCH_FR_BUFFER_SIZE and calls the older, NCCL-only name deprecated."""
    import torch._C._distributed_c10d as c10d

    return "TORCH_FR_BUFFER_SIZE" if hasattr(c10d, "_dump_fr_trace") else "TORCH_NCCL_TRACE_BUFFER_SIZE"


def _collective_counts(exclude) -> dict:
    """{group name: collectives this rank issued on it} for every process group this rank
    belongs to but `exclude` (NCCL counts a collective when it is enqueued)."""
    from torch.distributed.distributed_c10d import _world

    return {pg.group_name: pg._get_sequence_number_for_group() for pg in list(_world.pg_map) if pg is not exclude}


def _flight_recorder(backend: str) -> bytes | None:
    """The flight recorder's pickled dump ({"entries": [...], ...}): NCCL keeps its own, gloo
    shares the CPU one; None where this torch build has neither."""
    import torch._C._distributed_c10d as c10d

    dump = getattr(c10d, "_dump_nccl_trace" if backend == "nccl" else "_dump_fr_trace", None)
    if dump is None:
        return None
    return dump(True, True, False)  # collectives, their stack traces, completed ones too
