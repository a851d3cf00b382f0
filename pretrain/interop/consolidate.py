"""A checkpoint's training state without its parallel layout: one entry per plain GPT parameter.

    <step_dir>/consolidated/fp32.safetensors        master weights    } keyed by the names of
    <step_dir>/consolidated/exp_avg.safetensors     Adam first moment } `pretrain.model.gpt.GPT`
    <step_dir>/consolidated/exp_avg_sq.safetensors  Adam second moment} (full tensors, fp32)
    <step_dir>/consolidated/manifest.json           Adam step count, source layout, padded
                                                    vocabulary, checksums of the files; written last

`consolidate(tag_dir)` reads DeepSpeed's files of any saved (data, tensor, pipeline, ZeRO
stage) layout of an fp32 run through `pretrain.interop.ds_reader` (every parameter and its
optimizer state matched by name) and writes them. The result is checked against the model's
own parameter names and shapes. `reshard.load_consolidated` loads it into an engine of any
layout. DeepSpeed's files are pickles: only for runs you trust.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.errors import UserError
from pretrain.interop.ds_reader import STATES, read_full_state

CONSOLIDATED = "consolidated"
KIND = "pretrain-consolidated"


def consolidated_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / CONSOLIDATED


def has_consolidated(tag_dir: Path) -> bool:
    d = consolidated_dir(tag_dir)
    return d.is_dir() and store.verify(d) is None


def read_meta(tag_dir: Path) -> dict:
    return json.loads((consolidated_dir(tag_dir) / store.MANIFEST).read_text())


def check_fp32(tag_dir: Path, state: dict, what: str = "resharding across tensor/pipeline degrees") -> None:
    precision = state["config"]["train"]["precision"]
    if precision != "fp32":
        raise UserError(f"{tag_dir}: a {precision} checkpoint; {what} supports fp32 runs only (the bf16/fp16 "
                        "optimizer wrappers are untested here): resume with the saved parallel.* settings")


def consolidate(tag_dir: Path, log=print) -> Path:
    """Write `<tag_dir>/consolidated/` (committed by its manifest) and return it."""
    tag_dir = Path(tag_dir)
    state = store.read_state(tag_dir)
    check_fp32(tag_dir, state)
    out = consolidated_dir(tag_dir)
    if has_consolidated(tag_dir):
        log(f"{out}: already consolidated")
        return out
    from safetensors.torch import save_file

    full, step = read_full_state(tag_dir, state)
    tmp = tag_dir / f".{CONSOLIDATED}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # an uncommitted (partial) earlier attempt
    tmp.mkdir()
    files = {}
    for kind in STATES:
        path = tmp / f"{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in full[kind].items()}, str(path), metadata={"format": "pt"})
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # on disk before the manifest commits it
        files[path.name] = digest.file_entry(path)
    manifest = {"format": 1, "kind": KIND, "step": state["step"], "adam_step": step,
                "source_layout": state["layout"], "padded_vocab_size": state["model_shape"]["padded_vocab_size"],
                "params": {k: list(v.shape) for k, v in full["fp32"].items()}, "files": files}
    store.write_atomic(tmp / store.MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    log(f"wrote {out} ({len(full['fp32'])} parameters, Adam step {step:g}): resumable in any "
        "data/tensor/pipeline layout and ZeRO stage")
    return out
