"""Resume a run in another data-parallel layout: DeepSpeed's universal checkpoint.

ZeRO 1-3 (and bf16) optimizer state is saved flat and partitioned over the data-parallel
ranks, so a checkpoint written at DP=2 cannot be loaded at DP=1 as it is. DeepSpeed's
universal checkpoint (`deepspeed.checkpoint.ds_to_universal`) rewrites it once per
parameter -- `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt` -- from which any DP degree
re-partitions at load time (`load_universal`).

    pretrain-convert reshard --run RUN_DIR [--step N]

writes `<step_dir>/universal/` (its own `manifest.json`, written last, is the commit
record) next to the original files, which stay untouched. The trainer uses it when the
layout it resumes in differs from the saved one (`load_resharded`, called from
`Trainer._resume`).

What can change (tensor = pipeline = 1 on both sides):
    data-parallel degree           yes, with the optimizer state (moments, step) kept (ZeRO 1, 2, 3)
    ZeRO stage 1 <-> 2             yes (universal)
    ZeRO stage 1/2 <-> 3           refused: DeepSpeed writes and reads ZeRO-3's universal
                                   optimizer state differently (fails inside DeepSpeed 0.19)
    from or to ZeRO-0              ZeRO-0 fp32 keeps the whole optimizer in one file, so
                                   only its DP degree may change (no conversion needed);
                                   0 <-> 1-3 is refused (bf16 ZeRO-0 goes through the
                                   universal copy: untested, no bf16 on our CPU CI)
    tensor / pipeline degree       refused: our fused, head-regrouped qkv and vocab-parallel
                                   tables carry no universal-checkpoint TP metadata yet

The universal files are DeepSpeed pickles, produced from the run's own (equally pickled)
files: only convert and load checkpoints you trust.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

from pretrain import checkpoint
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
    return u.is_dir() and checkpoint.verify(u) is None


def to_universal(tag_dir: Path, log=print, verbose: bool = False) -> Path:
    """Write `<tag_dir>/universal/` (committed by its manifest) and return it."""
    tag_dir = Path(tag_dir)
    state = checkpoint.read_state(tag_dir)
    lay = state["layout"]
    if int(lay.get("tp", 1)) != 1 or int(lay.get("pp", 1)) != 1:
        raise UserError(f"{tag_dir}: saved with {_layout_str(lay)}; resharding supports tensor = pipeline = 1 "
                        "only (the universal format has no metadata for our tensor-parallel qkv/vocab split)")
    if not _needs_universal(state):
        log(f"{tag_dir}: ZeRO-0 fp32 keeps the whole optimizer state in one file; it resumes at any "
            "data-parallel degree as it is (no conversion needed)")
        return tag_dir
    out = universal_dir(tag_dir)
    if has_universal(tag_dir):
        log(f"{out}: already converted")
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = tag_dir / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # an uncommitted (partial) earlier attempt
    args = _Args(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                 keep_temp_folder=False, strict=True, inject_missing_state=True)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sys.stdout if verbose else sink), \
                contextlib.redirect_stderr(sys.stderr if verbose else sink):  # its tqdm bars
            ds_to_universal(args)
    except (AssertionError, ValueError, RuntimeError, KeyError, FileNotFoundError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{tag_dir}: DeepSpeed could not convert this checkpoint to the universal format "
                        f"({type(e).__name__}: {e})") from None
    stray = tag_dir / "latest_universal"  # DeepSpeed's pointer to our temporary folder: not used
    if stray.is_file():
        stray.unlink()
    files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": checkpoint.sha256_file(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format": 1, "kind": "deepspeed-universal", "step": state["step"], "source_layout": lay,
                "files": files}
    checkpoint.write_atomic(tmp / checkpoint.MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    log(f"wrote {out} ({len(files)} files): resume it with any data-parallel degree"
        + (" (ZeRO-3)" if int(lay["zero_stage"]) == 3 else " and ZeRO stage 1 or 2"))
    return out


class _Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def check_reshard(tag_dir: Path, saved: dict, now: dict) -> str:
    """How a checkpoint saved in layout `saved` resumes in layout `now`: 'direct' or 'universal'.

    UserError (naming the fix) when it cannot.
    """
    where = f"checkpoint {tag_dir}"
    moved = f"was saved with {_layout_str(saved)}, this run is {_layout_str(now)}"
    if any(int(lay.get(k, 1)) != 1 for lay in (saved, now) for k in ("tp", "pp")):
        raise UserError(f"{where} {moved}; resharding works with parallel.tensor = parallel.pipeline = 1 "
                        "only: resume with the saved parallel.* settings and world size")
    z_old, z_new = int(saved["zero_stage"]), int(now["zero_stage"])
    state = checkpoint.read_state(tag_dir)
    if not _needs_universal(state):  # ZeRO-0 fp32: module and optimizer whole in one file
        if z_new != 0:
            raise UserError(f"{where} {moved}; a ZeRO-0 checkpoint resumes with parallel.zero_stage 0 only "
                            "(any data-parallel degree)")
        return "direct"
    if z_new == 0 and z_old != 0:
        raise UserError(f"{where} {moved}; a ZeRO-{z_old} checkpoint resumes in ZeRO stages 1-3 only: set "
                        "parallel.zero_stage 1, 2 or 3")
    if (z_old == 3) != (z_new == 3):
        raise UserError(f"{where} {moved}; DeepSpeed's universal checkpoints of ZeRO-3 and of ZeRO-1/2 are not "
                        f"interchangeable (different optimizer-state files): resume with parallel.zero_stage "
                        f"{'3' if z_old == 3 else '1 or 2'}")
    if not has_universal(tag_dir):
        raise UserError(f"{where} {moved}; convert it once with `pretrain-convert reshard --run {tag_dir}` "
                        "(or resume with the saved parallel.* settings and world size)")
    return "universal"


def load_resharded(engine, tag_dir: Path, saved_layout: dict, now_layout: dict, log=print) -> dict:
    """Load `tag_dir` (saved in another layout) into `engine`; returns our state (as checkpoint.load).

    The trainer calls this instead of `checkpoint.load` when the layouts differ.
    """
    import torch
    import torch.distributed as dist

    tag_dir = Path(tag_dir)
    # Rank 0 decides (verifying the universal copy hashes every file once), then tells every rank.
    how = None
    if dist.get_rank() == 0:
        try:
            how = check_reshard(tag_dir, saved_layout, now_layout)
        except UserError as e:
            how = e
    box = [how]
    dist.broadcast_object_list(box, src=0)
    how = box[0]
    if isinstance(how, UserError):
        raise how
    if how == "direct":
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    else:
        cfg = engine._config
        before = cfg.load_universal_checkpoint
        # The group hyperparameters come from this run's config (as the learning rate does):
        # DeepSpeed's ZeRO-3 universal load copies group 0's onto every group, which would
        # give the no-decay group (biases, norms, embeddings) the weight decay.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        cfg.load_universal_checkpoint = True  # DeepSpeed reads this flag only inside load_checkpoint
        try:
            load_path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            cfg.load_universal_checkpoint = before
        if len(groups) == len(engine.optimizer.param_groups):
            for g, hyper in zip(engine.optimizer.param_groups, groups):
                g.update(hyper)
        # ZeRO-3's universal load gives every flat group the *same* `step` tensor; torch's
        # AdamW increments it in place once per group, which would advance the bias
        # correction twice per step. One tensor per state, as a fresh optimizer has.
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for st in base.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    if load_path is None:
        raise UserError(f"{tag_dir}: DeepSpeed could not load this checkpoint; set checkpoint.resume=none "
                        "to start fresh")
    rank = dist.get_rank()
    rng_file = tag_dir / f"rng_{rank:05d}.json"
    if rng_file.exists():  # ranks beyond the saved world keep their seeded RNG
        checkpoint.set_rng_state(json.loads(rng_file.read_text()))
    if rank == 0:
        log(f"resharded {tag_dir}: {_layout_str(saved_layout)} -> {_layout_str(now_layout)} ({how})")
    return checkpoint.read_state(tag_dir)
