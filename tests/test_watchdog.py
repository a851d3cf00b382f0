"""The hang watchdog (pretrain.run.watchdog) in real processes: this file is also the child
program (`python tests/test_watchdog.py SCENARIO RANK WORLD PORT OUT_DIR`), one or two ranks on
gloo. Every scenario starts at once (module fixture) so the suite waits for them together."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest

EXIT_HANG = 4
WAIT = 60  # seconds any child may take: one that is still running then has hung for good
LINGER = 5  # seconds a rank may outlive the first of its peers to exit


# ---------------------------------------------------------------------- the children
def _sleep_forever():
    while True:
        time.sleep(0.1)


def _stuck_before_first_step():
    while True:
        time.sleep(0.1)


def _steps(wd, first, last, allreduce):
    for step in range(first, last + 1):
        time.sleep(0.05)
        allreduce()
        wd.step_done(step)


def hang(wd, rank, allreduce):
    """Rank 1 sleeps inside step 6; rank 0 waits for it in the step's all_reduce."""
    _steps(wd, 1, 5, allreduce)
    if rank == 1:
        _sleep_forever()
    allreduce()


def frozen(wd, rank, allreduce):
    """Rank 1's whole process stops (its watchdog with it): only the barrier can name it."""
    _steps(wd, 1, 3, allreduce)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    allreduce()


def normal(wd, rank, allreduce):
    """A first step longer than step_timeout (start-up allowance), a save longer than it
    (grace), then a clean stop followed by a shutdown longer than it."""
    time.sleep(3)
    _steps(wd, 1, 10, allreduce)
    with wd.grace("checkpoint"):
        time.sleep(3)
    _steps(wd, 11, 20, allreduce)
    wd.stop()
    time.sleep(3)
    print("finished", flush=True)


def startup(wd, rank, allreduce):
    _stuck_before_first_step()


def grace_hang(wd, rank, allreduce):
    wd.step_done(1)
    with wd.grace("checkpoint"):
        _sleep_forever()


# name: (world size, step_timeout, startup_timeout)
SCENARIOS = {"hang": (2, 3, 30), "frozen": (2, 2, 30), "normal": (2, 2, 30),
             "startup": (1, 1, 3), "grace_hang": (1, 1, 3)}


