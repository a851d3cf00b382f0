"""The one reader of DeepSpeed's checkpoint files: tensors by plain GPT parameter name.

Any saved layout (data, tensor, pipeline degree, ZeRO stage) of a committed checkpoint:

* `load_model_weights(tag_dir)` -- the plain state dict (fp32 CPU tensors): ZeRO-0 module
  files; ZeRO 1-3 master weights (DeepSpeed's zero_to_fp32, per tensor-parallel rank);
  a pipeline's per-layer files. These hold the module weights (bf16 in a bf16 run).
* `stored_weights(tag_dir, files)` -- the same weights as stored tensors
  (`pretrain.interop.stored`), read in parts on demand: a rank building its piece of a model
  from them (checkpoint.init_from) reads only its blocks (ZeRO 1-3: of the fp32 partitions).
* `stored_state(tag_dir, state, files)` -- weights and Adam moments of an fp32 run, stored:
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
gradients); tensor-parallel pieces are merged by `spec.merge_state`, or read through
`stored.TensorParallel` (both undo the per-rank qkv regrouping). DeepSpeed's files are
pickles: only for checkpoints you trust.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pretrain import dsadapter
from pretrain.checkpoint import store
from pretrain.checkpoint.read import Unreadable, load_pt, reading
from pretrain.errors import UserError
from pretrain.interop.stored import Files, Flat, Stored, TensorParallel
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


def _stage_weights(tag_dir: Path, cfg, stage: int, tp_rank: int, pp: int, padded: int) -> dict:
    """A pipeline stage's weights by its module names, in its parameter order: DeepSpeed's
    tied modules first ('tied_modules.embed.*'), then the other layers by index."""
    files = Files()
    try:
        return {n: s.full().clone() for n, s in _stage_stored(files, tag_dir, cfg, stage, tp_rank, pp, padded).items()}
    finally:
        files.release()


# ----------------------------------------------------------------------------- stored (read on demand)
def stored_weights(tag_dir: Path, files: Files) -> dict[str, Stored]:
    """The plain-GPT weights of a committed checkpoint (any layout) as stored tensors, read in
    parts on demand (`pretrain.interop.stored`): the values `load_model_weights` gives (ZeRO
    1-3 without pipeline: the fp32 master weights; else the module's), of which a rank reads
    only the blocks it asks for. Here only the files' pickles are loaded (tensors mapped, not read)."""
    def weights(mp: int, stage: int, t: int) -> dict:
        if pp > 1:
            return {"fp32": _stage_stored(files, tag_dir, cfg, stage, t, pp, padded)}
        if zero == 0:
            return {"fp32": _module_stored(files, tag_dir / f"mp_rank_{mp:02d}_model_states.pt")}
        return (_zero12 if zero in (1, 2) else _zero3)(files, tag_dir, mp, dp)

    tag_dir = Path(tag_dir)
    with reading(tag_dir):
        try:
            state = store.read_state(tag_dir)
            cfg, (dp, tp, pp, zero), padded = _layout(tag_dir, state)
            return _merged(tag_dir, state, cfg, weights, ("fp32",))[0]["fp32"]
        finally:
            files.release()


def stored_state(tag_dir: Path, state: dict, files: Files) -> tuple[dict, float]:
    """({'fp32'|'exp_avg'|'exp_avg_sq': {plain name: stored full tensor}}, Adam step) of an
    fp32 run's checkpoint, checked against the model's parameter names and shapes; read on demand."""
    def full_state(mp: int, stage: int, t: int) -> dict:
        if zero == 0:
            return _zero0(files, tag_dir, state, cfg, mp, stage, t, pp, padded)
        return (_zero12 if zero in (1, 2) else _zero3)(files, tag_dir, mp, dp)

    tag_dir = Path(tag_dir)
    with reading(tag_dir):
        try:
            cfg, (dp, tp, pp, zero), padded = _layout(tag_dir, state)
            full, steps = _merged(tag_dir, state, cfg, full_state, STATES)
        finally:
            files.release()
    if len(steps) > 1:
        raise UserError(f"{tag_dir}: parameters were stepped a different number of times {sorted(steps)}; "
                        "the consolidated form keeps one Adam step count")
    return full, (steps.pop() if steps else 0.0)


def _layout(tag_dir: Path, state: dict):
    """(model config, (dp, tp, pp, zero stage), padded vocabulary) of a checkpoint."""
    lay = state["layout"]
    return (_model_config(state, tag_dir), tuple(int(lay.get(k, 1)) for k in ("dp", "tp", "pp", "zero_stage")),
            int(state["model_shape"]["padded_vocab_size"]))


def _merged(tag_dir: Path, state: dict, cfg, part_of, kinds) -> tuple[dict, set]:
    """({kind: {plain name: stored full tensor}}, Adam steps) from `part_of(mp rank, stage,
    tensor rank)` ({kind: {module name: stored piece}}, 'steps'), checked against the model's
    parameter names and shapes."""
    from pretrain.model.gpt import GPT

    lay = state["layout"]
    tp, pp = int(lay.get("tp", 1)), int(lay.get("pp", 1))
    per_tp, steps = [], set()
    for t in range(tp):
        merged = {k: {} for k in kinds}
        for s in range(pp):
            part = part_of(s * tp + t, s, t)
            steps |= part.get("steps", set())
            for kind in kinds:
                for name, v in part[kind].items():  # the first stage's copy of a tied table comes first
                    merged[kind].setdefault(spec.plain_name(name, cfg.model.n_layer), v)
        per_tp.append(merged)
    full = {k: {n: TensorParallel(n, [m[k][n] for m in per_tp], cfg.model) for n in per_tp[0][k]} for k in kinds}
    # the names and shapes the model has (meta device: no memory, no RNG)
    padded = int(state["model_shape"]["padded_vocab_size"])
    want = {n: tuple(p.shape) for n, p in GPT(cfg.model, padded, device="meta").named_parameters()}
    for kind in kinds:
        got = {n: tuple(v.shape) for n, v in full[kind].items()}
        if got != want:
            bad = sorted(set(got.items()) ^ set(want.items()))[:4]
            raise UserError(f"{tag_dir}: the {kind} tensors do not make the model's parameters (e.g. {bad}); "
                            "the checkpoint does not match its state.json")
    return full, steps


# ----------------------------------------------------------------------------- readers
def _steps(st) -> set:
    return {float(st["step"])} if "step" in st else set()


def _whole(files: Files, path: Path, keys: tuple, t: torch.Tensor) -> Flat:
    """Tensor `t` of the torch file at `path` (found there by `keys`) as a stored tensor."""
    return Flat(files, t.shape, [(path, keys, 0, t.numel())], t.dtype)


def _module_stored(files: Files, path: Path) -> dict:
    return {name: _whole(files, path, ("module", name), v) for name, v in files.get(path, "module").items()}


def _stage_stored(files: Files, tag_dir: Path, cfg, stage: int, tp_rank: int, pp: int, padded: int) -> dict:
    """`_stage_weights`, stored."""
    from pretrain.parallel.pipeline import stage_parts

    parts = stage_parts(cfg, padded, pp)
    L = cfg.model.n_layer
    tied, rest = {}, {}
    for idx in range(parts[stage], parts[stage + 1]):
        path = tag_dir / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"
        is_tied = cfg.model.tie_embeddings and idx in (0, L + 1)
        for k, v in files.torch(path).items():
            name = f"tied_modules.{spec.PIPE_TIED_KEY}.{k}" if is_tied else f"{idx}.{k}"
            (tied if is_tied else rest)[name] = _whole(files, path, (k,), v)
    return {**tied, **rest}


def _zero0(files: Files, tag_dir: Path, state: dict, cfg, mp: int, stage: int, tp_rank: int, pp: int,
           padded: int) -> dict:
    """ZeRO-0: the module's weights and torch AdamW's state_dict, whose state is numbered group
    by group: the checkpoint's record of each group's parameter names names it."""
    path = tag_dir / f"mp_rank_{mp:02d}_model_states.pt"
    sd = files.torch(path)
    weights = _module_stored(files, path) if pp == 1 else _stage_stored(files, tag_dir, cfg, stage, tp_rank, pp,
                                                                        padded)
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
            v = st.get(kind)
            if v is not None and tuple(v.shape) != tuple(w.shape):
                raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s optimizer state {i} has shape {tuple(v.shape)}, "
                                f"parameter {name} {tuple(w.shape)}; the checkpoint is inconsistent")
            out[kind][name] = Flat(files, w.shape, [(None, (), 0, _numel(w.shape))]) if v is None else \
                _whole(files, path, ("optimizer", "state", i, kind), v)
        out["steps"] |= _steps(st)
    return out


