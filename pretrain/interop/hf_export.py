"""Export a checkpoint as a transformers model directory.

    pretrain-convert export-hf --run RUN_DIR [--step N] --out DIR [--dtype bfloat16] [--max-shard-size 5GB]

DIR then loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` (GPT2LMHeadModel
or LlamaForCausalLM, see `names.py` for the rules) and holds:

    config.json                     the architecture (vocab_size = the real vocabulary)
    model.safetensors               or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json          bos/eos token ids
    tokenizer.json, tokenizer_config.json   the run's tokenizer (from the checkpoint's own copy); a run
                                    without a Hugging Face tokenizer is refused unless --no-tokenizer
    pretrain_export.json            where it came from (run, step, tokens seen)

The weights come from `ds_reader.load_model_weights` (any ZeRO stage, tensor- and
pipeline-parallel pieces merged), so the source may be any saved layout. The source may
also be an `init/` directory written by `import-hf`. Nothing of ours is pickled; reading
the DeepSpeed shards of the run does unpickle them (trusted runs only).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from pretrain.config.schema import PRECISION_DTYPES
from pretrain.checkpoint import store
from pretrain.errors import UserError
from pretrain.interop import names
from pretrain.interop.ds_reader import load_model_weights
from pretrain.interop.init_weights import META as INIT_META



def parse_size(text) -> int:
    """'5GB' (10^9), '500MiB' (2^20), '2000000' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    mult = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise UserError(f"--max-shard-size {text!r} must be positive")
    return n


def save_safetensors(tensors: dict, out: Path, max_shard_bytes: int, metadata: dict | None = None) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards with model.safetensors.index.json
    (the transformers layout) when they exceed `max_shard_bytes`. Returns the file names."""
    from safetensors.torch import save_file

    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):  # deterministic layout
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    files, weight_map = [], {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


# ----------------------------------------------------------------------------- sources
def find_tag_dir(run: str, step: int | None) -> Path:
    if step is None:
        return store.resolve_tag_dir(run)
    p = Path(run)
    for base in (p / "checkpoints", p):
        cand = base / store.tag_for(step)
        if cand.is_dir():
            return store.resolve_tag_dir(str(cand))
    if store.TAG_RE.match(p.name) and int(p.name[5:]) == step:
        return store.resolve_tag_dir(str(p))
    have = sorted(q.name for base in (p / "checkpoints", p) if base.is_dir() for q in base.glob("step_*"))
    raise UserError(f"{run}: no checkpoint of step {step} (have: {', '.join(have) or 'none'})")


def _has_checkpoints(run: Path) -> bool:
    return any((d / "latest").is_file() or any(d.glob("step_*/manifest.json")) for d in (run / "checkpoints", run))


def data_vocab(state: dict, tag_dir: Path) -> tuple[int | None, str]:
    """The real vocabulary of a run (rows that token ids can reach) and where it came from."""
    if state.get("vocab_size"):
        return int(state["vocab_size"]), "state.json (the run's vocabulary)"
    m = state["config"]["model"]  # checkpoints written before the vocabulary was recorded
    found = []
    if m.get("vocab_size"):
        found.append((int(m["vocab_size"]), "model.vocab_size"))
    tdir = store.tokenizer_dir(tag_dir, state)
    if tdir:
        try:
            found.append((int(json.loads((Path(tdir) / "manifest.json").read_text())["vocab_size"]),
                          f"{tdir}/manifest.json"))
        except (OSError, ValueError, KeyError):
            pass
    if not found:
        return None, ""
    return max(found)


def run_tokenizer(state: dict, tag_dir: Path, allow_none: bool):
    """The run's tokenizer when it can be exported (a Hugging Face one); None with --no-tokenizer.
    UserError otherwise: a model without its tokenizer cannot encode text."""
    tdir = store.tokenizer_dir(tag_dir, state)
    why = "this run has no recorded tokenizer (synthetic data?)"
    tok = None
    if tdir:
        from pretrain.data.tokenizer import tokenizer_from_manifest

        tok = tokenizer_from_manifest(tdir)
        if tok.kind != "hf":
            why = f"the run's tokenizer is {tok.kind!r}, which has no transformers tokenizer files"
    if tok is not None and tok.kind == "hf":
        return tok
    if not allow_none:
        raise UserError(f"{tag_dir}: {why}; pass --no-tokenizer to export the weights alone")
    return tok


def _tokenizer_files(tok, out: Path, seq_len: int, log) -> tuple[int | None, int | None, str | None]:
    """Copy the run's tokenizer when it is a Hugging Face one; returns (bos_id, eos_id, what)."""
    if tok is None or tok.kind != "hf":
        log("note: --no-tokenizer: no tokenizer files written" + ("" if tok is None else
            " (bos/eos ids are in generation_config.json)"))
        return (None, None, None) if tok is None else (tok.bos_id, tok.eos_id, None)
    shutil.copyfile(tok.file, out / "tokenizer.json")
    write_tokenizer_config(out, tok, seq_len)
    return tok.bos_id, tok.eos_id, tok.spec


