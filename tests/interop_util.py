"""Runs and helpers shared by the checkpoint-interop tests (tests/test_interop.py, tests/test_reshard.py).

The trained runs are session fixtures in tests/conftest.py (`bpe_data`, `trained`), so both
files use the same few training runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain import digest
from pretrain.checkpoint import store
from pretrain.data.prep import main as prep_main
from pretrain.interop.hf_import import import_hf
from train_util import check, run_train

LLAMA = ["model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false",
         "model.tie_embeddings=false", "model.n_kv_head=2", "model.d_ff=128"]
NO_DROPOUT = ["model.dropout=0.0"]
FAST = ["logging.tensorboard=false"]  # saves importing TensorBoard in every rank


def make_bpe_data(d: Path) -> Path:
    """A small JSONL corpus prepared with a BPE of 300 tokens (train/valid split): its shards."""
    docs = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 7 + 1) + "lorem ipsum"
            for i in range(200)]
    (d / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    assert prep_main([str(d / "in.jsonl"), "-o", str(d / "out"), "--tokenizer", "bpe:300", "--quiet",
                      "--workers", "1", "--split", "0.9,0.1"]) == 0
    return d / "out"


RUNS = {
    # GPT-2 at DP=2 / ZeRO-1 on prepared data with a trained BPE (tokenizer export, vocab 300
    # padded to 384); checkpoints at steps 3 and 6, no dropout: also the resharding source
    "gpt2": (2, ["data.synthetic=false", "model.vocab_size=null", "parallel.zero_stage=1", *NO_DROPOUT,
                 "train.max_steps=6", "checkpoint.interval=3"]),
    # Llama-style (rope, rmsnorm, swiglu, GQA, untied, no bias), ZeRO-2, vocab 258 padded to 384
    "llama": (1, [*LLAMA, "parallel.zero_stage=2", "train.max_steps=2", "checkpoint.interval=0"]),
}
# Tensor-parallel Llama-style and pipeline-parallel GPT-2 (tied head) runs, merged on export by
# load_model_weights. They start from a random transformers model imported with import-hf
# (checkpoint.init_from), so their first loss is checked too.
IMPORTED = {"llama-tp2": ("llama", ["parallel.tensor=2"]), "gpt2-pp2": ("gpt2", ["parallel.pipeline=2"])}


def trained_runs(tmp_path_factory, bpe_data):
    """`get(name)`: the run directory of RUNS[name] or IMPORTED[name], trained on first use."""
    made = {}

    def get(name):
        if name in made:
            return made[name]
        out = tmp_path_factory.mktemp(name)
        if name in RUNS:
            nproc, overrides = RUNS[name]
            extra = [f"data.paths=[{bpe_data}]"] if "data.synthetic=false" in overrides else []
            check(run_train(out, [*overrides, *extra, *FAST], nproc=nproc))
            made[name] = out
        else:
            kind, par = IMPORTED[name]
            src, run = random_hf(kind, out / "hf"), out / "run"
            overrides = run_overrides(kind, run) + par + ["train.max_steps=1", "schedule.warmup_steps=0",
                                                           "checkpoint.interval=0", "data.seed=5"]
            init = import_hf(str(src), None, str(run), overrides, log=lambda s: None)
            overrides.append(f"checkpoint.init_from={init}")
            made[name] = run
            made[name + ":hf"] = src
            made[name + ":log"] = check(run_train(run, overrides + FAST, nproc=2))
        return made[name]

    get.made = made
    return get


def random_hf(kind: str, d: Path, vocab: int = 256) -> Path:
    """A transformers model with random weights (biases and gains too), saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(d))
    return d


def run_overrides(kind: str, out: Path) -> list[str]:
    base = ["data.synthetic=true", "model.vocab_size=256", "model.n_layer=2", "model.d_model=64", "model.n_head=4",
            "model.seq_len=32", "model.dropout=0.0", "train.precision=fp32", "train.device=cpu",
            f"train.out_dir={out}"]
    return base + (LLAMA if kind == "llama" else [])


def step_dir(run: Path, n: int) -> Path:
    return run / "checkpoints" / store.tag_for(n)


def rewrite_state(tag: Path, edit) -> None:
    """Change state.json of a (copied) checkpoint and re-commit its manifest entry."""
    f = tag / store.STATE
    text = edit(f.read_text())
    f.write_text(text)
    man = json.loads((tag / store.MANIFEST).read_text())
    man["files"][store.STATE] = digest.file_entry(f)
    (tag / store.MANIFEST).write_text(json.dumps(man))


def copy_checkpoint(run: Path, n: int, dst: Path) -> Path:
    import shutil

    tag = dst / "checkpoints" / store.tag_for(n)
    shutil.copytree(step_dir(run, n), tag, ignore=shutil.ignore_patterns("universal", "consolidated"))
    return tag
