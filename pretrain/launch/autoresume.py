"""Auto-resume: rerun a failed training command; it resumes from its newest valid checkpoint.

    python -m pretrain.launch.autoresume [options] -- COMMAND [ARGS...]

    python -m pretrain.launch.autoresume -- launch/local.sh configs/gpt2-124m.yaml train.out_dir=runs/a
    python -m pretrain.launch.autoresume --max-restarts 5 -- launch/multinode.sh CONFIG ...
    python -m pretrain.launch.autoresume --checkpoints runs/a/checkpoints -- srun ... launch/multinode.sh ...

COMMAND is any launcher of `pretrain.train` (a launch/ script, torchrun, srun, the
trainer itself). It runs again after a failure (a crash, a dead node, a collective
timeout) and, with `checkpoint.resume=auto` (the default), the trainer picks the newest
checkpoint whose manifest verifies. The wrapper stops:

* when COMMAND exits 0 (done, or stopped on SIGTERM/SIGUSR1 after a checkpoint);
* on exit 2 (a configuration or user error: a restart would fail the same way) and
  exit 3 (stopped after consecutive non-finite steps: needs a person); see --final-codes;
* when a restart made no progress: the newest committed checkpoint did not advance
  during the attempt that resumed, so the next one would fail at the same place;
* after --max-restarts restarts (default $PRETRAIN_MAX_RESTARTS or 3);
* when it is itself asked to stop (SIGTERM, SIGINT, SIGHUP, SIGUSR1): the signal goes to
  COMMAND, which saves a checkpoint and exits, and the wrapper does not restart it.

It exits with COMMAND's last status (128+N for a signal N). The checkpoint directory is
read from COMMAND's config and overrides (`checkpoint.dir`, else `train.out_dir/checkpoints`)
unless --checkpoints is given. Each attempt gets PRETRAIN_ATTEMPT=1,2,... in its environment.

`--finished -- COMMAND` runs nothing: it exits 0 when COMMAND's run is complete (its newest
committed checkpoint is at train.max_steps), else 1 (launch/slurm.sbatch uses it to decide
whether to requeue).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "autoresume:"
TAG_RE = re.compile(r"^step_(\d{8})$")
OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
FORWARDED = STOP_SIGNALS + (signal.SIGUSR2,)


def log(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


def newest_committed(ckpt_dir: Path) -> int | None:
    """Step of the newest checkpoint that committed (has its manifest), None if none.

    Cheap on purpose (no hashing): the trainer verifies what it resumes from.
    """
    steps = [int(m.group(1)) for p in (ckpt_dir.glob("step_*") if ckpt_dir.is_dir() else ())
             if (m := TAG_RE.match(p.name)) and (p / "manifest.json").is_file()]
    return max(steps) if steps else None


def config_from_command(command: list[str]):
    """The trainer's `Config` for `command`, from its config file and dotted overrides."""
    from pretrain.config.load import load_config

    config, overrides = [], []  # --config may repeat (merged in order)
    for i, arg in enumerate(command):
        if arg == "--config" and i + 1 < len(command):
            config.append(command[i + 1])
        elif arg.startswith("--config="):
            config.append(arg.split("=", 1)[1])
        elif not config and arg.endswith((".yaml", ".yml")) and not arg.startswith("-") and "=" not in arg:
            config.append(arg)
        elif OVERRIDE_RE.match(arg):
            overrides.append(arg)
    timeout = os.environ.get("PRETRAIN_TIMEOUT_MINUTES")
    if timeout:
        overrides.insert(0, f"parallel.timeout_minutes={timeout}")
    return load_config(config, overrides)


