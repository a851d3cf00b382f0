"""A checkpoint's training state without its parallel layout: one entry per plain GPT parameter.

    <step_dir>/consolidated/fp32.safetensors        master weights    } keyed by the names of
    <step_dir>/consolidated/exp_avg.safetensors     Adam first moment } `pretrain.model.gpt.GPT`
    <step_dir>/consolidated/exp_avg_sq.safetensors  Adam second moment} (full tensors, fp32)
    <step_dir>/consolidated/manifest.json           Adam step count, source layout, padded
                                                    vocabulary, sha256 of the files; written last

`consolidate(tag_dir)` reads DeepSpeed's files of any saved (data, tensor, pipeline, ZeRO
stage) layout of an fp32 run and merges them:

* ZeRO-0: the torch AdamW state_dict in `mp_rank_XX_model_states.pt` (parameters by
  position: their names come from the module's own order and our parameter-group rule);
  weights from the same file, or a pipeline's per-layer files;
* ZeRO-1/2: each data-parallel rank's flat fp32 partition and flat Adam moments of every
  parameter group; DeepSpeed's `param_slice_mappings` say where each parameter's slice lies,
  and the slices of the ranks in order make the parameter;
* ZeRO-3: every parameter is split into data-parallel pieces of ceil(numel / dp) elements,
  laid end to end in `param_shapes` order in each rank's flat groups;
* pipelines: `mp_rank` = stage x tensor degree + tensor rank; stage names map to plain names
  (`init_weights._plain_name`); a tied table's last-stage copy is dropped (its moments equal
  the first stage's: DeepSpeed sums the two gradients before each step);
* tensor parallelism: weights and moments of the ranks are merged like the weights for export
  (`merge_tp_shards`, which also undoes the per-rank qkv regrouping).

The result is checked against the model's own parameter names and shapes. `reshard.load_consolidated`
loads it into an engine of any layout. DeepSpeed's files are pickles: only for runs you trust.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from pretrain import checkpoint
from pretrain.errors import UserError

CONSOLIDATED = "consolidated"
KIND = "pretrain-consolidated"
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def consolidated_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / CONSOLIDATED


def has_consolidated(tag_dir: Path) -> bool:
    d = consolidated_dir(tag_dir)
    return d.is_dir() and checkpoint.verify(d) is None


def read_meta(tag_dir: Path) -> dict:
    return json.loads((consolidated_dir(tag_dir) / checkpoint.MANIFEST).read_text())


def check_fp32(tag_dir: Path, state: dict, what: str = "resharding across tensor/pipeline degrees") -> None:
    precision = state["config"]["train"]["precision"]
    if precision != "fp32":
        raise UserError(f"{tag_dir}: a {precision} checkpoint; {what} supports fp32 runs only (the bf16/fp16 "
                        "optimizer wrappers are untested here): resume with the saved parallel.* settings")


def consolidate(tag_dir: Path, log=print) -> Path:
    """Write `<tag_dir>/consolidated/` (committed by its manifest) and return it."""
    tag_dir = Path(tag_dir)
    state = checkpoint.read_state(tag_dir)
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
        files[path.name] = {"size": path.stat().st_size, "sha256": checkpoint.sha256_file(path)}
    manifest = {"format": 1, "kind": KIND, "step": state["step"], "adam_step": step,
                "source_layout": state["layout"], "padded_vocab_size": state["model_shape"]["padded_vocab_size"],
                "params": {k: list(v.shape) for k, v in full["fp32"].items()}, "files": files}
    checkpoint.write_atomic(tmp / checkpoint.MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    log(f"wrote {out} ({len(full['fp32'])} parameters, Adam step {step:g}): resumable in any "
        "data/tensor/pipeline layout and ZeRO stage")
    return out


def read_full_state(tag_dir: Path, state: dict) -> tuple[dict, float]:
    """({'fp32'|'exp_avg'|'exp_avg_sq': {plain name: full fp32 tensor}}, Adam step) of a checkpoint."""
    from pretrain.config.load import config_from_dict
    from pretrain.interop.init_weights import _plain_name
    from pretrain.model.gpt import GPT
    from pretrain.parallel.apply import merge_tp_shards

    lay = state["layout"]
    dp, tp, pp, zero = (int(lay.get(k, 1)) for k in ("dp", "tp", "pp", "zero_stage"))
    cfg = config_from_dict(state["config"], source=str(tag_dir / checkpoint.STATE))
    L, padded = cfg.model.n_layer, int(state["model_shape"]["padded_vocab_size"])
    per_tp, steps = [], set()
    for t in range(tp):
        merged = {k: {} for k in STATES}
        for s in range(pp):
            mp = s * tp + t
            if zero == 0:
                part = _zero0(tag_dir, cfg, mp, s, t, tp, pp, padded)
            elif zero in (1, 2):
                part = _zero12(tag_dir, mp, dp)
            else:
                part = _zero3(tag_dir, mp, dp)
            steps |= part.pop("steps")
            for kind in STATES:
                for name, v in part[kind].items():  # the first stage's copy of a tied table comes first
                    merged[kind].setdefault(name if pp == 1 else _plain_name(name, None, L, s == 0), v)
        per_tp.append(merged)
    if len(steps) > 1:
        raise UserError(f"{tag_dir}: parameters were stepped a different number of times {sorted(steps)}; "
                        "the consolidated form keeps one Adam step count")
    full = {k: merge_tp_shards([m[k] for m in per_tp], cfg.model) for k in STATES}
    with torch.device("meta"):  # the names and shapes the model has (no memory, no RNG)
        want = {n: tuple(p.shape) for n, p in GPT(cfg.model, padded).named_parameters()}
    for kind in STATES:
        got = {n: tuple(v.shape) for n, v in full[kind].items()}
        if got != want:
            bad = sorted(set(got.items()) ^ set(want.items()))[:4]
            raise UserError(f"{tag_dir}: the {kind} tensors do not make the model's parameters (e.g. {bad}); "
                            "the checkpoint does not match its state.json")
    return {k: {n: v.float() for n, v in full[k].items()} for k in STATES}, (steps.pop() if steps else 0.0)


# ----------------------------------------------------------------------------- readers
def _load(path: Path):
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name}; the checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=False)


def _steps(st) -> set:
    return {float(st["step"])} if "step" in st else set()


def _zero0(tag_dir: Path, cfg, mp: int, stage: int, tp_rank: int, tp: int, pp: int, padded: int) -> dict:
    """ZeRO-0: the module's weights and torch AdamW's state_dict (parameters by position)."""
    sd = _load(tag_dir / f"mp_rank_{mp:02d}_model_states.pt")
    weights = sd["module"] if pp == 1 else _stage_weights(tag_dir, cfg, stage, tp_rank, pp, padded)
    optim = sd.get("optimizer") or {}
    # torch numbers the parameters group by group: rebuild our groups (param_groups' rule) in
    # the module's parameter order.
    groups = [[n for n, w in weights.items() if _decayed(n, w.dim(), cfg.optim, tp)],
              [n for n, w in weights.items() if not _decayed(n, w.dim(), cfg.optim, tp)]]
    order = [n for g in groups if g for n in g]
    saved = [len(g["params"]) for g in optim.get("param_groups", [])]
    if saved != [len(g) for g in groups if g]:
        raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s optimizer has parameter groups of {saved} parameters, "
                        f"the model's are {[len(g) for g in groups if g]}; cannot name its state")
    out = {k: {} for k in STATES}
    out["steps"] = set()
    state = optim.get("state", {})
    for i, name in enumerate(order):
        w = weights[name]
        st = state.get(i, {})  # no entry: never stepped
        out["fp32"][name] = w
        for kind in ("exp_avg", "exp_avg_sq"):
            v = st.get(kind, torch.zeros_like(w))
            if tuple(v.shape) != tuple(w.shape):
                raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s optimizer state {i} has shape {tuple(v.shape)}, "
                                f"parameter {name} {tuple(w.shape)}; cannot name its state")
            out[kind][name] = v
        out["steps"] |= _steps(st)
    return out


def _decayed(name: str, ndim: int, optim, tp: int) -> bool:
    """Whether `name` is in the weight-decay group (`apply.parallel_param_groups`' rule)."""
    if name.endswith("wpe.weight") or (name.endswith("wte.weight") and (tp == 1 or optim.weight_decay > 0)):
        return optim.decay_embeddings  # an nn.Embedding (or, decaying, a vocab-parallel) table
    return ndim >= 2 or optim.decay_norms_and_biases


def _stage_weights(tag_dir: Path, cfg, stage: int, tp_rank: int, pp: int, padded: int) -> dict:
    """A pipeline stage's weights by its module names, in its parameter order: DeepSpeed's
    tied modules first ('tied_modules.embed.*'), then the other layers by index."""
    from pretrain.parallel.pipeline import TIED_KEY, stage_parts

    parts = stage_parts(cfg, padded, pp)
    L = cfg.model.n_layer
    tied, rest = {}, {}
    for idx in range(parts[stage], parts[stage + 1]):
        layer = _load(tag_dir / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")
        is_tied = cfg.model.tie_embeddings and idx in (0, L + 1)
        for k, v in layer.items():
            if is_tied:
                tied[f"tied_modules.{TIED_KEY}.{k}"] = v
            else:
                rest[f"{idx}.{k}"] = v
    return {**tied, **rest}


def _zero12(tag_dir: Path, mp: int, dp: int) -> dict:
    """ZeRO-1/2: each parameter's slices of the ranks' flat fp32 partitions and moments."""
    shapes = _load(tag_dir / f"mp_rank_{mp:02d}_model_states.pt").get("param_shapes")
    ranks = [_load(tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt")["optimizer_state_dict"]
             for r in range(dp)]
    if not shapes or any("param_slice_mappings" not in o for o in ranks):
        raise UserError(f"{tag_dir}: mp_rank_{mp:02d} has no parameter map (param_shapes / param_slice_mappings); "
                        "written by an older DeepSpeed?")
    out = {k: {} for k in STATES}
    out["steps"] = set()
    flats = []
    for o in ranks:
        base = o["base_optimizer_state"]
        groups = [base["state"].get(i, {}) for i in range(len(shapes))] if isinstance(base, dict) else list(base)
        flats.append([{"fp32": o["single_partition_of_fp32_groups"][g], **groups[g]} for g in range(len(shapes))])
        for st in groups:
            out["steps"] |= _steps(st)
    for g, names in enumerate(shapes):
        for name, shape in names.items():
            numel = int(torch.Size(shape).numel())
            for kind in STATES:
                pieces = []
                for r, o in enumerate(ranks):
                    addr = o["param_slice_mappings"][g].get(name)
                    if addr is None:
                        continue  # none of it on this rank
                    flat = flats[r][g].get(kind)
                    flat = torch.zeros_like(flats[r][g]["fp32"]) if flat is None else flat  # never stepped
                    pieces.append(flat.narrow(0, addr.start, addr.numel))
                t = torch.cat(pieces) if pieces else torch.empty(0)
                if t.numel() != numel:
                    raise UserError(f"{tag_dir}: the ZeRO partitions of {name} hold {t.numel()} values, "
                                    f"its shape {tuple(shape)} needs {numel}")
                out[kind][name] = t.view(shape).clone()
    return out


def _zero3(tag_dir: Path, mp: int, dp: int) -> dict:
    """ZeRO-3: pieces of ceil(numel / dp) per parameter, end to end in each rank's flat groups."""
    shapes = _load(tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt").get("param_shapes")
    streams, steps = [], set()
    for r in range(dp):
        o = _load(tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt")["optimizer_state_dict"]
        flat = o["fp32_flat_groups"]
        state = o["optimizer_state_dict"]["state"]
        st = [state.get(i, {}) for i in range(len(flat))]
        streams.append({"fp32": torch.cat(flat), **{k: torch.cat([s.get(k, torch.zeros_like(f))
                                                                   for s, f in zip(st, flat)])
                                                     for k in ("exp_avg", "exp_avg_sq")}})
        for s in st:
            steps |= _steps(s)
    params = [(n, shape) for names in shapes or [] for n, shape in names.items()]
    parts = [-(-int(torch.Size(shape).numel()) // dp) for _, shape in params]
    if not params or any(s["fp32"].numel() != sum(parts) for s in streams):
        raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s ZeRO-3 partitions are not laid out as expected "
                        f"({sum(parts)} values per rank expected, {[s['fp32'].numel() for s in streams]} saved)")
    out = {k: {} for k in STATES}
    out["steps"] = steps
    offset = 0
    for (name, shape), part in zip(params, parts):
        numel = int(torch.Size(shape).numel())
        for kind in STATES:
            out[kind][name] = torch.cat([s[kind].narrow(0, offset, part) for s in streams])[:numel].view(shape).clone()
        offset += part
    return out