def child(name, rank, world, port, out_dir):
    import torch
    import torch.distributed as dist
    from pretrain.run.watchdog import Watchdog, enable_flight_recorder

    torch.set_num_threads(1)
    if world > 1:
        enable_flight_recorder()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=WAIT))
    _, step_timeout, startup_timeout = SCENARIOS[name]
    wd = Watchdog(out_dir, rank, step_timeout, startup_timeout, print_fn=lambda s: print(s, flush=True))
    wd.start()
    globals()[name](wd, rank, lambda: dist.all_reduce(torch.ones(1)))
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{scenario: (out_dir, [(exit code, output) per rank])}, every scenario run at once."""
    from dist_util import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = {}
    for name, (world, _, _) in SCENARIOS.items():
        out = tmp_path_factory.mktemp(name)
        port = free_port()
        procs[name] = (out, [])
        for rank in range(world):
            log = open(out / f"output{rank}.txt", "w")
            p = subprocess.Popen([sys.executable, __file__, name, str(rank), str(world), str(port), str(out)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
            procs[name][1].append((p, log))
    # Wait for every child; once a rank of a scenario has exited, its peers get LINGER seconds
    # more (a frozen rank never exits by itself).
    end, linger = time.monotonic() + WAIT, {}
    while time.monotonic() < end and any(p.poll() is None for _, ranks in procs.values() for p, _ in ranks):
        for name, (_, ranks) in procs.items():
            if name not in linger and any(p.poll() is not None for p, _ in ranks):
                linger[name] = time.monotonic() + LINGER
            if linger.get(name, end) < time.monotonic():
                for p, _ in ranks:
                    if p.poll() is None:
                        p.kill()
        time.sleep(0.2)
    results = {}
    for name, (out, ranks) in procs.items():
        results[name] = (out, [])
        for rank, (p, log) in enumerate(ranks):
            rc = p.poll()
            if rc is None or rc == -signal.SIGKILL:  # still running: the watchdog did not end it
                p.kill()
                p.wait()
                rc = None
            log.close()
            results[name][1].append((rc, (out / f"output{rank}.txt").read_text()))
    return results


def test_a_rank_stuck_in_python_is_named_and_every_rank_exits(runs):
    out, ((rc0, log0), (rc1, log1)) = runs["hang"]
    assert rc1 == EXIT_HANG, log1
    assert rc0 not in (0, None), log0  # EXIT_HANG, or 1 when rank 1's exit reaches its all_reduce first
    assert "hang: no step completed in 3 s (last step 5); ranks [1] did not arrive" in log0, log0
    assert "ranks [1] did not arrive" in log1, log1
    stacks1 = (out / "hang" / "rank1.txt").read_text()
    assert "_sleep_forever" in stacks1 and "is MainThread" in stacks1, stacks1
    assert "collectives in flight (gloo flight recorder): none on this rank" in stacks1, stacks1
    stacks0 = (out / "hang" / "rank0.txt").read_text()
    assert "in all_reduce" in stacks0, stacks0  # rank 0's main thread waits in the collective
    assert "gloo:all_reduce #" in stacks0.split("collectives in flight")[1], stacks0
    assert (out / "hang" / "fr_trace_0").stat().st_size > 0  # for torch's fr_trace analyser


def test_a_frozen_rank_is_named_by_the_watchdogs_barrier(runs):
    out, ((rc0, log0), (rc1, _)) = runs["frozen"]
    assert rc0 == EXIT_HANG, log0
    assert rc1 is None  # stopped by SIGSTOP: its launcher ends it (here the fixture)
    assert "hang: no step completed in 2 s (last step 3); ranks [1] did not arrive (their watchdog did not answer" \
        in log0, log0
    assert "in all_reduce" in (out / "hang" / "rank0.txt").read_text()
    assert not (out / "hang" / "rank1.txt").exists()


def test_a_normal_run_with_slow_first_step_and_save_does_not_fire(runs):
    out, ranks = runs["normal"]
    for rc, log in ranks:
        assert rc == 0 and "finished" in log and "hang:" not in log, log
    assert not (out / "hang").exists()


def test_the_first_step_gets_the_startup_allowance_and_no_more(runs):
    out, [(rc, log)] = runs["startup"]
    assert rc == EXIT_HANG, log
    assert "hang: the first step did not complete in 3 s; a single process; stacks in" in log, log
    stacks = (out / "hang" / "rank0.txt").read_text()
    assert "_stuck_before_first_step" in stacks, stacks
    assert "no flight recorder available (no process group" in stacks, stacks


def test_a_grace_block_that_hangs_still_ends_the_run(runs):
    out, [(rc, log)] = runs["grace_hang"]
    assert rc == EXIT_HANG, log
    assert "hang: checkpoint did not finish in 3 s" in log, log
    assert "grace_hang" in (out / "hang" / "rank0.txt").read_text()


def test_the_rank_named_is_behind_its_peers_and_waits_in_no_collective():
    from pretrain.run.watchdog import _laggards

    # Rank 3 is stuck outside any collective; rank 2 waits for it in group "5" ({2, 3}), so it
    # is behind ranks 0 and 1 in the world group "0" without being the cause.
    counts = [{"0": 8}, {"0": 8}, {"0": 7, "5": 4}, {"0": 7, "5": 3}]
    assert _laggards(counts) == ("ranks [3] did not arrive (at collective 8 of process group 0, "
                                 "collective 4 of process group 5)")
    assert _laggards([{"0": 3}, {"0": 3}]) == ("no rank is behind the others in the collectives it issued "
                                               "(see the stacks)")


def test_a_watchdog_without_step_timeout_is_off(tmp_path):
    import threading

    from pretrain.run.watchdog import Watchdog

    before = threading.active_count()
    wd = Watchdog(tmp_path, 0, None, None).start()
    wd.step_done(1)
    with wd.grace("checkpoint"):
        pass
    wd.stop()
    assert not wd.enabled and threading.active_count() == before and wd.group is None


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
