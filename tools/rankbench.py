"""Benchmarks that run their own script as torchrun workers (tools/bench_build.py, bench_init.py,
bench_init_from.py): start the workers, and hand every rank's result back to the launcher."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def worker_arguments(p: argparse.ArgumentParser) -> None:
    """The hidden options `launch` starts a worker with (the overrides follow `--`)."""
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)


def launch(script: str, config: str, overrides: list[str], world: int, *, args: tuple = (),
           env: dict | None = None, what: str = "") -> list[dict]:
    """Run `script --worker --result FILE --config CONFIG [args] -- overrides` on `world` local
    ranks (one thread each) with a temporary train.out_dir; every rank's result, by rank."""
    with tempfile.TemporaryDirectory(prefix=Path(script).stem + "_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "--no-python", sys.executable, str(Path(script).resolve()), "--worker", "--result", str(result),
               "--config", config, *args, "--", *overrides, f"train.out_dir={tmp}/run"]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"run failed ({what or f'world {world}'}):\n{proc.stdout[-4000:]}")
        return json.loads(result.read_text())


def report(out: dict, result: str) -> None:
    """A worker's last step (collective): gather every rank's `out`, rank 0 writes them to
    `result`, then leave the process group."""
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(every))
    dist.barrier()
    dist.destroy_process_group()
