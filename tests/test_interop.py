"""Checkpoint interop: export-hf / import-hf against real (tiny, random, local) transformers
models, inspect, and the errors for corrupt or foreign directories (resharding:
tests/test_reshard.py; the trained runs: tests/conftest.py, tests/interop_util.py).

Nothing is downloaded: HF models are built from configs here. The transformers tests need
the `transformers` test extra (skipped without it).
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from interop_util import copy_checkpoint, random_hf, rewrite_state, run_overrides  # noqa: E402
from train_util import losses  # noqa: E402

try:
    import transformers  # noqa: F401
    HAS_HF = True
except ImportError:
    HAS_HF = False
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs the transformers test extra")

from pretrain import digest  # noqa: E402
from pretrain.checkpoint import store
from pretrain.config.load import load_config  # noqa: E402
from pretrain.config.validate import resolve  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.generate import load_model  # noqa: E402
from pretrain.interop import names  # noqa: E402
from pretrain.interop.cli import main as convert  # noqa: E402
from pretrain.interop.hf_export import export_hf, parse_size  # noqa: E402
from pretrain.interop.hf_import import import_hf  # noqa: E402
from pretrain.interop.init_weights import load_init_weights, read_init  # noqa: E402
from pretrain.model.gpt import GPT, loss_fn  # noqa: E402
from pretrain.run.data import SyntheticData  # noqa: E402


def _hf(d, **kw):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _assert_same_logits(ours: GPT, hf_model, vocab: int, seed: int = 0, batches: int = 2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        idx = torch.randint(0, vocab, (2, ours.cfg.seq_len), generator=g)
        with torch.no_grad():
            a = ours(idx)[..., :vocab]
            b = hf_model(idx).logits.float()
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- trained runs
VOCAB = {"gpt2": 300, "llama": 258, "llama-tp2": 256, "gpt2-pp2": 256}  # the real vocabularies


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-tp2", "gpt2-pp2"])
def test_export_matches_transformers(trained, tmp_path, name):
    run = trained(name)
    out = tmp_path / "hf"
    no_tok = [] if name == "gpt2" else ["--no-tokenizer"]  # synthetic data: weights alone, explicitly
    assert convert(["export-hf", "--run", str(run), "--out", str(out), *no_tok]) == 0
    tag = store.resolve_tag_dir(str(run))
    ours, state = load_model(tag, torch.device("cpu"))
    cfg = json.loads((out / "config.json").read_text())
    arch = "GPT2LMHeadModel" if name.startswith("gpt2") else "LlamaForCausalLM"
    assert cfg["architectures"] == [arch]
    vocab = VOCAB[name]
    assert cfg["vocab_size"] == vocab and ours.vocab_size == state["model_shape"]["padded_vocab_size"] >= vocab
    hf_model = _hf(out)
    assert type(hf_model).__name__ == arch
    _assert_same_logits(ours, hf_model, vocab)
    prov = json.loads((out / "pretrain_export.json").read_text())
    assert prov["step"] == {"gpt2": 6, "llama": 2}.get(name, 1) and prov["vocab_size"] == vocab


@needs_hf
@pytest.mark.slow
def test_export_tokenizer_shards_and_dtype(trained, bpe_data, tmp_path):
    from transformers import AutoTokenizer

    from pretrain.data.tokenizer import tokenizer_from_manifest

    run = trained("gpt2")
    out = tmp_path / "sharded"
    assert convert(["export-hf", "--run", str(run), "--step", "3", "--out", str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards) and not (out / "model.safetensors").exists()
    ours, _ = load_model(store.resolve_tag_dir(str(run / "checkpoints" / "step_00000003")), torch.device("cpu"))
    _assert_same_logits(ours, _hf(out), 300, seed=1, batches=1)

    ref = tokenizer_from_manifest(str(bpe_data))
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "the quick brown fox, lorem ipsum dolor!"
    assert tok(text)["input_ids"] == ref.encode(text)
    assert tok.eos_token_id == ref.eos_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ref.eos_id

    bf = tmp_path / "bf16"
    export_hf(str(run), str(bf), dtype="bfloat16", log=lambda s: None)
    m = _hf(bf)
    assert m.dtype == torch.bfloat16 or next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="not empty"):
        export_hf(str(run), str(bf), log=lambda s: None)
    export_hf(str(run), str(bf), overwrite=True, log=lambda s: None)  # replaces its own earlier export


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 10**5
    assert parse_size("123") == 123
    with pytest.raises(UserError, match="max-shard-size"):
        parse_size("lots")


@pytest.mark.parametrize("model", [
    dict(norm="rmsnorm"),
    dict(position="rope", norm="layernorm", mlp="gelu"),
    dict(position="rope", norm="rmsnorm", mlp="gelu"),
    dict(mlp="swiglu"),
])
def test_unexpressible_architectures_are_refused(model):
    m = {"position": "learned", "norm": "layernorm", "mlp": "gelu", **model}
    with pytest.raises(UserError, match="no transformers equivalent") as e:
        names.architecture(m)
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)


@needs_hf
@pytest.mark.parametrize("variant", [
    dict(),  # GPT-2
    dict(tie_embeddings=False, bias=False, n_kv_head=2),  # exported as zero biases / repeated kv heads
    dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=True, tie_embeddings=True, d_ff=96, rope_theta=5e5),
])
def test_export_variants_from_state_dict(tmp_path, variant):
    """Architecture options beyond the trained runs, through the same mapping (no training)."""
    from pretrain.config.schema import ModelConfig
    from pretrain.interop.hf_export import save_safetensors

    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, seq_len=16, vocab_size=250, **variant)
    torch.manual_seed(0)
    ours = GPT(cfg, 256).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.dim() == 1:  # non-trivial biases and norm gains
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in n and n.endswith("weight") else 0.0))
    m = asdict(cfg)
    save_safetensors(names.to_hf(ours.state_dict(), m, 250), tmp_path, 10**9)
    (tmp_path / "config.json").write_text(json.dumps(names.hf_config(m, 250)))
    _assert_same_logits(ours, _hf(tmp_path), 250)


# ----------------------------------------------------------------------------- import
def _hf_loss(hf_dir: Path, batch: torch.Tensor) -> float:
    with torch.no_grad():
        logits = _hf(hf_dir)(batch[:, :-1]).logits
    return float(loss_fn(logits, batch[:, 1:]))


@needs_hf
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_then_export_is_identical(tmp_path, kind):
    from safetensors.torch import load_file

    src = random_hf(kind, tmp_path / "hf")
    run = tmp_path / "run"
    init = import_hf(str(src), None, str(run), run_overrides(kind, run), log=lambda s: None)
    assert (init / "init.json").is_file() and (init / "model.safetensors").is_file()

    out = tmp_path / "back"
    assert convert(["export-hf", "--run", str(run), "--out", str(out), "--no-tokenizer"]) == 0  # none imported
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c_src, c_out = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    keys = (["n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon", "tie_word_embeddings"]
            if kind == "gpt2" else ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                                    "intermediate_size", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                                    "max_position_embeddings"])
    assert {k: c_src.get(k) for k in keys} == {k: c_out.get(k) for k in keys}
    assert c_out["eos_token_id"] == c_src["eos_token_id"]

    # The model the trainer starts from (same loader as the checkpoint.init_from hook) has
    # transformers' loss on the same batch (padded vocabulary = 256 = the HF vocabulary).
    cfg = load_config(None, run_overrides(kind, run))
    lay = resolve(cfg, 1)
    assert lay.padded_vocab_size == 256
    torch.manual_seed(0)
    ours = GPT(cfg.model, lay.padded_vocab_size).eval()
    load_init_weights(ours, str(run / "init"), cfg, lay, log=lambda s: None)
    batch = torch.from_numpy(np.stack([SyntheticData(256, 32, 7, 4)[i] for i in range(4)]))
    with torch.no_grad():
        ours_loss = float(ours(batch[:, :-1], batch[:, 1:]))
    assert ours_loss == pytest.approx(_hf_loss(src, batch), rel=1e-5)

    # a larger padded vocabulary gets zero rows; a config that differs is refused, naming the field
    cfg = load_config(None, run_overrides(kind, run) + ["model.vocab_multiple=100"])
    lay = resolve(cfg, 1)
    ours = GPT(cfg.model, lay.padded_vocab_size)
    load_init_weights(ours, str(run / "init" / "model.safetensors"), cfg, lay, log=lambda s: None)
    assert lay.padded_vocab_size == 300 and not ours.embed.wte.weight[256:].any()
    cfg = load_config(None, run_overrides(kind, run) + ["model.n_head=8"])
    with pytest.raises(UserError, match="model.n_head is 8, the imported model has 4"):
        load_init_weights(GPT(cfg.model, 256), str(run / "init"), cfg, resolve(cfg, 1), log=lambda s: None)


@needs_hf
def test_import_checks_config_vocab_and_files(tmp_path):
    src = random_hf("llama", tmp_path / "hf")
    run = tmp_path / "run"
    ov = run_overrides("llama", run)
    with pytest.raises(UserError) as e:
        import_hf(str(src), None, str(run), ov + ["model.n_head=8", "model.d_ff=256"], log=lambda s: None)
    msg = str(e.value)
    assert "model.n_head is 8, the imported model has 4" in msg and "model.d_ff" in msg
    with pytest.raises(UserError, match="model.position is 'rope', the imported model has 'learned'"):
        import_hf(str(random_hf("gpt2", tmp_path / "hf-gpt2")), None, str(run), ov, log=lambda s: None)
    with pytest.raises(UserError, match="set model.vocab_size: 256"):
        import_hf(str(src), None, str(run), ov + ["model.vocab_size=200"], log=lambda s: None)
    with pytest.raises(UserError, match="no config.json"):
        import_hf(str(tmp_path), None, str(run), ov, log=lambda s: None)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickles are never loaded"):
        import_hf(str(src), None, str(run), ov, log=lambda s: None)
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (src / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        import_hf(str(src), None, str(run), ov, log=lambda s: None)


@needs_hf
def test_import_derives_the_model_needs_no_data_and_next_runs(tmp_path, capsys):
    """A newcomer's import: no config file, no model section, data not prepared yet; the printed
    `next:` command keeps the overrides and trains from the imported weights."""
    import shlex

    src = random_hf("llama", tmp_path / "hf")
    run = tmp_path / "run"
    ov = [f"data.paths=[{tmp_path / 'not-yet'}]", "model.seq_len=32", "train.device=cpu", "train.precision=fp32"]
    assert convert(["import-hf", "--model", str(src), "--out", str(run), *ov]) == 0
    out = capsys.readouterr().out
    assert "model.position=rope model.norm=rmsnorm model.mlp=swiglu" in out and "no prepared data" in out
    cmd = shlex.split(out.split("next: ", 1)[1].splitlines()[0])
    assert cmd[:3] == ["pretrain-train", "--config", str(run / "init" / "model.yaml")]
    assert all(o in cmd for o in ov)
    cfg = load_config([cmd[2]], [o for o in cmd[3:] if not o.startswith("data.")] + ["data.synthetic=true"])
    assert (cfg.model.position, cfg.model.n_kv_head, cfg.model.vocab_size) == ("rope", 2, 256)
    r = subprocess.run([sys.executable, "-m", "pretrain.train", *cmd[1:], "data.paths=[]", "data.synthetic=true",
                        "train.max_steps=1", "logging.tensorboard=false"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "done: step 1" in r.stdout


@needs_hf
def test_import_refuses_data_with_another_tokenizer(tmp_path, bpe_data):
    import shutil

    src = random_hf("gpt2", tmp_path / "hf", vocab=300)
    shutil.copyfile(bpe_data / "tokenizer.json", src / "tokenizer.json")
    run = tmp_path / "run"
    ov = [o for o in run_overrides("gpt2", run) if not o.startswith(("data.synthetic", "model.vocab_size"))]
    ov += ["data.synthetic=false", f"data.paths=[{bpe_data}]", "model.vocab_size=null"]
    init = import_hf(str(src), None, str(run), ov, log=lambda s: None)  # same tokenizer: fine
    assert "tokenizer.json" in read_init(init)[0]["tokenizer_files"]
    other = json.loads((src / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another tokenizer
    (src / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="tokenized with"):
        import_hf(str(src), None, str(tmp_path / "run2"), ov, log=lambda s: None)
    with pytest.raises(UserError, match="exists"):
        import_hf(str(src), None, str(run), ov, allow_tokenizer_mismatch=True, log=lambda s: None)


@needs_hf
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tp2", "gpt2-pp2"])
def test_imported_run_first_loss_equals_transformers(trained, name):
    run = trained(name)
    assert "initialised from" in trained.made[name + ":log"]
    first = losses(run)[1]
    # the trainer's first global batch: synthetic samples 0..7 (8 = train.global_batch_size of TINY)
    batch = torch.from_numpy(np.stack([SyntheticData(256, 32, 5, 8)[i] for i in range(8)]))
    assert first == pytest.approx(_hf_loss(trained.made[name + ":hf"], batch), rel=1e-5)


# ----------------------------------------------------------------------------- inspect / errors
@pytest.mark.slow
def test_inspect_reads_only_json(trained, monkeypatch, capsys):
    import pickle

    from pretrain.interop.inspect import main as inspect_main

    run = trained("gpt2")

    def refuse(*a, **k):
        raise AssertionError("inspect must not unpickle anything")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, refuse)
    assert inspect_main([str(run)]) == 0
    out = capsys.readouterr().out
    for want in ("step_00000006 (latest)", "step         6", "data 2 x tensor 1 x pipeline 1, ZeRO stage 1",
                 "vocab 300", "GPT2LMHeadModel", "manifest     OK"):
        assert want in out, (want, out)
    assert inspect_main([str(run / "checkpoints"), "--step", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["step"] == 3 and rep["verified"] is True and rep["layout"]["dp"] == 2
    assert rep["config"]["model"]["n_layer"] == 2 and rep["data"]["manifest"]["vocab_size"] == 300


@pytest.mark.slow
def test_corrupt_and_foreign_directories_give_one_line_errors(trained, tmp_path, capsys):
    from pretrain.interop.inspect import main as inspect_main

    run = trained("gpt2")

    def err_of(rc_want, argv, fn=convert):
        rc = fn(argv)
        captured = capsys.readouterr()
        assert rc == rc_want, (argv, captured)
        return captured.err

    # a shard with one flipped byte
    bad = copy_checkpoint(run, 3, tmp_path / "bad")
    shard = next(bad.glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    for argv in (["export-hf", "--run", str(bad), "--out", str(tmp_path / "x")], ["reshard", "--run", str(bad)]):
        err = err_of(2, argv)
        assert err.startswith("error: ") and f"fails its {digest.CHECKPOINT} check" in err and err.count("\n") == 1, err
    assert inspect_main([str(bad)]) == 1
    assert "FAILED" in capsys.readouterr().out

    # a save that never committed
    (bad / store.MANIFEST).unlink()
    assert "never committed" in err_of(2, ["export-hf", "--run", str(bad), "--out", str(tmp_path / "x")])

    # state.json that is not JSON (committed as such), and an architecture transformers lacks
    odd = copy_checkpoint(run, 3, tmp_path / "odd")
    rewrite_state(odd, lambda t: t.replace('"norm": "layernorm"', '"norm": "rmsnorm"'))
    err = err_of(2, ["export-hf", "--run", str(odd), "--out", str(tmp_path / "x")])
    assert "no transformers equivalent" in err and err.count("\n") == 1
    rewrite_state(odd, lambda t: "{not json")
    assert "cannot read checkpoint state" in err_of(2, ["export-hf", "--run", str(odd), "--out", str(tmp_path / "x")])
    assert inspect_main([str(odd)]) == 1
    assert "unreadable state.json" in capsys.readouterr().out

    # foreign directories: a transformers model, an empty directory, a missing path
    hf_dir = tmp_path / "hfmodel"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    for d in (hf_dir, tmp_path / "empty", tmp_path / "missing"):
        if d.name == "empty":
            d.mkdir()
        for argv in (["export-hf", "--run", str(d), "--out", str(tmp_path / "x")], ["reshard", "--run", str(d)]):
            err = err_of(2, argv)
            assert "no checkpoint here" in err and err.count("\n") == 1, err
        assert err_of(2, [str(d)], inspect_main).startswith("error: ")
    assert "no checkpoint of step 9" in err_of(2, ["export-hf", "--run", str(run), "--step", "9", "--out", "x"])
    assert not (tmp_path / "x").exists()


def test_console_wrappers_exit_2_without_traceback(tmp_path, monkeypatch, capsys):
    import runpy
    import subprocess

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "config.json").write_text("{}")  # a foreign directory
    p = subprocess.run([sys.executable, str(root / "tools" / "convert_checkpoint.py"), "export-hf", "--run",
                        str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    monkeypatch.setattr(sys, "argv", ["inspect_checkpoint.py", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(root / "tools" / "inspect_checkpoint.py"), run_name="__main__")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
