"""Resume a run in another parallel layout: data, tensor, pipeline degree or ZeRO stage.

Two converted forms, both written once by

    pretrain-convert reshard --run RUN_DIR [--step N]

next to the original files (which stay untouched), each committed by its own `manifest.json`
(written last):

* `<step_dir>/universal/` -- DeepSpeed's universal checkpoint (`ds_to_universal`): ZeRO 1-3
  (and bf16) state rewritten once per parameter, from which any data-parallel degree
  re-partitions at load time (`load_universal`). Only for tensor = pipeline = 1 sources: the
  format has no metadata for our fused, head-regrouped qkv and vocab-parallel tables.
* `<step_dir>/consolidated/` -- ours (`pretrain.interop.consolidate`): full fp32 weights and
  Adam moments by plain GPT parameter name, plus the Adam step count (safetensors + JSON).
  `load_consolidated` copies each parameter's piece into a live engine of any layout.

The trainer calls `load_resharded` (from `Trainer._resume`) when the layout it resumes in
differs from the saved one. What it uses:

    ZeRO-0 fp32, same tensor/pipeline degrees   the checkpoint as it is (the whole optimizer
                                                is in one file per model-parallel rank)
    tensor = pipeline = 1 on both sides, ZeRO   universal (as tested since the DP resharding
    1-3 -> 1-3 other than 1/2 <-> 3             landed); consolidated if only that exists
    anything else (tensor or pipeline degree,   consolidated: fp32 runs only (bf16/fp16 are
    ZeRO-0 <-> 1-3, ZeRO 1/2 <-> 3)             refused, untested); ZeRO-3 sources and targets
                                                included, pipelines with ZeRO 0 or 1

The padded vocabulary (a multiple of `model.vocab_multiple` x tensor degree) must stay the
same: the padding rows are trained like the others and take part in the softmax, so cutting
or adding rows would change the loss. The trainer refuses a change, naming the
`model.vocab_multiple` that keeps the saved size.

The universal files and the checkpoint's own files are DeepSpeed pickles: only convert and
load checkpoints you trust. The consolidated files are safetensors.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

from pretrain import digest, dsadapter
from pretrain.checkpoint import store
from pretrain.errors import UserError

UNIVERSAL = "universal"


def _layout_str(lay: dict) -> str:
    return f"dp={lay.get('dp')} tp={lay.get('tp', 1)} pp={lay.get('pp', 1)} zero={lay.get('zero_stage')}"


def _needs_universal(state: dict) -> bool:
    lay = state["layout"]
    return int(lay["zero_stage"]) > 0 or state["config"]["train"]["precision"] != "fp32"


def universal_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / UNIVERSAL


def has_universal(tag_dir: Path) -> bool:
    u = universal_dir(tag_dir)
    return u.is_dir() and store.verify(u) is None


def to_universal(tag_dir: Path, log=print, verbose: bool = False) -> Path:
    """Write `<tag_dir>/universal/` (committed by its manifest) and return it."""
    tag_dir = Path(tag_dir)
    state = store.read_state(tag_dir)
    lay = state["layout"]
    if int(lay.get("tp", 1)) != 1 or int(lay.get("pp", 1)) != 1:
        raise UserError(f"{tag_dir}: saved with {_layout_str(lay)}; the universal format needs tensor = "
                        "pipeline = 1 (no metadata for our tensor-parallel qkv/vocab split): use consolidate()")
    if not _needs_universal(state):
        log(f"{tag_dir}: ZeRO-0 fp32 keeps the whole optimizer state in one file; it resumes at any "
            "data-parallel degree as it is (no universal copy needed)")
        return tag_dir
    out = universal_dir(tag_dir)
    if has_universal(tag_dir):
        log(f"{out}: already converted")
        return out
    tmp = tag_dir / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # an uncommitted (partial) earlier attempt
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sys.stdout if verbose else sink), \
                contextlib.redirect_stderr(sys.stderr if verbose else sink):  # its tqdm bars
            dsadapter.convert_to_universal(tag_dir, tmp)
    except Exception as e:  # noqa: BLE001 -- the files verified, so this is a foreign or unsupported checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{tag_dir}: DeepSpeed could not convert this checkpoint to the universal format "
                        f"({type(e).__name__}: {e})") from None
    files = {str(p.relative_to(tmp)): digest.file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format": 1, "kind": "deepspeed-universal", "step": state["step"], "source_layout": lay,
                "files": files}
    store.write_atomic(tmp / store.MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    log(f"wrote {out} ({len(files)} files): resume it with any data-parallel degree"
        + (" (ZeRO-3)" if int(lay["zero_stage"]) == 3 else " and ZeRO stage 1 or 2"))
    return out


def reshard_checkpoint(tag_dir: Path, log=print, verbose: bool = False) -> list[Path]:
    """`pretrain-convert reshard`: write the converted forms this checkpoint can have (see above)."""
    from pretrain.interop.consolidate import check_fp32, consolidate

    tag_dir = Path(tag_dir)
    state = store.read_state(tag_dir)
    lay = state["layout"]
    flat = int(lay.get("tp", 1)) == 1 and int(lay.get("pp", 1)) == 1
    fp32 = state["config"]["train"]["precision"] == "fp32"
    if not flat:
        check_fp32(tag_dir, state)  # raises for bf16/fp16, naming the fix
    made = []
    if flat and _needs_universal(state):
        made.append(to_universal(tag_dir, log, verbose))
    if fp32:
        made.append(consolidate(tag_dir, log))
    else:
        log(f"{tag_dir}: {state['config']['train']['precision']} run: no consolidated copy (fp32 only), so it "
            "resumes in another data-parallel degree or ZeRO stage 1 <-> 2, tensor = pipeline = 1")
    return made


def check_reshard(tag_dir: Path, saved: dict, now: dict, reordered: bool = False) -> str:
    """How a checkpoint saved in layout `saved` resumes in layout `now`: 'direct', 'universal' or
    'consolidated'. UserError (naming the fix) when it cannot. `reordered`: the model's optimizer
    groups name other parameters, or the same in another order, than the checkpoint records
    (state.json 'optimizer_groups'), so only a load by name (consolidated) is right."""
    from pretrain.interop.consolidate import check_fp32, has_consolidated

    where = f"checkpoint {tag_dir}"
    moved = f"was saved with {_layout_str(saved)}, this run is {_layout_str(now)}"
    state = store.read_state(tag_dir)
    if reordered:
        check_fp32(tag_dir, state, what="resuming a model whose parameter order changed")
        if not has_consolidated(tag_dir):
            raise UserError(f"{where} orders the model's parameters differently from this run; convert it once "
                            f"with `pretrain-convert reshard --run {tag_dir}` (its state is then loaded by name)")
        return "consolidated"
    degrees = [tuple(int(lay.get(k, 1)) for k in ("tp", "pp")) for lay in (saved, now)]
    z_old, z_new = int(saved["zero_stage"]), int(now["zero_stage"])
    if not _needs_universal(state) and z_new == 0 and degrees[0] == degrees[1]:
        return "direct"  # ZeRO-0 fp32: module and optimizer whole in one file per model-parallel rank
    fix = f"convert it once with `pretrain-convert reshard --run {tag_dir}` (or resume with the saved " \
          "parallel.* settings and world size)"
    if degrees == [(1, 1), (1, 1)] and _needs_universal(state) and z_new != 0 and (z_old == 3) == (z_new == 3):
        if has_universal(tag_dir):
            return "universal"
        if has_consolidated(tag_dir):
            return "consolidated"
        raise UserError(f"{where} {moved}; {fix}")
    check_fp32(tag_dir, state, what=f"this change ({_layout_str(saved)} -> {_layout_str(now)})")
    if not has_consolidated(tag_dir):
        raise UserError(f"{where} {moved}; {fix}")
    return "consolidated"


def load_resharded(engine, tag_dir: Path, saved_layout: dict, now_layout: dict, log=print, topo=None,
                   reordered: bool = False) -> dict:
    """Load `tag_dir` (saved in another layout) into `engine`; returns our state (as store.load).

    The trainer calls this instead of `store.load` when the layouts differ, or the
    parameter order (`reordered`, see `check_reshard`) (`topo`: its `Topology`, for the
    tensor-parallel rank; None = no tensor parallelism).
    """
    import torch.distributed as dist

    tag_dir = Path(tag_dir)
    # Rank 0 decides (verifying the converted copy hashes every file once), then tells every rank.
    how = None
    if dist.get_rank() == 0:
        try:
            how = check_reshard(tag_dir, saved_layout, now_layout, reordered)
        except UserError as e:
            how = e
    how = store.broadcast_from_rank0(how)
    if isinstance(how, UserError):
        raise how
    load_path = str(tag_dir)
    if how == "direct":
        load_path, _ = store.engine_load(engine, tag_dir, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    elif how == "consolidated":
        load_consolidated(engine, tag_dir, topo)
    else:
        # The group hyperparameters come from this run's config (as the learning rate does), and
        # each Adam state keeps its own `step` tensor (see dsadapter.universal_checkpoint_load).
        with dsadapter.universal_checkpoint_load(engine):
            load_path, _ = store.engine_load(engine, universal_dir(tag_dir), load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    state = store.finish_load(load_path, tag_dir)
    if dist.get_rank() == 0:
        log(f"resharded {tag_dir}: {_layout_str(saved_layout)} -> {_layout_str(now_layout)} ({how})")
    return state


def load_consolidated(engine, tag_dir: Path, topo=None) -> None:
    """Set the weights, fp32 master weights and Adam state (moments, step) of every local parameter
    of `engine` (any layout; ZeRO 0-3; fp32) from `<tag_dir>/consolidated/`. Each rank reads only
    its part of each tensor (`stored.fill_piece`): its tensor-parallel piece, under ZeRO-3 only
    its partition of that."""
    import torch

    from pretrain.config.load import config_from_dict
    from pretrain.interop import consolidate as cons
    from pretrain.interop.stored import Files, SafetensorsEntry, fill_piece
    from pretrain.parallel import spec

    if engine.bfloat16_enabled() or engine.fp16_enabled():
        raise UserError(f"{tag_dir}: resuming in another tensor/pipeline layout or ZeRO stage supports "
                        "train.precision fp32 only; resume with the saved parallel.* settings")
    meta, state = cons.read_meta(tag_dir), store.read_state(tag_dir)
    m = config_from_dict(state["config"]).model
    module, opt = engine.module, engine.optimizer
    base = dsadapter.base_optimizer(opt)
    tp, tp_rank = (topo.tp, topo.tp_rank) if topo is not None else (1, 0)
    zero3 = dsadapter.is_zero3_partitioned(module)
    mapped = dsadapter.has_zero_fp32_views(module)  # ZeRO-1/2: fp32 partition views
    _zero_adam_state(opt, int(meta["adam_step"]))
    if mapped:
        dsadapter.link_hp_optimizer_states(opt)  # DeepSpeed would make its views of the moments at the first step
    src, files = cons.consolidated_dir(tag_dir), Files()
    stored = {k: {n: SafetensorsEntry(files, src / f"{k}.safetensors", n, shape) for n, shape in meta["params"].items()}
              for k in cons.STATES}
    with torch.no_grad():
        for name, p in module.named_parameters():
            plain = spec.plain_name(name, m.n_layer)
            local = tuple(dsadapter.param_full_shape(p))
            full = spec.full_shape(plain, local, tp)
            if plain not in stored["fp32"] or tuple(stored["fp32"][plain].shape) != full:
                have = tuple(stored["fp32"][plain].shape) if plain in stored["fp32"] else None
                raise UserError(f"{tag_dir}: consolidated {plain} has shape {have}, this engine's {name} needs {full} "
                                f"(tensor-parallel piece {local})")
            held = dsadapter.zero3_partition(p)  # ZeRO-3: (this rank's partition, its range of the flat piece)
            start, stop = held[1:] if held is not None else (0, p.numel())
            val = {}
            for kind in cons.STATES:
                val[kind] = torch.empty(stop - start, dtype=p.dtype)
                fill_piece(stored[kind][plain].block, plain, full, m, tp, tp_rank, start, val[kind])
            files.release()
            if zero3:
                _set_partition(p, held, local, val)
            elif mapped or p in base.state:
                _set_local(p, {k: v.view(local) for k, v in val.items()}, mapped, base)
            else:
                raise UserError(f"{tag_dir}: cannot place the optimizer state of {name} in this engine "
                                f"({type(opt).__name__}); resume with the saved parallel.* settings")
    dsadapter.set_progress(engine, int(state["step"]), int(state["consumed_samples"]))


def _zero_adam_state(opt, adam_step: int) -> None:
    """Adam's state with the saved step count and zeroed moments (filled next), one `step` tensor per
    state as torch makes it (fused or capturable: fp32 on the parameter's device); DeepSpeed 0.19
    creates none before the first step."""
    import torch

    base = dsadapter.base_optimizer(opt)
    for p, g in dsadapter.stepped_params(opt):
        on_dev = g.get("fused") or g.get("capturable")
        st = base.state.setdefault(p, {})
        st["step"] = torch.tensor(float(adam_step), device=p.device if on_dev else "cpu",
                                  dtype=torch.float32 if on_dev else torch.get_default_dtype())
        for kind in ("exp_avg", "exp_avg_sq"):  # existing tensors are kept: DeepSpeed may hold views of them
            if torch.is_tensor(st.get(kind)) and st[kind].shape == p.shape:
                st[kind].zero_()
            else:
                st[kind] = torch.zeros_like(p)


def _set_partition(p, held, local: tuple, val: dict) -> None:
    """ZeRO-3: this rank's range [start, stop) of the weights, fp32 master weights and moments.
    DeepSpeed's setters take the whole piece and keep this rank's range of it: a buffer of that size
    holding the range only (pages never written are never allocated)."""
    import torch

    part, start, stop = held
    for kind, v in val.items():
        whole = torch.empty(local, dtype=p.dtype)
        whole.view(-1)[start:stop] = v
        if kind == "fp32":
            dsadapter.set_full_fp32_param(p, whole)
        else:
            dsadapter.set_full_optimizer_state(p, whole, kind)
    part[:stop - start].copy_(val["fp32"])  # the module's own partition
    part[stop - start:].zero_()


def _set_local(p, val: dict, mapped: bool, base) -> None:
    """ZeRO 0-2: the local piece's fp32 master weights and moments, then the module's own weights."""
    if mapped:  # ZeRO-1/2: the fp32 partition and the moments (each rank keeps its part)
        dsadapter.set_full_fp32_param(p, val["fp32"])
        for kind in ("exp_avg", "exp_avg_sq"):
            dsadapter.set_full_optimizer_state(p, val[kind], kind)
    else:  # ZeRO-0: torch's AdamW steps the module's own parameters
        for kind in ("exp_avg", "exp_avg_sq"):
            base.state[p][kind].copy_(val[kind])
    p.data.copy_(val["fp32"])
