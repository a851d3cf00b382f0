"""pretrain-convert: checkpoints to and from transformers, and across parallel layouts.

    pretrain-convert export-hf --run RUN_DIR [--step N] --out DIR [--dtype bfloat16] [--max-shard-size 5GB]
                              [--no-tokenizer]
    pretrain-convert import-hf --model HF_DIR --config FILE --out RUN_DIR [overrides ...]
    pretrain-convert reshard   --run RUN_DIR [--step N]

See docs/INTEROP.md. User mistakes print one `error:` line and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from pretrain.errors import HelpFormatter, UserError, cli_entry


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-convert", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{export-hf,import-hf,reshard}")

    e = sub.add_parser("export-hf", formatter_class=HelpFormatter,
                       help="write a transformers model directory from a checkpoint")
    e.add_argument("--run", required=True, help="run directory, checkpoints/ dir, step_* dir, or an import-hf init dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest committed)")
    e.add_argument("--out", required=True, help="output directory (new or empty)")
    e.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    e.add_argument("--max-shard-size", default="5GB", help="shard the safetensors above this size (default 5GB)")
    e.add_argument("--vocab-size", type=int, default=None,
                   help="rows of the embedding to export (default: the run's real vocabulary)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    e.add_argument("--no-tokenizer", action="store_true",
                   help="export the weights even though the run has no Hugging Face tokenizer to go with them")

    i = sub.add_parser("import-hf", formatter_class=HelpFormatter,
                       help="initialise a run from a local transformers GPT-2 / Llama model")
    i.add_argument("--model", required=True, help="local transformers model directory (config.json + safetensors)")
    i.add_argument("--config", default=None, help="the run's YAML config (its model section must match)")
    i.add_argument("--out", required=True, help="the run directory to initialise (train.out_dir)")
    i.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.vocab_size=50257")
    i.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="import even though the data was tokenized with another tokenizer")
    i.add_argument("--force", action="store_true", help="replace an earlier import / ignore existing checkpoints")

    r = sub.add_parser("reshard", formatter_class=HelpFormatter,
                       help="make a checkpoint resumable in another data/tensor/pipeline layout "
                                       "or ZeRO stage")
    r.add_argument("--run", required=True, help="run directory, checkpoints/ dir or step_* dir")
    r.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest committed)")
    r.add_argument("--verbose", action="store_true", help="show DeepSpeed's conversion output")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.cmd == "export-hf":
        from pretrain.interop.hf_export import export_hf

        export_hf(a.run, a.out, a.step, a.dtype, a.max_shard_size, a.vocab_size, a.overwrite,
                  no_tokenizer=a.no_tokenizer)
    elif a.cmd == "import-hf":
        from pretrain.interop.hf_import import import_hf

        import_hf(a.model, a.config, a.out, a.overrides, a.allow_tokenizer_mismatch, a.force)
    elif a.cmd == "reshard":
        from pretrain.interop.hf_export import find_tag_dir
        from pretrain.interop.reshard import reshard_checkpoint

        reshard_checkpoint(find_tag_dir(a.run, a.step), verbose=a.verbose)
    else:  # pragma: no cover - argparse enforces the choices
        raise UserError(f"unknown command {a.cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
