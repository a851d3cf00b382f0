"""The built-in default job, end to end with no download: `pretrain-quickstart`.

1. corpus: the Python standard library's own `.py` sources (about 31 MB on every
   machine with Python), one document per file, as JSONL;
2. data prep: a byte-level BPE trained on it, then Megatron-format token shards;
3. training: `configs/quickstart.yaml` through the DeepSpeed engine (CPU, or GPU if present),
   with TensorBoard logs and checkpoints;
4. a generated sample from the final checkpoint.

Re-running resumes: the shards are reused and training continues from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

from pretrain.config.load import preset_path
from pretrain.errors import HelpFormatter, UserError, cli_entry


def write_corpus(out: Path, max_mb: float | None) -> Path:
    """The stdlib's .py files as JSONL (sorted, so every run makes the same corpus)."""
    corpus = out / "corpus.jsonl"
    if corpus.exists():
        return corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget = max_mb * 2**20 if max_mb else float("inf")
    out.mkdir(parents=True, exist_ok=True)
    tmp = corpus.with_suffix(".tmp")
    size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in sorted(stdlib.rglob("*.py")):
            if "site-packages" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            f.write(json.dumps({"text": text, "path": str(path.relative_to(stdlib))}) + "\n")
            size += len(text.encode())
            if size >= budget:
                break
    tmp.rename(corpus)
    return corpus


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-quickstart", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="run directory (data, checkpoints, logs)")
    p.add_argument("--config", default=preset_path("quickstart.yaml"), help="trainer config")
    p.add_argument("--max-mb", type=float, default=None, help="cap the corpus size (smoke tests)")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--prompt", default="def ", help="prompt for the closing sample")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=50")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    from pretrain import train
    from pretrain.checkpoint import store
    from pretrain.data import prep
    from pretrain.generate import sample_text

    a = parse_args(sys.argv[1:] if argv is None else argv)
    a.config = preset_path(a.config)
    if not Path(a.config).is_file():
        raise UserError(f"{a.config}: quickstart config not found; pass --config FILE")
    out = Path(a.out)
    data_dir = out / "data"
    print(f"[1/4] corpus: Python standard library sources -> {out / 'corpus.jsonl'}", flush=True)
    corpus = write_corpus(out, a.max_mb)
    print(f"[2/4] data prep: BPE {a.vocab} + token shards -> {data_dir}", flush=True)
    if not (data_dir / "manifest.json").exists():
        rc = prep.main([str(corpus), "--output", str(data_dir), "--tokenizer", f"bpe:{a.vocab}"])
        if rc:
            return rc
    print(f"[3/4] training {a.config}", flush=True)
    rc = train.main(["--config", a.config, f"data.paths=[{data_dir}]", f"train.out_dir={out}", *a.overrides])
    if rc:
        return rc
    print("[4/4] sample from the final checkpoint:", flush=True)
    tag_dir = store.resolve_tag_dir(str(out))
    print("-" * 60 + "\n" + sample_text(tag_dir, a.prompt, max_new_tokens=120) + "\n" + "-" * 60)
    print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    print(f"More samples: pretrain-generate --checkpoint {out} --prompt 'import ' --num-samples 3")
    return 0


def program() -> None:
    """The `pretrain-quickstart` script: main(), then leave as the trainer does (its process group)."""
    from pretrain.train import leave

    leave(main())


if __name__ == "__main__":
    program()