def checkpoint_dir(cfg) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.train.out_dir) / "checkpoints"


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Runner:
    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum in STOP_SIGNALS and self.stop_signal is None:
            self.stop_signal = signum
            log(f"got {signal.Signals(signum).name}: passing it on, no restart after this attempt")
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signum)
            except ProcessLookupError:
                pass

    def run(self, command: list[str], attempt: int) -> int:
        env = {**os.environ, "PRETRAIN_ATTEMPT": str(attempt)}
        try:
            self.child = subprocess.Popen(command, env=env)
        except OSError as e:
            log(f"cannot start {command[0]}: {e}")
            return 127
        while True:
            try:
                return _status(self.child.wait())
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() for us
                continue


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pretrain.launch.autoresume",
        description="Restart a failed training command (it resumes from its newest valid checkpoint).",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-restarts", type=int, default=int(os.environ.get("PRETRAIN_MAX_RESTARTS", "3")),
                   help="restarts after the first attempt (default: $PRETRAIN_MAX_RESTARTS or 3)")
    p.add_argument("--delay", type=float, default=float(os.environ.get("PRETRAIN_RESTART_DELAY", "10")),
                   help="seconds to wait before a restart (default: $PRETRAIN_RESTART_DELAY or 10)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="checkpoint directory to watch (default: from COMMAND's config and overrides)")
    p.add_argument("--final-codes", default="2,3",
                   help="exit codes that are never retried (default: 2,3)")
    p.add_argument("--finished", action="store_true",
                   help="run nothing: exit 0 if COMMAND's run reached train.max_steps, else 1")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("missing COMMAND (put it after --)")
    if args.max_restarts < 0:
        p.error("--max-restarts must be >= 0")
    try:
        args.final_codes = {int(c) for c in args.final_codes.split(",") if c.strip()}
    except ValueError:
        p.error(f"--final-codes: expected comma-separated integers, got {args.final_codes!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pretrain.errors import UserError

    cfg = None
    if args.checkpoints is None or args.finished:
        try:
            cfg = config_from_command(args.command)
        except UserError as e:
            print(f"error: {e} (while reading the command's config; pass --checkpoints DIR)",
                  file=sys.stderr, flush=True)
            return 2
    ckpt_dir = args.checkpoints or checkpoint_dir(cfg)
    if args.finished:
        newest = newest_committed(ckpt_dir)
        done = newest is not None and newest >= cfg.train.max_steps
        log(f"newest committed checkpoint {_step_name(newest)} of train.max_steps={cfg.train.max_steps}: "
            + ("finished" if done else "not finished"))
        return 0 if done else 1
    runner = Runner()
    restarts = 0
    before = newest_committed(ckpt_dir)
    while True:
        attempt = restarts + 1
        log(f"attempt {attempt} of at most {args.max_restarts + 1}: newest committed checkpoint "
            f"{_step_name(before)} in {ckpt_dir}")
        rc = runner.run(args.command, attempt)
        after = newest_committed(ckpt_dir)
        if runner.stop_signal is not None:
            log(f"stopped on request ({signal.Signals(runner.stop_signal).name}); exit {rc}")
            return rc
        if rc == 0:
            log(f"finished (attempt {attempt}, newest checkpoint {_step_name(after)})")
            return 0
        if rc in args.final_codes:
            log(f"exit {rc}: not retried (2: configuration or user error, 3: non-finite losses)")
            return rc
        progressed = after is not None and (before is None or after > before)
        if restarts > 0 and not progressed:
            log(f"exit {rc}: the restart made no progress (newest checkpoint still {_step_name(after)}); "
                "giving up, see the per-rank logs")
            return rc
        if restarts >= args.max_restarts:
            log(f"exit {rc}: no restarts left ({args.max_restarts} used); giving up")
            return rc
        restarts += 1
        log(f"exit {rc}: restarting in {args.delay:g}s from checkpoint {_step_name(after)} "
            f"(restart {restarts} of {args.max_restarts})")
        _sleep(args.delay, runner)
        if runner.stop_signal is not None:
            log("stopped on request while waiting to restart")
            return rc
        before = after


def _step_name(step: int | None) -> str:
    return "none" if step is None else f"step_{step:08d}"


def _sleep(seconds: float, runner: Runner) -> None:
    end = time.monotonic() + seconds
    while runner.stop_signal is None and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.2))


if __name__ == "__main__":
    sys.exit(main())
