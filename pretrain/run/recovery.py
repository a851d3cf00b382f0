"""The trainer's part that reads the skip verdicts at a boundary and acts on a streak of them:
warn, count, and roll back to the newest committed checkpoint past the samples read since it
(guard.rollback_after, docs/GUARD.md). A mixin of `pretrain.run.trainer.Trainer`, whose state
(monitor, ledger, skips, writer, ...) it uses."""
from __future__ import annotations

from pretrain.checkpoint import store

EXIT_NONFINITE = 3  # the guard's stop: not retried by launch/'s auto-resume


class Recovery:
    def _settle(self) -> int:
        """Read the steps since the last boundary (one device-to-host copy): count skips, warn, add
        the stepped losses to the window. Returns the longest run of skipped steps among them
        (counting the run they continue)."""
        from pretrain.run.steplog import OK, SKIP, SPIKE

        for step, loss, outcome in self.ledger.settle():
            self.skips.record(outcome)
            if outcome in (SKIP, SPIKE):
                what = "non-finite loss or gradient" if outcome == SKIP else \
                    f"loss or gradient norm over {self.cfg.guard.spike_sigma:g} sigma of its window"
                self.monitor.print(f"warning: step {step}: {what}, step skipped ({self.skips.in_a_row} in a row)")
            elif outcome == OK:
                self.window_loss += loss
                self.window_good += 1
        self.skipped_total = self.skips.total
        streak = self.skips.worst_run
        self.skips.reset_worst()
        return streak

    def _rollback(self, streak: int):
        """guard.rollback_after: reload the newest committed checkpoint and go on past the samples
        read since it (recorded, so a later resume from that checkpoint skips them too). An exit
        code when it cannot (guard.max_rollbacks reached, or nothing committed), else None."""
        g, done = self.cfg.guard, len(self.skip_ledger.rollbacks)
        if self.writer is not None:
            with self.watchdog.grace("checkpoint"):
                self.writer.wait()  # a periodic save in flight is committed first: it is the newest
        if done >= g.max_rollbacks:
            self.monitor.print(f"error: {streak} skipped steps in a row at step {self.step} after {done} rollback(s) "
                               f"(guard.max_rollbacks={g.max_rollbacks}); stopped. Check the data near sample "
                               f"{self.consumed}, or lower optim.lr.")
            return EXIT_NONFINITE
        reached = self.consumed
        with self.watchdog.grace("rollback"):
            tag_dir = store.choose_resume("auto", self.ckpt_dir, self.monitor.print, self.cfg.checkpoint.verify,
                                          load=self._resume)
        if tag_dir is None:
            self.monitor.print(f"error: {streak} skipped steps in a row at step {self.step} and no committed "
                               "checkpoint to roll back to; stopped. Set checkpoint.interval, or check the data.")
            return EXIT_NONFINITE
        self.skip_ledger.record(self.step, self.consumed, reached, write=self.rank == 0)
        self.monitor.rewind(self.step)  # the steps after the checkpoint are trained again
        self.monitor.log(self.step, {"guard/rollbacks": done + 1, "guard/skipped_samples": reached - self.consumed})
        self.monitor.print(f"guard: {streak} skipped steps in a row; rolled back to {tag_dir.name} (step {self.step}) "
                           f"and skipped samples {self.consumed}-{reached - 1}; rollback {done + 1} of at most "
                           f"{g.max_rollbacks}")
        self.consumed = reached
        self.skips = type(self.skips)(self.skipped_total, self.skipped_spikes)
        self._open_data()
        self._open_window()
        return None
