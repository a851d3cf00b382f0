"""The one reader of DeepSpeed's checkpoint files: full tensors by plain GPT parameter name.

Any saved layout (data, tensor, pipeline degree, ZeRO stage) of a committed checkpoint:

* `load_model_weights(tag_dir)` -- the plain state dict (fp32 CPU tensors): ZeRO-0 module
  files; ZeRO 1-3 master weights (DeepSpeed's zero_to_fp32, per tensor-parallel rank);
  a pipeline's per-layer files. These hold the module weights (bf16 in a bf16 run).
* `read_full_state(tag_dir, state)` -- weights and Adam moments of an fp32 run:
  - ZeRO-0: torch AdamW's state_dict in `mp_rank_XX_model_states.pt`, its state numbered
    group by group; the parameter of each number is *named* by the checkpoint's own record
    (state.json 'optimizer_groups', written by the trainer from `spec.optimizer_groups`), never
    re-derived from a grouping rule;
  - ZeRO-1/2: each data-parallel rank's flat fp32 partition and flat moments of every
    group; DeepSpeed's `param_slice_mappings` say by name where each parameter's slice lies;
  - ZeRO-3: every parameter is split into data-parallel pieces of ceil(numel / dp) elements,
    laid end to end in `param_shapes` order (by name) in each rank's flat groups.

Names: pipeline stage names become plain ones by `spec.plain_name` (the last stage's tied copy
of the token table is dropped: its moments equal the first stage's, as DeepSpeed sums the two
gradients); tensor-parallel pieces are merged by `spec.merge_state` (which also undoes the
per-rank qkv regrouping). DeepSpeed's files are pickles: only for checkpoints you trust.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain import dsadapter
from pretrain.checkpoint import store
from pretrain.checkpoint.read import Unreadable, load_pt, reading
from pretrain.errors import UserError
from pretrain.parallel import spec

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _model_config(state: dict, tag_dir: Path):
    from pretrain.config.load import config_from_dict

    return config_from_dict(state["config"], source=str(tag_dir / store.STATE))


def load_model_weights(tag_dir: Path) -> dict:
    """The full plain-GPT state dict (fp32, CPU) of a committed checkpoint, from any layout."""
    with reading(Path(tag_dir)):
        return _model_weights(Path(tag_dir))


def _model_weights(tag_dir: Path) -> dict:
    state = store.read_state(tag_dir)
    lay = state["layout"]
    tp, pp, zero = int(lay.get("tp", 1)), int(lay.get("pp", 1)), int(lay["zero_stage"])
    cfg = _model_config(state, tag_dir)
    L = cfg.model.n_layer
    shards = []
    for t in range(tp):
        if pp > 1:
            local = {}
            for s in range(pp):
                local.update(_stage_weights(tag_dir, cfg, s, t, pp, int(state["model_shape"]["padded_vocab_size"])))
        elif zero == 0:
            local = load_pt(tag_dir / f"mp_rank_{t:02d}_model_states.pt")["module"]
        else:
            local = _zero_fp32_weights(tag_dir, t, tp)
        plain = {}
        for name, v in local.items():  # the first stage's copy of a tied table comes first
            plain.setdefault(spec.plain_name(name, L), v)
        shards.append(plain)
    return {k: v.float() for k, v in spec.merge_state(shards, cfg.model).items()}


def _zero_fp32_weights(tag_dir: Path, mp_rank: int, tp: int) -> dict:
    """fp32 weights of one tensor-parallel rank from ZeRO 1-3 shards (DeepSpeed's zero_to_fp32)."""
    import tempfile

    try:
        if tp == 1:
            return dsadapter.zero_fp32_state_dict(str(tag_dir.parent), tag=tag_dir.name)
        # zero_to_fp32 reads every *_states.pt of a directory: show it one TP rank's files only.
        with tempfile.TemporaryDirectory(prefix="pretrain_merge_") as tmp:
            view = Path(tmp) / tag_dir.name
            view.mkdir()
            for f in tag_dir.glob(f"*mp_rank_{mp_rank:02d}_*states.pt"):
                (view / f.name).symlink_to(f.resolve())
            sd = dsadapter.zero_fp32_state_dict(tmp, tag=tag_dir.name)
            return {k: v.clone() for k, v in sd.items()}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- zero_to_fp32 reads the files itself
        raise Unreadable(tag_dir, f"DeepSpeed's zero_to_fp32 cannot read the ZeRO files of tensor rank {mp_rank} "
                                  f"({type(e).__name__}: {e}); the files are damaged or not from pretrain-train") from None


def read_full_state(tag_dir: Path, state: dict) -> tuple[dict, float]:
    """({'fp32'|'exp_avg'|'exp_avg_sq': {plain name: full fp32 tensor}}, Adam step) of a checkpoint."""
    with reading(Path(tag_dir)):
        return _full_state(Path(tag_dir), state)


def _full_state(tag_dir: Path, state: dict) -> tuple[dict, float]:
    from pretrain.model.gpt import GPT

    lay = state["layout"]
    dp, tp, pp, zero = (int(lay.get(k, 1)) for k in ("dp", "tp", "pp", "zero_stage"))
    cfg = _model_config(state, tag_dir)
    L, padded = cfg.model.n_layer, int(state["model_shape"]["padded_vocab_size"])
    per_tp, steps = [], set()
    for t in range(tp):
        merged = {k: {} for k in STATES}
        for s in range(pp):
            mp = s * tp + t
            if zero == 0:
                part = _zero0(tag_dir, state, cfg, mp, s, t, pp, padded)
            elif zero in (1, 2):
                part = _zero12(tag_dir, mp, dp)
            else:
                part = _zero3(tag_dir, mp, dp)
            steps |= part.pop("steps")
            for kind in STATES:
                for name, v in part[kind].items():  # the first stage's copy of a tied table comes first
                    merged[kind].setdefault(spec.plain_name(name, L), v)
        per_tp.append(merged)
    if len(steps) > 1:
        raise UserError(f"{tag_dir}: parameters were stepped a different number of times {sorted(steps)}; "
                        "the consolidated form keeps one Adam step count")
    full = {k: spec.merge_state([m[k] for m in per_tp], cfg.model) for k in STATES}
    # the names and shapes the model has (meta device: no memory, no RNG)
    want = {n: tuple(p.shape) for n, p in GPT(cfg.model, padded, device="meta").named_parameters()}
    for kind in STATES:
        got = {n: tuple(v.shape) for n, v in full[kind].items()}
        if got != want:
            bad = sorted(set(got.items()) ^ set(want.items()))[:4]
            raise UserError(f"{tag_dir}: the {kind} tensors do not make the model's parameters (e.g. {bad}); "
                            "the checkpoint does not match its state.json")
    return {k: {n: v.float() for n, v in full[k].items()} for k in STATES}, (steps.pop() if steps else 0.0)


# ----------------------------------------------------------------------------- readers
def _steps(st) -> set:
    return {float(st["step"])} if "step" in st else set()


def _zero0(tag_dir: Path, state: dict, cfg, mp: int, stage: int, tp_rank: int, pp: int, padded: int) -> dict:
    """ZeRO-0: the module's weights and torch AdamW's state_dict, whose state is numbered group
    by group: the checkpoint's record of each group's parameter names names it."""
    sd = load_pt(tag_dir / f"mp_rank_{mp:02d}_model_states.pt")
    weights = sd["module"] if pp == 1 else _stage_weights(tag_dir, cfg, stage, tp_rank, pp, padded)
    optim = sd.get("optimizer") or {}
    groups = (state.get("optimizer_groups") or {}).get(f"mp_rank_{mp:02d}")
    if groups is None:
        raise UserError(f"{tag_dir}: state.json records no optimizer parameter names for mp_rank_{mp:02d} (saved "
                        "by an older version); resume it with the saved parallel.* settings")
    saved = [len(g["params"]) for g in optim.get("param_groups", [])]
    if saved != [len(g) for g in groups]:
        raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s optimizer has parameter groups of {saved} parameters, "
                        f"state.json names {[len(g) for g in groups]}; the checkpoint is inconsistent")
    out = {k: {} for k in STATES}
    out["steps"] = set()
    opt_state = optim.get("state", {})
    for i, name in enumerate(n for g in groups for n in g):
        if name not in weights:
            raise UserError(f"{tag_dir}: state.json names optimizer parameter {name}, which mp_rank_{mp:02d}'s "
                            "weights lack; the checkpoint is inconsistent")
        w = weights[name]
        st = opt_state.get(i, {})  # no entry: never stepped
        out["fp32"][name] = w
        for kind in ("exp_avg", "exp_avg_sq"):
            v = st.get(kind, torch.zeros_like(w))
            if tuple(v.shape) != tuple(w.shape):
                raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s optimizer state {i} has shape {tuple(v.shape)}, "
                                f"parameter {name} {tuple(w.shape)}; the checkpoint is inconsistent")
            out[kind][name] = v
        out["steps"] |= _steps(st)
    return out


