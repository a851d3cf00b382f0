"""Train a GPT: `python -m pretrain.train --config FILE [section.key=value ...]`.

Runs as one process, under `torchrun`, or under the `deepspeed` launcher. The flow:
config -> validated layout (before any process group) -> process group -> data ->
model -> DeepSpeed engine -> resume -> loop (log, validate, checkpoint) -> clean exit.
This module is the command line (and the offline --plan/--check/--print-* modes);
`pretrain.run.trainer.Trainer` is the run.
"""
from __future__ import annotations

import sys

# Run as the program (`python -m pretrain.train`, the `pretrain-train` script): catch a stop
# signal already while the imports below load torch (seconds), not only from main() on.
if __name__ == "__main__" or getattr(sys, "argv", [""])[0].endswith("pretrain-train"):
    from pretrain.run import stop as _stop

    _stop.install()

import argparse
import os
from dataclasses import asdict

from pretrain.plan import preflight
from pretrain.run import stop
from pretrain.config.load import config_to_yaml, load_config
from pretrain.config.schema import Config
from pretrain.config.validate import resolve
from pretrain.interop.names import export_warnings
from pretrain.errors import HelpFormatter, UserError, cli_entry
from pretrain.data.manifest import data_vocab_size
from pretrain.run.trainer import Trainer

def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-train", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", action="append", default=[],
                   help="YAML config (see configs/); repeat to merge several in order (later files win "
                        "field by field); omit for all defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-deepspeed-config", action="store_true",
                   help="print the DeepSpeed config this job hands to deepspeed.initialize (JSON) and exit")
    p.add_argument("--plan", action="store_true",
                   help="print parameters, FLOPs, batch plan, layout and memory estimate, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="world size to plan or check for (default: $WORLD_SIZE or 1)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, layout and DeepSpeed config for the world size, then exit "
                        "(the launch scripts run this before starting any process)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # appended by the deepspeed launcher; LOCAL_RANK is used
    return p.parse_args(argv)


def program() -> None:
    """The `pretrain-train` script and `python -m pretrain.train`: main(), then leave()."""
    leave(main())


def leave(rc: int) -> None:
    """End the process with `rc`. One that joined a process group ends without interpreter
    teardown: DeepSpeed keeps references to its process groups after destroy_process_group, so
    their gloo threads outlive it, and freeing them while the interpreter finalizes can abort the
    finished process (SIGABRT, "terminate called without an active exception"; seen in CI about
    once in a few hundred runs). Everything is written, closed and destroyed by then; the atexit
    handlers still run (logging's flush, a wrapper's report)."""
    if not Trainer.joined:
        sys.exit(rc)
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


@cli_entry
def main(argv=None) -> int:
    stop.install()  # first: SIGTERM/SIGUSR1 from now on mean "checkpoint and exit 0"
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.config and args.overrides and args.overrides[0].endswith((".yaml", ".yml")):
        args.config = [args.overrides.pop(0)]  # `pretrain-train FILE ...` works too
    cfg = load_config(args.config, args.overrides)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    offline = args.plan or args.print_config or args.print_deepspeed_config  # no process group, no GPU
    data_vocab = None
    if not cfg.data.synthetic:
        try:
            data_vocab = data_vocab_size(cfg.data.paths)
        except UserError:
            if not offline:
                raise  # planning and printing work without prepared data
    # Offline, train.device=cuda plans a GPU job from a CPU node (checked again at launch).
    layout = resolve(_vocab_placeholder(cfg, data_vocab, args), world, data_vocab,
                     cuda_available=True if offline and cfg.train.device == "cuda" else None)
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in export_warnings(asdict(cfg.model)):
            print(warning, file=sys.stderr, flush=True)
    if offline and cfg.train.device == "auto" and layout.device == "cpu":
        print("note: no CUDA device here, so train.device auto plans for the CPU; add train.device=cuda "
              "to plan a GPU job", file=sys.stderr)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
    if not args.print_config or args.plan or args.print_deepspeed_config:
        preflight.check_deepspeed(cfg, layout)  # DeepSpeed's own config model, before any process starts
    if args.print_deepspeed_config:
        import json

        from pretrain.run.engine import engine_ds_config

        print(json.dumps(engine_ds_config(cfg, layout), indent=2))
    if args.plan:
        from pretrain.plan.report import format_plan

        print(format_plan(cfg, layout))
    if offline:
        return 0
    if args.check:
        print(f"config ok for {layout.world_size} process(es)")
        return 0
    return Trainer(cfg, layout).run()


def _vocab_placeholder(cfg: Config, data_vocab: int | None, args) -> Config:
    """--print-config / --print-deepspeed-config before the data exists: model.vocab_size null is
    filled from the data later, so every other rule is checked with a stand-in vocabulary."""
    if cfg.model.vocab_size is not None or data_vocab is not None or args.plan or cfg.data.synthetic:
        return cfg  # (--plan needs the real size: the error says to set model.vocab_size)
    import copy

    probe = copy.deepcopy(cfg)
    probe.model.vocab_size = probe.model.vocab_multiple
    return probe


if __name__ == "__main__":
    program()