def write_tokenizer_config(out: Path, tok, seq_len: int) -> None:
    def name(i):
        return None if i is None else tok.tok.id_to_token(int(i))

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(seq_len),
           "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: cfg[k] for k in ("bos_token", "eos_token") if cfg[k] is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        ours = [p for p in out.iterdir() if p.name.startswith(("model", "config.json", "tokenizer",
                                                               "generation_config", "special_tokens",
                                                               "pretrain_export"))]
        if not overwrite or len(ours) != len(list(out.iterdir())):
            raise UserError(f"--out {out} is not empty; choose a new directory"
                            + ("" if overwrite else " (or pass --overwrite to replace an earlier export)"))
        for p in ours:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- export
def export_hf(run: str, out: str, step: int | None = None, dtype: str = "float32", max_shard_size="5GB",
              vocab_size: int | None = None, overwrite: bool = False, log=print, no_tokenizer: bool = False) -> Path:
    """Write the transformers directory `out` from a run / checkpoint / import-hf init dir."""
    dtype = PRECISION_DTYPES.get(dtype, dtype)  # bf16 -> bfloat16 ...: torch's names in the output
    if dtype not in PRECISION_DTYPES.values():
        raise UserError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    max_bytes = parse_size(max_shard_size)
    src = Path(run)
    init_dir = None
    if (src / INIT_META).is_file():
        init_dir = src
    elif (src / "init" / INIT_META).is_file() and step is None and not _has_checkpoints(src):
        init_dir = src / "init"  # a run directory import-hf wrote, not trained yet
    if init_dir is not None:
        from pretrain.interop.init_weights import read_init

        meta, sd = read_init(init_dir)
        if not meta.get("tokenizer_files") and not no_tokenizer:
            raise UserError(f"{init_dir}: the imported model had no tokenizer files; pass --no-tokenizer to export "
                            "the weights alone")
        m, vocab, vocab_from = meta["model"], int(meta["vocab_rows"]), "the imported model"
        state, tag_dir, step_no = None, init_dir, 0
    else:
        tag_dir = find_tag_dir(run, step)
        state = store.read_state(tag_dir)
        m = state["config"]["model"]
        names.architecture(m)  # refuse early, before reading any weights
        tok = run_tokenizer(state, tag_dir, no_tokenizer)
        vocab, vocab_from = data_vocab(state, tag_dir)
        sd = load_model_weights(tag_dir)
        step_no = state.get("step")
    arch = names.architecture(m)
    rows = sd["embed.wte.weight"].shape[0] if "embed.wte.weight" in sd else None
    if vocab_size is not None:
        vocab, vocab_from = int(vocab_size), "--vocab-size"
    if vocab is None:
        vocab, vocab_from = rows, "the embedding (padded; pass --vocab-size to trim)"
        log(f"warning: the real vocabulary is unknown; exporting all {rows} embedding rows")
    if rows is not None and vocab > rows:
        raise UserError(f"vocabulary {vocab} (from {vocab_from}) exceeds the {rows} embedding rows")
    hf = names.to_hf(sd, m, vocab)
    tdt = getattr(torch, dtype)
    hf = {k: v.to(tdt).contiguous() for k, v in hf.items()}

    out_dir = Path(out)
    _prepare_out(out_dir, overwrite)
    if state is not None:
        bos, eos, tok_spec = _tokenizer_files(tok, out_dir, m["seq_len"], log)
    else:
        bos, eos, tok_spec = meta.get("bos_token_id"), meta.get("eos_token_id"), None
        for f in meta.get("tokenizer_files", []):
            shutil.copyfile(init_dir / f, out_dir / f)
            tok_spec = "copied from the imported model"
    config = names.hf_config(m, vocab, bos, eos, dtype)
    files = save_safetensors(hf, out_dir, max_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": eos}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    prov = {"source": str(Path(tag_dir).resolve()), "step": step_no, "architecture": names.ARCHITECTURES[arch],
            "vocab_size": vocab, "vocab_from": vocab_from, "padded_rows": rows, "dtype": dtype,
            "tokenizer": tok_spec, "model": m,
            "consumed_tokens": None if state is None else state.get("consumed_tokens")}
    (out_dir / "pretrain_export.json").write_text(json.dumps(prov, indent=1, sort_keys=True) + "\n")
    n = sum(t.numel() for t in hf.values())
    log(f"exported {names.ARCHITECTURES[arch]} ({n:,} parameters, vocab {vocab} from {vocab_from}, {dtype}) "
        f"to {out_dir}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    return out_dir
