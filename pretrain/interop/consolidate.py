"""A checkpoint's training state without its parallel layout: one entry per plain GPT parameter.

    <step_dir>/consolidated/fp32.safetensors        master weights    } keyed by the names of
    <step_dir>/consolidated/exp_avg.safetensors     Adam first moment } `pretrain.model.gpt.GPT`
    <step_dir>/consolidated/exp_avg_sq.safetensors  Adam second moment} (full tensors, fp32)
    <step_dir>/consolidated/manifest.json           Adam step count, source layout, padded
                                                    vocabulary, checksums of the files; written last

`consolidate(tag_dir)` reads DeepSpeed's files of any saved (data, tensor, pipeline, ZeRO
stage) layout of an fp32 run through `pretrain.interop.ds_reader` (every parameter and its
optimizer state matched by name, checked against the model's own parameter names and shapes)
and writes them a parameter at a time, hashing each file's bytes as they are written: it
holds one parameter's tensors, not the checkpoint, and reads no file back for its checksum.
`reshard.load_consolidated` loads it into an engine of any layout, each rank reading its part.
DeepSpeed's files are pickles: only for runs you trust.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.checkpoint.read import reading
from pretrain.errors import UserError
from pretrain.interop.ds_reader import STATES, stored_state
from pretrain.interop.stored import Files, layer_key

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
    files = Files()
    full, step = stored_state(tag_dir, state, files)
    tmp = tag_dir / f".{CONSOLIDATED}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # an uncommitted (partial) earlier attempt
    tmp.mkdir()
    with reading(tag_dir):
        files_written = _write(tmp, full, files)
    manifest = {"format": 1, "kind": KIND, "step": state["step"], "adam_step": step,
                "source_layout": state["layout"], "padded_vocab_size": state["model_shape"]["padded_vocab_size"],
                "params": {k: list(v.shape) for k, v in full["fp32"].items()}, "files": files_written}
    store.write_atomic(tmp / store.MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    log(f"wrote {out} ({len(full['fp32'])} parameters, Adam step {step:g}): resumable in any "
        "data/tensor/pipeline layout and ZeRO stage")
    return out


def _write(out: Path, full: dict, files: Files) -> dict:
    """Write `<out>/<kind>.safetensors` of every kind, a parameter at a time (read from the
    checkpoint's files, released layer by layer), hashing the bytes as they are written; returns their
    manifest entries. The files are safetensors as `save_file` writes them (fp32, tensors end
    to end in the header's order)."""
    hashers = {kind: digest.new() for kind in STATES}
    sizes = dict.fromkeys(STATES, 0)
    with contextlib.ExitStack() as stack:
        f = {kind: stack.enter_context(open(out / f"{kind}.safetensors", "wb")) for kind in STATES}

        def write(kind: str, data) -> None:
            view = memoryview(data).cast("B")
            hashers[kind].update(view)
            f[kind].write(view)
            sizes[kind] += len(view)

        for kind in STATES:
            write(kind, _header(full[kind]))
        layer = None
        for name in full["fp32"]:
            if layer_key(name) != layer:
                files.release()  # the files of the previous layer
                layer = layer_key(name)
            for kind in STATES:
                write(kind, full[kind][name].full().float().reshape(-1).numpy())
        files.release()
        for kind in STATES:
            f[kind].flush()
            os.fsync(f[kind].fileno())  # on disk before the manifest commits it
    return {f"{kind}.safetensors": {"size": sizes[kind], digest.CHECKPOINT: hashers[kind].hexdigest()}
            for kind in STATES}


def _header(tensors: dict) -> bytes:
    """A safetensors header: its length (u64, little-endian), then JSON padded to 8 bytes."""
    head, at = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = 4 * int(torch.Size(t.shape).numel())
        head[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
