"""Train a GPT: `python -m pretrain.train --config FILE [section.key=value ...]`.

Runs as one process, under `torchrun`, or under the `deepspeed` launcher. The flow:
config -> validated layout (before any process group) -> process group -> data ->
model -> DeepSpeed engine -> resume -> loop (log, validate, checkpoint) -> clean exit.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import checkpoint, faults
from pretrain.config.load import config_to_yaml, load_config
from pretrain.config.schema import Config, to_dict
from pretrain.config.validate import Layout, resolve
from pretrain.errors import UserError, cli_entry
from pretrain.resume_check import resolved_config
from pretrain.run_data import RunData, data_vocab_size
from pretrain.schedule import lr_at

EXIT_NONFINITE = 3


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (see configs/); omit for all defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--plan", action="store_true",
                   help="print parameters, FLOPs, batch plan, layout and memory estimate, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size to plan for (default: $WORLD_SIZE or 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # appended by the deepspeed launcher; LOCAL_RANK is used
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config is None and args.overrides and args.overrides[0].endswith((".yaml", ".yml")):
        args.config = args.overrides.pop(0)  # `pretrain-train FILE ...` works too
    cfg = load_config(args.config, args.overrides)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    data_vocab = None
    if not cfg.data.synthetic:
        try:
            data_vocab = data_vocab_size(cfg.data.paths)
        except UserError:
            if not (args.plan or args.print_config) or cfg.model.vocab_size is None:
                raise  # planning works without prepared data when model.vocab_size is set
    layout = resolve(cfg, world, data_vocab)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.plan:
        from pretrain.plan import format_plan

        print(format_plan(cfg, layout))
        return 0
    return Trainer(cfg, layout).run()


class _StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class Trainer:
    def __init__(self, cfg: Config, layout: Layout):
        self.cfg, self.layout = cfg, layout
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        from pretrain.engine import init_distributed, pick_device

        self.stop = _StopRequest()
        self.device = pick_device(self.cfg)
        self.rank, _ = init_distributed(self.cfg, self.device)
        ok = False
        try:
            rc = self._run()
            ok = True
            return rc
        finally:
            if getattr(self, "monitor", None):
                self.monitor.close()
            if ok:
                dist.barrier()
            dist.destroy_process_group()

    def _run(self) -> int:
        from pretrain.engine import build_engine
        from pretrain.monitor import Monitor
        from pretrain.parallel.apply import build_model
        from pretrain.parallel.topology import Topology
        from pretrain.plan import count_params, flops_per_token, layout_advice

        cfg, lay = self.cfg, self.layout
        self.topo = Topology(lay)  # every rank/group question goes here (DeepSpeed's grid)
        self.dp_rank = self.topo.dp_rank  # tensor-parallel peers (and pipeline stages) read the same batches
        self.pipe = lay.pp > 1
        self.monitor = Monitor(self.out_dir, self.rank == 0, cfg.logging.tensorboard, cfg.train.max_steps)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(self.out_dir / "config.yaml", config_to_yaml(cfg))
        self.data = RunData(cfg, lay, self.rank, self.dp_rank, self.out_dir, self.monitor.print)

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg, lay, self.topo)  # plain GPT, tensor-parallel GPT or this pipeline stage
        init = self._init_weights(model) if cfg.checkpoint.init_from else None  # a resume overrides them
        self.engine, self.opt = build_engine(cfg, lay, model, self.topo)
        self.flops_per_token = flops_per_token(cfg.model, lay.padded_vocab_size)

        self.step, self.consumed, self.skipped_total = 0, 0, 0
        self.writer, self.resumed_step = None, None
        tag_dir = checkpoint.choose_resume(cfg.checkpoint.resume, self.ckpt_dir, self.monitor.print,
                                           cfg.checkpoint.verify)
        if tag_dir is not None:
            self._resume(tag_dir)
        elif init is not None and cfg.checkpoint.init_optimizer:
            self._init_optimizer(init)
        n_params = count_params(cfg.model, lay.padded_vocab_size)["total"]
        self.monitor.print(f"training {n_params:,} parameters on {lay.world_size} {self.device.type} process(es) "
                           f"(data {lay.dp} x tensor {lay.tp} x pipeline {lay.pp}) "
                           f"from step {self.step} to {cfg.train.max_steps}")
        for note in layout_advice(cfg, lay):
            self.monitor.print(note)
        rc = self._loop()
        if self.writer is not None:
            self.writer.wait()  # the last save is committed before the exit
        return rc

    # ------------------------------------------------------------------ resume
    def _state(self) -> dict:
        import deepspeed

        return {"format": 2, "step": self.step, "consumed_samples": self.consumed,
                "consumed_tokens": self.consumed * self.cfg.model.seq_len,
                "skipped_steps": self.skipped_total, "config": resolved_config(self.cfg),
                "model_shape": self._model_shape(), "data_fingerprint": self.data.fingerprint,
                "data_sources": self.data.sources(), "vocab_size": self.data.vocab_size,
                "tokenizer": self.data.tokenizer,
                "layout": {"dp": self.layout.dp, "tp": self.layout.tp, "pp": self.layout.pp,
                           "zero_stage": self.layout.zero_stage},
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}}

    def _model_shape(self) -> dict:
        m = to_dict(self.cfg.model)
        keys = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "position", "norm", "mlp",
                "bias", "tie_embeddings")
        shape = {k: m[k] for k in keys}
        shape["padded_vocab_size"] = self.layout.padded_vocab_size
        if m["position"] == "learned":
            shape["seq_len"] = m["seq_len"]
        return shape

    def _resume(self, tag_dir: Path) -> None:
        from pretrain.resume_check import check_resume

        saved = checkpoint.read_state(tag_dir)
        for line in check_resume(saved, self.cfg, self._model_shape(), self.layout.tp, self.data, f"checkpoint {tag_dir}"):
            self.monitor.print(line)
        now = self._state()["layout"]
        if saved.get("layout") != now:
            from pretrain.interop.reshard import load_resharded  # UserError naming the fix when it cannot

            state = load_resharded(self.engine, tag_dir, saved.get("layout") or {}, now, self.monitor.print,
                                   topo=self.topo)
        else:
            state = checkpoint.load(self.engine, tag_dir)
        self.step, self.consumed = state["step"], state["consumed_samples"]
        self.skipped_total, self.resumed_step = state.get("skipped_steps", 0), self.step
        self.monitor.print(f"resumed from {tag_dir} at step {self.step}")

    def _shape_mismatch(self, where: str, shape: dict) -> str:
        from pretrain.resume_check import shape_message

        return shape_message(where, shape, self._model_shape(), self.layout.tp)

    def _init_weights(self, model) -> Path | None:
        """checkpoint.init_from: copy weights into the fresh model; our checkpoint's directory, or None
        for an import-hf directory. Step, schedule and data position stay at 0 (continued pretraining)."""
        from pretrain.interop.init_weights import META, copy_weights, load_init_weights

        src, lay = self.cfg.checkpoint.init_from, self.layout
        if (Path(src) / META).is_file() or (Path(src) / "init" / META).is_file() or src.endswith(".safetensors"):
            load_init_weights(model, src, self.cfg, lay, self.topo, self.monitor.print)
            return None
        tag_dir = checkpoint.resolve_tag_dir(src, self.cfg.checkpoint.verify)
        from pretrain.resume_check import check_init

        saved = checkpoint.read_state(tag_dir)
        check_init(saved, self.cfg, self._model_shape(), f"checkpoint.init_from={src}")
        if not self.cfg.checkpoint.init_optimizer:  # else the optimizer load brings the weights too
            copy_weights(model, checkpoint.load_model_weights(tag_dir), self.cfg, lay, self.topo,
                         f"checkpoint.init_from={src}")
        self.monitor.print(f"initialised from {tag_dir} (step {saved.get('step')}, "
                           f"{'weights and optimizer state' if self.cfg.checkpoint.init_optimizer else 'weights only'}); "
                           "this run starts at step 0 and sample 0 of its data")
        return tag_dir

    def _init_optimizer(self, tag_dir: Path) -> None:
        """checkpoint.init_optimizer: weights and optimizer state of `tag_dir`, in any layout."""
        saved, now = checkpoint.read_state(tag_dir), self._state()["layout"]
        if saved.get("layout") != now:
            from pretrain.interop.reshard import load_resharded

            load_resharded(self.engine, tag_dir, saved.get("layout") or {}, now, self.monitor.print, topo=self.topo)
        else:
            load_path, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
            checkpoint.finish_load(load_path, tag_dir, rng=False)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> int:
        cfg, lay, engine, opt = self.cfg, self.layout, self.engine, self.opt
        from pretrain.engine import grad_norm

        batches = self.data.train_batches(self.consumed)
        if self.pipe:  # DeepSpeed reads (inputs, labels) on the first and last stages only
            pairs = ((b[:, :-1], b[:, 1:]) for b in batches)
        window_loss, window_steps, consecutive = 0.0, 0, 0
        t_window = time.perf_counter()
        while self.step < cfg.train.max_steps:
            lr = lr_at(self.step, cfg.optim, cfg.schedule, cfg.train.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            engine.train()
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
            loss_sum = torch.zeros((), device=self.device)
            if self.pipe:  # 1F1B over grad_accum micro-batches; the loss comes from the last stage
                engine.module.loss_fn.poison = faults.active("nan", self.step, self.rank)
                opt.bad_loss, opt.stepped = False, False
                loss_sum += engine.train_batch(data_iter=pairs).detach().float() * lay.grad_accum
            for micro in range(0 if self.pipe else lay.grad_accum):
                batch = next(batches).to(self.device, non_blocking=True)
                loss = engine(batch[:, :-1], batch[:, 1:])
                if faults.active("nan", self.step, self.rank):
                    loss = loss * float("nan")
                bad |= ~torch.isfinite(loss.detach())
                loss_sum += loss.detach().float()
                engine.backward(loss)
                if micro == lay.grad_accum - 1:  # the boundary: DeepSpeed calls opt.step() now
                    opt.bad_loss, opt.stepped = bool(bad), False
                engine.step()
            skipped = not opt.stepped or opt.skipped
            self.step += 1
            self.consumed += lay.global_batch_size
            if skipped:
                consecutive += 1
                self.skipped_total += 1
                self.monitor.print(f"warning: step {self.step}: non-finite loss or gradient, step skipped "
                                   f"({consecutive} in a row)")
            else:
                consecutive = 0
                window_loss += float(loss_sum) / lay.grad_accum
                window_steps += 1
            stop = self._agree(self.stop.requested)
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.max_steps:
                self._log(window_loss, window_steps, time.perf_counter() - t_window, lr, grad_norm(engine, opt))
                window_loss, window_steps, t_window = 0.0, 0, time.perf_counter()
            if consecutive >= cfg.train.max_consecutive_skips:
                path = self._save()
                self.monitor.print(f"error: {consecutive} consecutive non-finite steps; stopped. The last good "
                                   f"weights are in {path}. Lower optim.lr, raise warmup, or check the data.")
                return EXIT_NONFINITE
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                self._validate()
            if stop:
                path = self._save()
                self.monitor.print(f"stop requested (SIGTERM/SIGUSR1): saved {path} at step {self.step}; exiting")
                return 0
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self._save()
            faults.kill_if("kill", self.step, self.rank)
            faults.after_step()
        if not cfg.train.eval_interval or self.step % cfg.train.eval_interval:
            self._validate()
        path = self._save()
        self.monitor.print(f"done: step {self.step}, checkpoint {path}")
        return 0

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank has `flag` (signals reach ranks at different times)."""
        t = torch.tensor([float(flag)], device=self._comm_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _mean_over_dp(self, value: float) -> float:
        """Mean over the data-parallel replicas. Tensor-parallel peers hold the same loss, and a
        pipeline's `train_batch`/`eval_batch` give every stage the last stage's DP-mean loss."""
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, group=self.topo.dp_group)
        return float(t.item()) / self.layout.dp

    def _log(self, loss_total: float, n: int, elapsed: float, lr: float, gnorm: float) -> None:
        from pretrain.monitor import memory_gib, peak_flops

        lay, steps = self.layout, self.cfg.logging.interval
        loss = self._mean_over_dp(loss_total / n if n else float("nan"))
        tokens_per_sec = steps * lay.global_batch_size * self.cfg.model.seq_len / max(elapsed, 1e-9)
        flops_dev = tokens_per_sec * self.flops_per_token / lay.world_size
        peak = peak_flops(self.device, self.cfg.train.precision, self.cfg.logging.peak_flops)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm,
                   "perf/tokens_per_sec": tokens_per_sec, "perf/tflops_per_device": flops_dev / 1e12,
                   "perf/mfu": flops_dev / peak if peak else None,
                   "perf/step_time_ms": 1e3 * elapsed / steps,
                   "train/skipped_steps": self.skipped_total,
                   "train/consumed_tokens": self.consumed * self.cfg.model.seq_len,
                   **memory_gib(self.device)}
        if self.cfg.train.precision == "fp16":
            scalars["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
        self.monitor.log(self.step, scalars)
        self.monitor.train_line(self.step, scalars)

    def _validate(self) -> None:
        batches = self.data.valid_batches()
        if batches is None:
            return
        self.engine.eval()
        total, n = 0.0, 0
        if self.pipe:  # mean over the micro-batches and data-parallel replicas, on every stage
            steps = self.cfg.train.eval_steps
            total = float(self.engine.eval_batch(((b[:, :-1], b[:, 1:]) for b in batches), num_micro_batches=steps))
            n = 1
        with torch.no_grad():
            for batch in ([] if self.pipe else batches):
                batch = batch.to(self.device)
                total += float(self.engine(batch[:, :-1], batch[:, 1:]))
                n += 1
        self.engine.train()
        loss = self._mean_over_dp(total / max(n, 1))
        ppl = math.exp(loss) if loss < 50 else float("inf")
        self.monitor.log(self.step, {"val/loss": loss, "val/perplexity": ppl})
        self.monitor.print(f"validation at step {self.step}: loss {loss:.4f} | perplexity {ppl:.2f}")

    def _save(self) -> Path:
        """Start the checkpoint of this step (committed in the background with checkpoint.async_save);
        a save that is not a periodic one (the last, a stop, a non-finite stop) is committed on return."""
        from pretrain.checkpoint_writer import CheckpointWriter

        c = self.cfg.checkpoint
        if self.writer is None:
            self.writer = CheckpointWriter(self.ckpt_dir, c.keep_last, c.async_save,
                                           60 * self.cfg.parallel.timeout_minutes, self.data.tokenizer_copy,
                                           resumed_step=self.resumed_step)
        path = self.writer.save(self.engine, self.step, self._state())
        stop = getattr(getattr(self, "stop", None), "requested", False)
        if stop or self.step >= self.cfg.train.max_steps or not c.interval or self.step % c.interval:
            self.writer.wait()
        return path


if __name__ == "__main__":
    sys.exit(main())
