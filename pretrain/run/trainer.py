"""The training run behind `pretrain-train` (pretrain/train.py is its command line): process
group -> data -> model -> DeepSpeed engine -> resume or init -> loop (log, validate,
checkpoint) -> clean exit."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import dsadapter, faults
from pretrain.checkpoint import store
from pretrain.plan import preflight
from pretrain.run import batches as feed, init_from, lock, stop, watchdog
from pretrain.config.load import config_to_yaml
from pretrain.config.schema import SHAPE_KEYS, Config, to_dict
from pretrain.config.validate import Layout
from pretrain.errors import UserError
from pretrain.checkpoint.resume_check import resolved_config
from pretrain.model.doc_check import self_check
from pretrain.run.data import RunData
from pretrain.run.evaluation import Evaluating
from pretrain.run.recovery import EXIT_NONFINITE, Recovery
from pretrain.run.schedule import lr_at


class Trainer(Recovery, Evaluating):
    joined = False  # this process joined a process group (see leave)

    def __init__(self, cfg: Config, layout: Layout):
        self.cfg, self.layout = cfg, layout
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out_dir / "checkpoints"

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        from pretrain.run.engine import init_distributed, pick_device

        self.stop = stop.install()
        self.device = pick_device(self.cfg)
        if self.cfg.guard.step_timeout:
            watchdog.enable_flight_recorder()  # before the process group: hang/ files name the collective
        Trainer.joined = True
        self.rank, _ = init_distributed(self.cfg, self.device)
        ok = False
        try:
            self._locks = self._claim_dirs()
            rc = self._run()
            ok = True
            return rc
        finally:
            if getattr(self, "watchdog", None):
                self.watchdog.stop()
            if getattr(self, "monitor", None):
                self.monitor.close()
            if ok:
                dist.barrier()
            dist.destroy_process_group()

    def _claim_dirs(self) -> list:
        """Rank 0, before anything is written: the directories are writable and this run's alone
        (pretrain.run.lock); every rank gets rank 0's verdict."""
        verdict, locks = None, []
        if self.rank == 0:
            try:
                preflight.check_dir(self.out_dir, "train.out_dir")
                preflight.check_dir(self.ckpt_dir, "checkpoint.dir" if self.cfg.checkpoint.dir else "train.out_dir")
                locks = lock.lock_run(self.out_dir, self.ckpt_dir, print)
                preflight.check_free_space(self.cfg, self.layout, self.ckpt_dir, print)
            except UserError as e:
                verdict = str(e)
        verdict = store.broadcast_from_rank0(verdict)
        if verdict:
            raise UserError(verdict)
        return locks

    def _run(self) -> int:
        from pretrain.run.engine import build_engine
        from pretrain.run.monitor import Monitor
        from pretrain.parallel.build import build_model, memory_line, optimizer_group_names
        from pretrain.parallel.topology import Topology
        from pretrain.model.size import count_params, flops_per_token
        from pretrain.plan.estimate import layout_advice

        cfg, lay = self.cfg, self.layout
        self.topo = Topology(lay)  # every rank/group question goes here (DeepSpeed's grid)
        self.dp_rank = self.topo.dp_rank  # tensor-parallel peers (and pipeline stages) read the same batches
        self.pipe = lay.pp > 1
        wandb = {"project": cfg.logging.wandb_project, "config": to_dict(cfg)} if cfg.logging.wandb else None
        self.monitor = Monitor(self.out_dir, self.rank == 0, cfg.logging.tensorboard, cfg.train.max_steps, wandb)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            store.write_atomic(self.out_dir / "config.yaml", config_to_yaml(cfg))
        self.data = RunData(cfg, lay, self.rank, self.dp_rank, self.out_dir, self.monitor.print)

        # checkpoint.init_from: imported weights (import-hf) or one of our checkpoints (continued
        # pretraining); a resume overrides them.
        source, init_tag = (init_from.weights(cfg, lay, self._model_shape(), self.monitor.print)
                            if cfg.checkpoint.init_from else (None, None))
        self.docs = feed.run_documents(cfg, self.data, self.device)  # packed-document options, or None
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, in every layout
        model = build_model(cfg, lay, self.topo, self.device, source, self.docs)  # this rank's piece, on its device
        print(memory_line(self.rank, self.device), flush=True)
        self.optim_groups = optimizer_group_names(model, cfg, self.topo)  # recorded in every checkpoint
        self.engine, self.opt = build_engine(cfg, lay, model, self.topo)
        self.flops_per_token = flops_per_token(cfg.model, lay.padded_vocab_size)

        self.step, self.consumed, self.skipped_total = 0, 0, 0
        self.writer, self.resumed_step, self.skips, self.skipped_spikes = None, None, None, 0
        from pretrain.run.guard import SkipLedger, StragglerWatch

        self.skip_ledger = SkipLedger(self.out_dir)  # the samples earlier rollbacks skipped
        self.straggler_watch = StragglerWatch(cfg.guard.straggler_threshold, cfg.guard.straggler_windows)
        # The newest checkpoint that verifies and loads (self._resume), the same on every rank.
        tag_dir = store.choose_resume(cfg.checkpoint.resume, self.ckpt_dir, self.monitor.print,
                                           cfg.checkpoint.verify, load=self._resume)
        if tag_dir is not None:
            self.monitor.rewind(self.step)  # drop what the stopped run logged after this checkpoint
        elif init_tag is not None and cfg.checkpoint.init_optimizer:
            init_from.optimizer(self.engine, init_tag, self._state()["layout"], self.monitor.print, self.topo)
        if tag_dir is not None and self.step >= cfg.train.max_steps:
            # A finished run started again (e.g. the quickstart re-run): its last checkpoint is
            # already committed, so nothing is trained, validated or saved over it.
            self.monitor.print(f"nothing to train: {tag_dir} is at step {self.step}, train.max_steps is "
                               f"{cfg.train.max_steps}; raise train.max_steps to train further")
            return 0
        self.live_eval = self._live_eval() if cfg.eval.tasks else None
        n_params = count_params(cfg.model, lay.padded_vocab_size)["total"]
        self.monitor.print(f"training {n_params:,} parameters on {lay.world_size} {self.device.type} process(es) "
                           f"(data {lay.dp} x tensor {lay.tp} x pipeline {lay.pp}) "
                           f"from step {self.step} to {cfg.train.max_steps}")
        for note in layout_advice(cfg, lay):
            self.monitor.print(note)
        if self.docs is not None:  # before step 1: does the attention path keep documents apart?
            self_check(cfg.model, self.docs, self.device, self.data.vocab_size)
            self.monitor.print(self.docs.describe() + " (self-check passed)")
        rc = self._loop()
        if self.writer is not None:
            with self.watchdog.grace("checkpoint"):
                self.writer.wait()  # the last save is committed before the exit
        return rc

    # ------------------------------------------------------------------ resume
    def _state(self) -> dict:
        return {"format": 2, "step": self.step, "consumed_samples": self.consumed,
                "consumed_tokens": self.consumed * self.cfg.model.seq_len,
                "skipped_steps": self.skipped_total, "skipped_spikes": self.skips.spikes if self.skips else 0,
                "guard_window": self.opt.spikes.state() if self.opt.spikes is not None else None,
                "config": resolved_config(self.cfg),
                "model_shape": self._model_shape(), "data_fingerprint": self.data.fingerprint,
                "data_sources": self.data.sources(), "vocab_size": self.data.vocab_size,
                "tokenizer": self.data.tokenizer,
                "layout": {"dp": self.layout.dp, "tp": self.layout.tp, "pp": self.layout.pp,
                           "zero_stage": self.layout.zero_stage},
                "optimizer_groups": self.optim_groups,
                "versions": {"torch": torch.__version__, "deepspeed": dsadapter.version()}}

    def _model_shape(self) -> dict:
        m = to_dict(self.cfg.model)
        shape = {k: m[k] for k in SHAPE_KEYS}
        shape["padded_vocab_size"] = self.layout.padded_vocab_size
        if m["position"] == "learned":
            shape["seq_len"] = m["seq_len"]
        return shape

    def _resume(self, tag_dir: Path) -> None:
        from pretrain.checkpoint.resume_check import check_resume

        saved = store.read_state(tag_dir)
        for line in check_resume(saved, self.cfg, self._model_shape(), self.layout.tp, self.data, f"checkpoint {tag_dir}"):
            self.monitor.print(line)
        now = self._state()["layout"]
        # Same model-parallel grid, other parameter order: the optimizer state is matched by name.
        same_grid = all((saved.get("layout") or {}).get(k, 1) == now[k] for k in ("tp", "pp"))
        reordered = same_grid and saved.get("optimizer_groups", self.optim_groups) != self.optim_groups
        if saved.get("layout") != now or reordered:
            from pretrain.interop.reshard import load_resharded  # UserError naming the fix when it cannot

            state = load_resharded(self.engine, tag_dir, saved.get("layout") or {}, now, self.monitor.print,
                                   topo=self.topo, reordered=reordered)
        else:
            state = store.load(self.engine, tag_dir)
        self.step, self.consumed = state["step"], state["consumed_samples"]
        self.skipped_total, self.resumed_step = state.get("skipped_steps", 0), self.step
        self.skipped_spikes = state.get("skipped_spikes", 0)
        if self.opt.spikes is not None:
            self.opt.spikes.load(state.get("guard_window"))
        jumped = self.skip_ledger.jump(self.step, self.consumed)  # past the samples a rollback skipped
        note = f" (samples {self.consumed}-{jumped - 1} skipped by a rollback)" if jumped != self.consumed else ""
        self.consumed = jumped
        self.monitor.print(f"resumed from {tag_dir} at step {self.step}{note}")

    def _shape_mismatch(self, where: str, shape: dict) -> str:
        from pretrain.checkpoint.resume_check import shape_message

        return shape_message(where, shape, self._model_shape(), self.layout.tp)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> int:
        """The steps. Between boundaries (logging, checkpoint, validation) a step copies nothing
        from the device: losses and skip verdicts stay there (`pretrain.run.steplog`) and are read,
        with the stop-request agreement, at the boundaries."""
        from pretrain.run.steplog import StepLedger, SkipCount

        cfg, lay = self.cfg, self.layout
        self.ledger, self.skips = StepLedger(), SkipCount(self.skipped_total, self.skipped_spikes)
        self._open_data()
        self._open_window()
        self._first_step = self.step
        # Every rank, at the same point (it makes a process group); the start-up allowance
        # covers the first step (compile, data warm-up).
        g = cfg.guard
        self.watchdog = watchdog.Watchdog(self.out_dir, self.rank, g.step_timeout, g.startup_timeout,
                                          print_fn=print).start()
        while self.step < cfg.train.max_steps:
            lr = lr_at(self.step, cfg.optim, cfg.schedule, cfg.train.max_steps)
            busy = time.thread_time()
            loss_sum = self._train_step(self.batches, lr)
            self.window_busy += time.thread_time() - busy
            self.step += 1
            self.watchdog.step_done(self.step)
            self.consumed += lay.global_batch_size
            if cfg.train.compile and self.step == self._first_step + 1:
                self._report_compile()
            # opt.calls == 0: DeepSpeed skipped the step itself (fp16 loss scaler, or its norm check)
            self.ledger.add(self.step, loss_sum / lay.grad_accum, self.opt.reason if self.opt.calls else None,
                            cfg.train.precision == "fp16")
            rc = self._boundary(lr)
            if rc is not None:
                return rc
            faults.kill_if("kill", self.step, self.rank)
            faults.after_step()
        if not cfg.train.eval_interval or self.step % cfg.train.eval_interval:
            self._timed("validation", self._validate)
        if self.live_eval is not None and (not cfg.eval.interval or self.step % cfg.eval.interval):
            self._timed("eval", self._downstream)
        self._timed("validation", lambda: self._validate("test"))  # once, at the end (data.test_paths, or a test split)
        path = self._timed("checkpoint", self._save)
        self.monitor.print(f"done: step {self.step}, checkpoint {path}")
        return 0

    def _train_step(self, batches, lr: float) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches at learning rate `lr`; the summed
        micro-batch losses, on the device. A non-finite loss is skipped by every rank alike
        (GuardedAdamW: the verdict is agreed on the device, at step time)."""
        lay, engine, opt = self.layout, self.engine, self.opt
        for group in opt.param_groups:
            group["lr"] = lr
        engine.train()
        faults.in_step(self.step, self.rank)
        faults.poison_grad(engine.module, self.step, self.rank)
        factor = faults.loss_factor(self.step, self.rank, self.consumed, lay.global_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        micro, denominator = feed.step_micro_batches(batches, self.pipe, lay, self.docs, self.topo.dp_group)
        if self.pipe:  # 1F1B over grad_accum micro-batches; the loss comes from the last stage
            engine.module.loss_fn.factor = factor
            engine.module.loss_fn.denominator = denominator
            opt.begin_step()  # the loss is read at step time (GuardedAdamW.loss_source)
            return loss_sum + engine.train_batch(data_iter=micro).detach().float() * lay.grad_accum
        for k in range(lay.grad_accum):
            inputs, labels, kwargs = next(micro)
            loss = engine(inputs, labels, denominator=denominator, **kwargs)
            if factor != 1.0:
                loss = loss * factor
            loss_sum += loss.detach().float()
            engine.backward(loss)
            if k == lay.grad_accum - 1:  # the boundary: DeepSpeed calls opt.step() now
                opt.begin_step(loss_sum / lay.grad_accum)
            engine.step()
        return loss_sum

    def _open_data(self) -> None:
        """The training batches from sample `self.consumed` on."""
        self.batches = self.data.train_batches(self.consumed)
        if self.pipe:  # DeepSpeed reads (inputs, labels) on the first and last stages only
            self.batches = feed.pipe_pairs(self.batches, self.docs)

    def _open_window(self) -> None:
        """Start a throughput window at this step: its stepped losses, the seconds of validation
        and checkpoints it excludes, and this rank's busy (CPU) seconds in its steps."""
        self.window_loss, self.window_good, self.window_busy = 0.0, 0, 0.0
        self.window_start, self.excluded = self.step, 0.0
        self.t_window = time.perf_counter()

    def _boundary(self, lr: float):
        """After a step: log, stop, validate or save where this step is such a boundary. An
        exit code when the run ends here, else None."""
        cfg = self.cfg
        log_now = self.step % cfg.logging.interval == 0 or self.step == cfg.train.max_steps
        save_now = bool(cfg.checkpoint.interval) and self.step % cfg.checkpoint.interval == 0
        eval_now = bool(cfg.train.eval_interval) and self.step % cfg.train.eval_interval == 0
        tasks_now = self.live_eval is not None and bool(cfg.eval.interval) and self.step % cfg.eval.interval == 0
        if not (log_now or save_now or eval_now or tasks_now):
            return None
        streak = self._settle()
        g, limit = cfg.guard, cfg.train.max_consecutive_skips
        if g.rollback_after and streak >= g.rollback_after and not (limit and streak >= limit):
            return self._rollback(streak)  # every rank alike: the verdicts were agreed
        # Signals reach ranks at different times: agree at boundaries (with every rank's busy time).
        stop, busy = self._agree(self.stop.requested) if log_now or save_now else (False, None)
        if log_now:
            elapsed = time.perf_counter() - self.t_window - self.excluded
            self._log(self.window_loss, self.window_good, self.step - self.window_start, elapsed, lr,
                      self.opt.grad_norm, busy)
            self._open_window()
        if limit and streak >= limit:
            path = self._timed("checkpoint", self._save)
            self.monitor.print(f"error: {streak} consecutive non-finite steps or spikes skipped (train.max_consecutive_skips); stopped. "
                               f"The last good weights are in {path}. Lower optim.lr, raise warmup, or check the data.")
            return EXIT_NONFINITE
        if eval_now:
            self._timed("validation", self._validate)
        if tasks_now:
            self._timed("eval", self._downstream)
        if stop:
            path = self._timed("checkpoint", self._save)
            self.monitor.print(f"stop requested (SIGTERM/SIGUSR1): saved {path} at step {self.step}; exiting")
            return 0
        if save_now:
            self._timed("checkpoint", self._save)
        return None

    def _report_compile(self) -> None:
        from torch._dynamo.utils import counters

        self.monitor.print(f"train.compile: {counters['stats']['unique_graphs']} graph(s) compiled by "
                           f"torch.compile in the first step ({counters['stats']['calls_captured']} calls captured)")

    def _timed(self, what: str, fn):
        """Run a validation or a save outside the throughput window; its seconds get their own scalar."""
        t0 = time.perf_counter()
        faults.pause(what)
        with self.watchdog.grace(what):
            out = fn()
        seconds = time.perf_counter() - t0
        self.excluded += seconds
        self.monitor.log(self.step, {f"perf/{what}_seconds": seconds})
        return out

    def _agree(self, flag: bool) -> tuple[bool, list[float]]:
        """(True on every rank when any rank has `flag` (signals reach ranks at different times),
        every rank's busy seconds per step in this window), in one all-reduce."""
        from pretrain.run.engine import comm_device

        world = dist.get_world_size()
        t = torch.zeros(world + 1, dtype=torch.float64)
        t[0] = float(flag)
        t[1 + self.rank] = self.window_busy / max(self.step - self.window_start, 1)
        t = t.to(comm_device())
        dist.all_reduce(t)
        t = t.tolist()
        return t[0] > 0, t[1:]

    def _mean_over_dp(self, value: float) -> float:
        from pretrain.run.evaluation import mean_over_dp

        return mean_over_dp(value, self.topo.dp_group, self.layout.dp)

    def _log(self, loss_total: float, n: int, steps: int, elapsed: float, lr: float, gnorm: float,
             busy: list[float]) -> None:
        """Log the window of `steps` steps that took `elapsed` training seconds (validation and
        checkpoint time excluded): `n` of them stepped, their losses summing to `loss_total`."""
        from pretrain.run.monitor import throughput

        loss = self._mean_over_dp(loss_total / n if n else float("nan"))
        straggler_scalars, named = self.straggler_watch.update(busy)
        if named:
            self.monitor.print(named)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm,
                   **throughput(self.cfg, self.layout, self.device, self.flops_per_token, steps, elapsed),
                   "train/skipped_steps": self.skipped_total,
                   "train/skipped_steps/nonfinite": self.skipped_total - self.skips.spikes,
                   "train/skipped_steps/spike": self.skips.spikes,
                   **straggler_scalars,
                   "train/consumed_tokens": self.consumed * self.cfg.model.seq_len}
        if self.cfg.train.precision == "fp16":  # DeepSpeed's overflow skips: loss-scale events, not our skips
            scalars["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
            scalars["train/loss_scale_events"] = self.skips.loss_scale_events
        self.monitor.log(self.step, scalars)
        self.monitor.train_line(self.step, scalars)

    def _save(self) -> Path:
        """Start the checkpoint of this step (committed in the background with checkpoint.async_save);
        a save that is not a periodic one (the last, a stop, a non-finite stop) is committed on return."""
        from pretrain.checkpoint.writer import CheckpointWriter

        c = self.cfg.checkpoint
        if self.writer is None:
            self.writer = CheckpointWriter(self.ckpt_dir, c.keep_last, c.async_save,
                                           60 * self.cfg.parallel.timeout_minutes, self.data.tokenizer_copy,
                                           resumed_step=self.resumed_step)
        stop = getattr(getattr(self, "stop", None), "requested", False)
        last = stop or self.step >= self.cfg.train.max_steps or not c.interval or self.step % c.interval
        path = self.writer.save(self.engine, self.step, self._state(), durable=last)
        if last:
            self.writer.wait()
        return path
