"""Evaluation of the live engine, in any layout: the validation loss (and its mean over the
data-parallel replicas), and the downstream tasks of eval.tasks (lm-evaluation-harness through
pretrain.eval)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def mean_over_dp(value: float, group, dp: int) -> float:
    """Mean over the data-parallel replicas. Tensor-parallel peers hold the same loss, and a
    pipeline's `train_batch`/`eval_batch` give every stage the last stage's DP-mean loss."""
    from pretrain.run.engine import comm_device

    t = torch.tensor([value], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, group=group)
    return float(t.item()) / dp


def validation_loss(engine, batches, pipe: bool, eval_steps: int, device: torch.device, docs=None) -> float:
    """This replica's mean loss over `batches` (micro-batches of seq_len + 1 tokens), the engine
    back in training mode after. `docs`: the run's packed-document options (the same segments
    and loss mask as in training; each micro-batch's own mean)."""
    from pretrain.run.batches import pipe_pairs, split

    engine.eval()
    total, n = 0.0, 0
    if pipe:  # mean over the micro-batches and data-parallel replicas, on every stage
        engine.module.loss_fn.denominator = None  # each micro-batch's own mean, not the last step's divisor
        total = float(engine.eval_batch(pipe_pairs(batches, docs), num_micro_batches=eval_steps))
        n = 1
    with torch.no_grad():
        for batch in ([] if pipe else batches):
            inputs, labels, kwargs = split(batch.to(device), docs)
            total += float(engine(inputs, labels, **kwargs))
            n += 1
    engine.train()
    return total / max(n, 1)


def open_tasks(cfg, layout, topo, tokenizer_dir, log):
    """eval.tasks, loaded once (collective): a pretrain.eval.harness.LiveEval with the data's
    tokenizer. A task that cannot load warns once and is dropped."""
    from pretrain.data.tokenizer import tokenizer_from_manifest
    from pretrain.eval.harness import LiveEval

    e = cfg.eval
    live = LiveEval(cfg, layout, topo, tokenizer_from_manifest(str(tokenizer_dir)), e.tasks, limit=e.limit,
                    include_path=e.include_path, log=log)
    loaded = live.prepare()
    when = f"every {e.interval} steps and at the end" if e.interval else "at the end"
    log(f"eval: {', '.join(loaded) or 'no task'} loaded (of {', '.join(e.tasks)}), evaluated {when}")
    return live


def task_scalars(results: dict) -> dict:
    """{'eval/<task>/<metric>': value} of LiveEval's {task: {metric: value}}."""
    return {f"eval/{task}/{metric}": value for task, ms in results.items() for metric, value in ms.items()}


class Evaluating:
    """The trainer's evaluations (a mixin of `pretrain.run.trainer.Trainer`): the validation or
    test loss, and eval.tasks on the live model."""

    def _validate(self, which: str = "val") -> None:
        batches = self.data.valid_batches() if which == "val" else self.data.test_batches()
        if batches is None:
            return
        loss = self._mean_over_dp(validation_loss(self.engine, batches, self.pipe, self.cfg.train.eval_steps,
                                                  self.device, self.docs))
        ppl = math.exp(loss) if loss < 50 else float("inf")
        self.monitor.log(self.step, {f"{which}/loss": loss, f"{which}/perplexity": ppl},
                         tokens=self.consumed * self.cfg.model.seq_len)
        self.monitor.print(f"{'validation' if which == 'val' else which} at step {self.step}: loss {loss:.4f} | "
                           f"perplexity {ppl:.2f}")

    def _live_eval(self):
        return open_tasks(self.cfg, self.layout, self.topo, self.data.tokenizer_dir, self.monitor.print)

    def _downstream(self) -> None:
        """eval.tasks on the live model (every rank; RNG states restored, so training goes on
        exactly as without it): eval/<task>/<metric> scalars at this step."""
        scalars = task_scalars(self.live_eval(self.engine))
        if scalars:
            self.monitor.log(self.step, scalars)
            self.monitor.print(f"eval at step {self.step}: " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()))