def _numel(shape) -> int:
    return int(torch.Size(shape).numel())


def _zero12(files: Files, tag_dir: Path, mp: int, dp: int) -> dict:
    """ZeRO-1/2: each parameter's slices of the ranks' flat fp32 partitions and moments."""
    shapes = files.get(tag_dir / f"mp_rank_{mp:02d}_model_states.pt", "param_shapes")
    paths = [tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt" for r in range(dp)]
    ranks = [files.get(p, "optimizer_state_dict") for p in paths]
    for path in paths:  # DeepSpeed's map of where each parameter's slice lies (an error names the file)
        files.get(path, "optimizer_state_dict", "param_slice_mappings")
    out = {k: {} for k in STATES}
    out["steps"] = set()
    where = []  # per rank, per group: {kind: keys of its flat tensor in the file, or None (never stepped)}
    for o in ranks:
        base = o["base_optimizer_state"]
        keyed = isinstance(base, dict)
        groups = [base["state"].get(g, {}) for g in range(len(shapes))] if keyed else list(base)
        prefix = ("optimizer_state_dict", "base_optimizer_state") + (("state",) if keyed else ())
        where.append([{"fp32": ("optimizer_state_dict", "single_partition_of_fp32_groups", g),
                       **{k: (*prefix, g, k) if k in groups[g] else None for k in ("exp_avg", "exp_avg_sq")}}
                      for g in range(len(shapes))])
        for st in groups:
            out["steps"] |= _steps(st)
    for g, names in enumerate(shapes):
        for name, shape in names.items():
            numel = int(torch.Size(shape).numel())
            for kind in STATES:
                segments = []
                for r, o in enumerate(ranks):
                    addr = o["param_slice_mappings"][g].get(name)
                    if addr is not None:  # else none of it on this rank
                        keys = where[r][g][kind]
                        segments.append((None if keys is None else paths[r], keys or (), addr.start, addr.numel))
                if sum(s[3] for s in segments) != numel:
                    raise UserError(f"{tag_dir}: the ZeRO partitions of {name} hold {sum(s[3] for s in segments)} "
                                    f"values, its shape {tuple(shape)} needs {numel}")
                out[kind][name] = Flat(files, tuple(shape), segments)
    return out


def _zero3(files: Files, tag_dir: Path, mp: int, dp: int) -> dict:
    """ZeRO-3: pieces of ceil(numel / dp) per parameter, end to end in each rank's flat groups."""
    shapes = files.get(tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt", "param_shapes")
    streams, steps = [], set()  # per rank, per kind: [(path, keys, size)] of the flat groups laid end to end
    for r in range(dp):
        path = tag_dir / f"zero_pp_rank_{r}_mp_rank_{mp:02d}_optim_states.pt"
        flat = files.get(path, "optimizer_state_dict", "fp32_flat_groups")
        state = files.get(path, "optimizer_state_dict", "optimizer_state_dict", "state")
        st = [state.get(g, {}) for g in range(len(flat))]
        stream = {"fp32": [(path, ("optimizer_state_dict", "fp32_flat_groups", g), f.numel())
                           for g, f in enumerate(flat)]}
        for kind in ("exp_avg", "exp_avg_sq"):
            stream[kind] = [(path, ("optimizer_state_dict", "optimizer_state_dict", "state", g, kind), f.numel())
                            if kind in st[g] else (None, (), f.numel()) for g, f in enumerate(flat)]
        streams.append(stream)
        for s in st:
            steps |= _steps(s)
    params = [(n, shape) for names in shapes or [] for n, shape in names.items()]
    parts = [-(-int(torch.Size(shape).numel()) // dp) for _, shape in params]
    sizes = [sum(n for *_, n in s["fp32"]) for s in streams]
    if not params or any(n != sum(parts) for n in sizes):
        raise UserError(f"{tag_dir}: mp_rank_{mp:02d}'s ZeRO-3 partitions are not laid out as expected "
                        f"({sum(parts)} values per rank expected, {sizes} saved)")
    out = {k: {} for k in STATES}
    out["steps"] = steps
    offset = 0
    for (name, shape), part in zip(params, parts):
        numel = int(torch.Size(shape).numel())
        for kind in STATES:
            segments = [seg for s in streams for seg in _stream_range(s[kind], offset, offset + part)]
            out[kind][name] = Flat(files, tuple(shape), _first(segments, numel))
        offset += part
    return out


def _stream_range(groups: list, a: int, b: int) -> list:
    """Segments holding values [a, b) of flat groups [(path, keys, size)] laid end to end."""
    out, at = [], 0
    for path, keys, size in groups:
        x, y = max(a, at), min(b, at + size)
        if x < y:
            out.append((path, keys, x - at, y - x))
        at += size
    return out


def _first(segments: list, n: int) -> list:
    """The segments cut to their first `n` values (the last rank's piece ends in padding)."""
    out = []
    for path, keys, offset, numel in segments:
        if n <= 0:
            break
        out.append((path, keys, offset, min(numel, n)))
        n -= numel
    return out