def _stage_weights(tag_dir: Path, cfg, stage: int, tp_rank: int, pp: int, padded: int) -> dict:
    """A pipeline stage's weights by its module names, in its parameter order: DeepSpeed's
    tied modules first ('tied_modules.embed.*'), then the other layers by index."""
    from pretrain.parallel.pipeline import stage_parts

    parts = stage_parts(cfg, padded, pp)
    L = cfg.model.n_layer
    tied, rest = {}, {}
    for idx in range(parts[stage], parts[stage + 1]):
        layer = load_pt(tag_dir / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")
        is_tied = cfg.model.tie_embeddings and idx in (0, L + 1)
        for k, v in layer.items():
            if is_tied:
                tied[f"tied_modules.{spec.PIPE_TIED_KEY}.{k}"] = v
            else:
                rest[f"{idx}.{k}"] = v
    return {**tied, **rest}


def _zero12(tag_dir: Path, mp: int, dp: int) -> dict:
    """ZeRO-1/2: each parameter's slices of the ranks' flat fp32 partitions and moments."""
    shapes = load_pt(tag_dir / f"mp_rank_{mp:02d}_model_states.pt").get("param_shapes")
    ranks = [load_pt(tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt")["optimizer_state_dict"]
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
    shapes = load_pt(tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt").get("param_shapes")
    streams, steps = [], set()
    for r in range(dp):
        o = load_pt(tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt")["optimizer_state_dict"]
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
