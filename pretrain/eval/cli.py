"""Evaluate a checkpoint: `pretrain-eval --checkpoint RUN_OR_STEP --tasks NAME[,NAME] ...`.

Any saved layout: every process loads the checkpoint's merged weights (`interop.ds_reader`) as
one plain model; under torchrun the processes split the requests (data parallel) and each gets
all answers, so rank 0 prints lm-eval's table and writes its results JSON (`--output`).
`--perplexity FILE...` scores text / JSONL files in rolling windows (no lm-eval needed).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import store
from pretrain.errors import HelpFormatter, UserError, cli_entry, os_error_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-eval", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, its checkpoints/ dir, or a step_* dir")
    p.add_argument("--tasks", default=None, help="lm-eval task, group or tag names, comma-separated")
    p.add_argument("--include-path", default=None, help="a directory of task YAML files (e.g. configs/eval)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    p.add_argument("--log-samples", action="store_true", help="include every request and answer in --output")
    p.add_argument("--perplexity", nargs="+", default=[], metavar="FILE",
                   help="text or JSONL ('text' field) files to score in rolling windows")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (byte, hf:PATH, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if there is one)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the weights' dtype for evaluation")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per scored batch (bounds the logits' memory)")
    return p.parse_args(argv)


def check_args(a) -> list[str]:
    """One line per mistake, before anything is loaded; returns the task names."""
    names = [t.strip() for t in (a.tasks or "").split(",") if t.strip()]
    if not names and not a.perplexity:
        raise UserError("nothing to evaluate: pass --tasks NAME[,NAME] and/or --perplexity FILE...")
    if a.limit is not None and a.limit < 1:
        raise UserError(f"--limit {a.limit}: must be at least 1")
    if a.num_fewshot is not None and a.num_fewshot < 0:
        raise UserError(f"--num-fewshot {a.num_fewshot}: must be >= 0")
    if a.batch_tokens < 1:
        raise UserError(f"--batch-tokens {a.batch_tokens}: must be at least 1")
    if a.include_path and not Path(a.include_path).is_dir():
        raise UserError(f"--include-path {a.include_path}: no such directory")
    if a.output and not Path(a.output).resolve().parent.is_dir():
        raise UserError(f"--output {a.output}: its directory does not exist")
    for f in a.perplexity:
        if not Path(f).is_file():
            raise UserError(f"--perplexity {f}: no such file")
    if names:
        from pretrain.eval.harness import require_lm_eval

        require_lm_eval()
    return names


def pick_device(spec: str | None) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if spec is None:
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: no CUDA device is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {spec}: only cpu and cuda are supported")
    return torch.device("cuda", local) if dev.type == "cuda" and dev.index is None else dev


def start_group(device: torch.device) -> bool:
    """Join torchrun's process group (WORLD_SIZE > 1); True when this call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def load_model(tag_dir: Path, state: dict, device: torch.device, dtype: torch.dtype):
    """The checkpoint's merged weights (any saved layout) as one plain GPT, in eval mode."""
    from pretrain.config.load import config_from_dict
    from pretrain.interop.ds_reader import load_model_weights
    from pretrain.model.gpt import GPT

    cfg = config_from_dict(state["config"], source=str(tag_dir / store.STATE))
    model = GPT(cfg.model, state["model_shape"]["padded_vocab_size"], device="meta")  # filled by assignment
    missing, unexpected = model.load_state_dict(load_model_weights(tag_dir), strict=False, assign=True)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k.startswith("head."))]
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); was it written by another version?")
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(tag_dir: Path, state: dict, override: str | None):
    from pretrain.data.tokenizer import checkpoint_tokenizer

    return checkpoint_tokenizer(store.tokenizer_dir(tag_dir, state), override, tag_dir)


def run(a, names: list[str], device: torch.device) -> dict | None:
    from pretrain.eval.requests import prefix_token
    from pretrain.eval.scorer import ModelScorer

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tag_dir = store.resolve_tag_dir(a.checkpoint, split=world > 1)
    state = store.read_state(tag_dir)
    tok = load_tokenizer(tag_dir, state, a.tokenizer)
    rows = int(state["model_shape"]["padded_vocab_size"])
    if tok.vocab_size > rows:
        raise UserError(f"the tokenizer's {tok.vocab_size} tokens exceed the model's {rows} embedding rows")
    tasks = None
    if names:  # fail on a task before the weights are read
        from pretrain.eval.harness import TaskSet

        tasks = TaskSet(names, a.include_path, strict=True)
        tasks.objects()
    model = load_model(tag_dir, state, device, DTYPES[a.dtype])
    scorer = ModelScorer(model, valid_vocab=tok.vocab_size, dp_group=dist.group.WORLD if world > 1 else None)
    if rank0:
        print(f"evaluating {tag_dir} (step {state.get('step')}) on {world} process(es), {device}", flush=True)
    results = None
    if tasks is not None:
        from pretrain.eval import harness
        from pretrain.eval.lm import PretrainLM

        lm = PretrainLM(scorer, tok, batch_tokens=a.batch_tokens, name=str(tag_dir))
        results = harness.simple_evaluate(lm, tasks, a.limit, a.num_fewshot, a.log_samples)
        if rank0 and results is not None:
            print(harness.table(results), flush=True)
            if a.output:
                try:
                    Path(a.output).write_text(harness.results_json(results))
                except OSError as e:
                    raise UserError(os_error_line(e, a.output, "writing")) from None
                print(f"results written to {a.output}")
    if a.perplexity:
        from pretrain.eval.perplexity import file_perplexity, line

        for f in a.perplexity:
            r = file_perplexity(scorer, tok, prefix_token(tok), f, a.batch_tokens)
            if rank0:
                print(line(r), flush=True)
    return results


@cli_entry
def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    names = check_args(a)
    device = pick_device(a.device)
    ours = start_group(device)
    try:
        run(a, names, device)
    finally:
        if ours:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
