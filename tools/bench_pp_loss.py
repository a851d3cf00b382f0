"""The pipeline's last stage: what one micro-batch keeps for its backward (issue 20).

Two ranks (gloo, one thread each) build the real PP=2 pipeline and DeepSpeed engine
(`parallel.build.build_model`, `run.engine.build_engine`: ZeRO-0, fp32, one micro-batch per
step) and train `--steps` steps through `engine.train_batch`. In the last measured step each
stage records, for its micro-batch:

  saved    bytes autograd saves for the backward from the start of the stage's forward to the
           end of its loss (a saved_tensors_hooks pack hook; parameters left out, storages
           deduplicated), plus the stage's output, which DeepSpeed keeps until the backward;
  largest  the largest of those tensors;
  peak RSS the growth of the process's resident memory during the step (VmHWM reset before it):
           transient chunks and gradients too, and allocator noise.

Run it on the code before and after a change (PYTHONPATH=<other tree> for the other one):

    python tools/bench_pp_loss.py --smoke     # seconds (CI-sized)
    python tools/bench_pp_loss.py             # the "Memory per rank" shape: 6 x 384, V 50304, T 256, B 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchshape import ANCHOR, SMOKE, add_shape_args, fill_defaults, shape_overrides  # noqa: E402
from procmem import reset_peak_rss, status_bytes  # noqa: E402

MiB = 2**20


class Saved:
    """Bytes saved for the backward between `start()` and `stop()`, parameters excluded."""

    def __init__(self, torch, params):
        self.torch, self.params = torch, {self._key(p) for p in params}
        self.seen, self.bytes, self.largest, self.ctx = set(), 0, 0, None

    @staticmethod
    def _key(t):
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()

    def add(self, t) -> None:
        key = self._key(t)
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
            self.largest = max(self.largest, key[1])

    def start(self) -> None:
        if self.ctx is None and self.torch.is_grad_enabled():
            self.seen, self.bytes, self.largest = set(), 0, 0
            self.ctx = self.torch.autograd.graph.saved_tensors_hooks(lambda t: (self.add(t), t)[1], lambda t: t)
            self.ctx.__enter__()

    def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None


def worker(rank: int, world: int, port: int, overrides: list, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    from pretrain.config.load import load_config
    from pretrain.config.validate import resolve
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology
    from pretrain.run.engine import build_engine, init_distributed

    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    layout = resolve(cfg, world, None, cuda_available=False)
    device = torch.device("cpu")
    init_distributed(cfg, device)
    topo = Topology(layout)
    torch.manual_seed(cfg.train.seed)
    engine, _ = build_engine(cfg, layout, build_model(cfg, layout, topo, device), topo)
    module = engine.module
    saved = Saved(torch, module.parameters())
    module.register_forward_pre_hook(lambda m, args: saved.start())

    def output_kept(m, args, output):  # DeepSpeed keeps the stage's output until its backward
        for t in output if isinstance(output, tuple) else (output,):
            if torch.is_tensor(t) and t.requires_grad:
                saved.add(t)
        if not engine.is_last_stage():
            saved.stop()

    module.register_forward_hook(output_kept)
    loss_fn = module.loss_fn

    def measured_loss(*args):
        loss = loss_fn(*args)
        saved.stop()
        return loss

    module.loss_fn = measured_loss
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, m.vocab_size, (layout.micro_batch_size, m.seq_len + 1), generator=g)
    for step in range(steps):
        if step == steps - 1:
            reset_peak_rss()
            rss0 = status_bytes("VmRSS")
        loss = engine.train_batch(data_iter=iter([(batch[:, :-1], batch[:, 1:])] * layout.grad_accum))
    res = {"rank": rank, "stage": topo.pp_rank, "saved": saved.bytes, "largest": saved.largest,
           "rss_growth": status_bytes("VmHWM") - rss0, "loss": float(loss)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, "micro-batch size (one micro-batch per step)")
    p.add_argument("--steps", type=int, default=3, help="steps; the last one is measured")
    p.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
    a = p.parse_args()
    fill_defaults(a, SMOKE if a.smoke else ANCHOR)
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from pretrain import dsadapter

    overrides = ["data.synthetic=true", "train.device=cpu", "train.precision=fp32", "model.dropout=0.0",
                 "parallel.pipeline=2", "parallel.zero_stage=0", "parallel.timeout_minutes=5",
                 f"train.global_batch_size={a.batch}", *shape_overrides(a)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, port, overrides, a.steps, tmp), nprocs=2)
        res = sorted((json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)), key=lambda r: r["stage"])
    import pretrain

    print(f"PP=2, ZeRO-0, fp32: {a.layers} x {a.d_model}, {a.heads} heads, V {a.vocab}, T {a.seq}, "
          f"micro-batch {a.batch}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"DeepSpeed {dsadapter.version()}, code {Path(pretrain.__file__).parent}")
    print("| stage | kept for the backward (saved + output) | largest tensor | peak RSS growth in the step | loss |")
    print("|---|---|---|---|---|")
    for r in res:
        print(f"| {r['stage']} | {r['saved'] / MiB:,.1f} MiB | {r['largest'] / MiB:,.1f} MiB | "
              f"{r['rss_growth'] / MiB:,.1f} MiB | {r['loss']:.6f} |")
    print("RESULT " + json.dumps({"stages": res, "shape": shape_overrides(a)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
