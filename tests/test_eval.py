"""Evaluation with lm-eval (pretrain/eval): the adapter against direct computation with our model,
pretrain-eval against lm-eval's own `hf` model on the exported run, a TP=2 and a PP=2 checkpoint
under two processes (pretrain-eval, and the in-loop scorers in the run's own layout) against one
process, and a task that cannot load. Two small runs (TP=2, PP=2) on the shared BPE corpus;
local task files only (tests/eval_util.py)."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from dist_util import run_distributed  # noqa: E402
from eval_util import assert_same_scores, write_tasks  # noqa: E402
from interop_util import FAST, NO_DROPOUT  # noqa: E402
from train_util import check, run_train  # noqa: E402

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'pretrain[eval]'")
pytestmark = pytest.mark.slow  # every test uses the two trained runs (2 processes each)

from pretrain.checkpoint import store  # noqa: E402
from pretrain.eval import harness  # noqa: E402
from pretrain.eval.cli import load_model, load_tokenizer, main  # noqa: E402
from pretrain.eval.lm import PretrainLM  # noqa: E402
from pretrain.eval.scorer import ModelScorer  # noqa: E402

TASKS = ["tiny_mc", "tiny_ppl"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_data):
    """{'tp2': run dir, 'pp2': run dir}: 4 steps each on the BPE corpus (vocab 300), 2 processes."""
    out = {}
    for name, layout in (("tp2", "parallel.tensor=2"), ("pp2", "parallel.pipeline=2")):
        d = tmp_path_factory.mktemp(name)
        check(run_train(d, ["data.synthetic=false", "model.vocab_size=null", f"data.paths=[{bpe_data}]", layout,
                            "train.max_steps=4", "checkpoint.interval=0", *NO_DROPOUT, *FAST], nproc=2))
        out[name] = d
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def one_process(runs, tasks, tmp_path_factory):
    """pretrain-eval's results JSON (with samples) for a run, in this process; computed once."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp("one") / f"{name}.json"
            assert main(["--checkpoint", str(runs[name]), "--tasks", ",".join(TASKS), "--include-path", str(tasks),
                         "--output", str(out), "--log-samples"]) == 0
            done[name] = json.loads(out.read_text())
        return done[name]

    return get


def _loaded(run):
    tag = store.resolve_tag_dir(str(run))
    state = store.read_state(tag)
    return load_model(tag, state, torch.device("cpu"), torch.float32), load_tokenizer(tag, state, None), state


def _direct(model, V, whole: list[int], k: int) -> tuple[float, bool]:
    """log p of the last k tokens of `whole` (cut to the context), from one unbatched forward."""
    whole = whole[-(model.cfg.seq_len + 1):]
    with torch.no_grad():
        lp = model(torch.tensor([whole[:-1]]))[0, :, :V].float().log_softmax(-1)
    t = torch.tensor(whole[1:])
    picked = lp[torch.arange(len(t)), t][-k:]
    return float(picked.double().sum()), bool((lp.argmax(-1) == t)[-k:].all())


def test_adapter_equals_direct_computation(runs):
    model, tok, _ = _loaded(runs["pp2"])
    V, L = tok.vocab_size, model.cfg.seq_len
    lm = PretrainLM(ModelScorer(model, valid_vocab=V), tok, batch_tokens=100)  # several batches
    long = "document 7:" + " the quick brown fox jumps over the lazy dog" * 6  # beyond the 32 positions
    pairs = [("document 1: the quick brown", " fox"), ("document 2: the quick", " brown fox jumps"),
             ("", "the lazy dog"), (long, " lorem ipsum"), ("lorem", " ipsum"), ("document 3:", " the quick")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    # A context's trailing space belongs to the continuation (as in lm-eval's models).
    (lp, greedy), = lm.loglikelihood([SimpleNamespace(args=("document 1: the quick brown ", "fox"))])
    assert abs(lp - got[0][0]) < 1e-5 and greedy == got[0][1]
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        whole = tok.encode(ctx + cont) if ctx else [tok.eos_id] + tok.encode(cont)
        k = len(whole) - (len(tok.encode(ctx)) if ctx else 1)
        want_lp, want_greedy = _direct(model, V, whole, k)
        assert abs(lp - want_lp) < 1e-5 and greedy == want_greedy, (ctx, cont, lp, want_lp)

    # Rolling windows: lm-eval's own window function, each window scored directly.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    texts = [long, "lorem ipsum", "the quick brown fox " * 20]
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts])
    for text, lp in zip(texts, got):
        windows = map(make_disjoint_window, get_rolling_token_windows(tok.encode(text), tok.eos_id, L, 1))
        want = sum(_direct(model, V, ctx + cont, len(cont))[0] for ctx, cont in windows)
        assert abs(lp - want) < 1e-4, (text[:20], lp, want)

    # Greedy generation with the KV cache equals the model's own sampler without one.
    from pretrain.model.sampling import generate

    prompts = ["document 4: the quick", "document 5: the quick", "lorem"]  # two share a batch
    kw = {"until": ["lorem"], "max_gen_toks": 12}
    got = lm.generate_until([SimpleNamespace(args=(p, kw)) for p in prompts])
    for prompt, text in zip(prompts, got):
        idx = torch.tensor([tok.encode(prompt)])
        new = generate(model, idx, 12, temperature=0, eos_id=tok.eos_id, valid_vocab=V, use_cache=False)
        row = new[0, idx.size(1):].tolist()
        row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
        assert text == tok.decode(row).split("lorem")[0], (prompt, text)


def test_pretrain_eval_matches_lm_eval_hf_model(runs, tasks, one_process, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pretrain.interop.hf_export import export_hf

    hf = export_hf(str(runs["pp2"]), str(tmp_path / "hf"), log=lambda s: None)
    ours = one_process("pp2")
    # batch_size 1: with larger batches lm-eval 0.4.13's hf model scores some rolling windows
    # differently from its own batch_size=1 (0.16 nats here), while ours equals the direct computation.
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf), "dtype": "float32"},
                                     device="cpu", batch_size=1, tasks=TASKS, bootstrap_iters=0, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert_same_scores(ours, theirs, TASKS, 1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        a, b = ours["results"]["tiny_ppl"][metric], theirs["results"]["tiny_ppl"][metric]
        assert abs(a - b) <= 1e-4 * abs(b), (metric, a, b)


class _Gathering(torch.nn.Module):
    """A model whose every forward is a collective over all ranks, as ZeRO-3's parameter gathers are."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        dist.all_reduce(torch.ones(1))
        return self.model(*args, **kwargs)


# Requests that split unevenly over two data-parallel ranks (one forward per pair at 16 tokens a
# batch; three generation batches of different lengths).
UNEVEN_PAIRS = [("document 1: the quick brown", " fox"), ("lorem", " ipsum"), ("document 22: the", " quick brown"),
                ("the lazy", " dog"), ("document 3: the quick brown fox jumps", " over the lazy dog")]
UNEVEN_PROMPTS = [("document 4: the quick", {"until": ["lorem"], "max_gen_toks": 6}), ("lorem", {"max_gen_toks": 3}),
                  ("the lazy dog", {"until": ["fox"], "max_gen_toks": 9})]


def _uneven(scorer, tok):
    lm = PretrainLM(scorer, tok, batch_tokens=16)
    return (lm.loglikelihood([SimpleNamespace(args=p) for p in UNEVEN_PAIRS]),
            lm.generate_until([SimpleNamespace(args=p) for p in UNEVEN_PROMPTS]))


def _two_ranks(rank, world, runs, tasks, out_dir):
    """pretrain-eval of each run on two processes (data parallel, merged weights), then the in-loop
    evaluation on the run's own layout: ParallelGPT over 2 TP ranks, or 2 pipeline stages."""
    import deepspeed

    from pretrain.config.load import config_from_dict
    from pretrain.config.validate import Layout
    from pretrain.eval.scorer import make_scorer
    from pretrain.interop.ds_reader import load_model_weights
    from pretrain.interop.init_weights import weights_source
    from pretrain.parallel.build import build_model
    from pretrain.parallel.topology import Topology

    os.environ["LOCAL_RANK"] = str(rank)  # as torchrun sets it (lm-eval and DeepSpeed read it)
    deepspeed.comm.torch.build_shm_op = lambda: None  # no CPU shared-memory op build (as test_parallel_model)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    report = {}
    for name, run in runs.items():
        out = Path(out_dir) / f"{name}.json"
        assert main(["--checkpoint", str(run), "--tasks", ",".join(TASKS), "--include-path", str(tasks),
                     "--output", str(out), "--log-samples"]) == 0
        tag = store.resolve_tag_dir(str(run))
        state = store.read_state(tag)
        cfg = config_from_dict(state["config"])
        tok = load_tokenizer(tag, state, None)
        rows = int(state["model_shape"]["padded_vocab_size"])
        layout = Layout(world_size=world, dp=1, tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline,
                        micro_batch_size=1, grad_accum=1, global_batch_size=1, vocab_size=tok.vocab_size,
                        padded_vocab_size=rows, zero_stage=0)
        topo = Topology(layout)
        model = build_model(cfg, layout, topo, torch.device("cpu"),
                            source=weights_source(load_model_weights(tag), rows, "test"))
        live = harness.LiveEval(cfg, layout, topo, tok, TASKS, include_path=str(tasks))
        kw = {"until": ["lorem"], "max_gen_toks": 12}
        lm = PretrainLM(make_scorer(model, cfg.model, tok.vocab_size, topo), tok)
        report[name] = {"metrics": live(model), "texts": lm.generate_until(
            [SimpleNamespace(args=(p, kw)) for p in ("document 4: the quick", "lorem")])}
    # ZeRO-3's case: the ranks score different requests, yet run the same number of forwards.
    model, tok, _ = _loaded(runs["tp2"])
    report["lockstep"] = _uneven(ModelScorer(_Gathering(model), model, valid_vocab=tok.vocab_size,
                                             dp_group=dist.group.WORLD, lockstep=True), tok)
    return report


def test_tp2_and_pp2_under_two_processes_equal_one_process(runs, tasks, one_process, tmp_path):
    ranks = run_distributed(_two_ranks, 2, runs, tasks, str(tmp_path), timeout=240)
    for name in runs:
        one = one_process(name)
        two = json.loads((tmp_path / f"{name}.json").read_text())
        assert two["results"]["tiny_mc"]["acc,none"] == one["results"]["tiny_mc"]["acc,none"]
        assert_same_scores(two, one, TASKS, 1e-5)
        want = harness.metrics(one)
        model, tok, _ = _loaded(runs[name])
        lm = PretrainLM(ModelScorer(model, valid_vocab=tok.vocab_size), tok)
        texts = lm.generate_until([SimpleNamespace(args=(p, {"until": ["lorem"], "max_gen_toks": 12}))
                                   for p in ("document 4: the quick", "lorem")])
        for r in ranks:  # both ranks of the in-loop evaluation have every metric
            got = r[name]["metrics"]
            assert set(got) == set(want) and got["tiny_mc"] == want["tiny_mc"], (name, got, want)
            for metric, value in want["tiny_ppl"].items():
                assert abs(got["tiny_ppl"][metric] - value) <= 1e-5 * abs(value), (name, metric)
            assert r[name]["texts"] == texts, name
    model, tok, _ = _loaded(runs["tp2"])
    scores, texts = _uneven(ModelScorer(model, valid_vocab=tok.vocab_size), tok)
    for r in ranks:
        got_scores, got_texts = r["lockstep"]
        assert got_texts == texts
        assert all(abs(a[0] - b[0]) < 1e-5 and a[1] == b[1] for a, b in zip(got_scores, scores, strict=True))


def test_a_task_that_cannot_load_is_dropped_with_one_warning(runs, tasks, one_process):
    model, tok, state = _loaded(runs["tp2"])
    from pretrain.config.load import config_from_dict

    cfg = config_from_dict(state["config"])
    warnings = []
    live = harness.LiveEval(cfg, None, None, tok, ["broken_mc", "tiny_mc"], include_path=str(tasks),
                            log=warnings.append)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    model.train()
    assert live.prepare() == ["tiny_mc"]
    for _ in range(2):
        got = live(model)
        assert list(got) == ["tiny_mc"] and got["tiny_mc"] == harness.metrics(one_process("tp2"))["tiny_mc"]
    assert len(warnings) == 1 and "broken_mc" in warnings[0] and "missing.jsonl" in warnings[0], warnings
    assert model.training  # put back in training mode
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before  # RNG states restored


@pytest.mark.parametrize("case", ["no-checkpoint", "unknown-task", "missing-data", "missing-text"])
def test_mistakes_are_one_error_line(runs, tasks, tmp_path, capsys, case):
    args = {"no-checkpoint": ["--checkpoint", str(tmp_path / "nothing"), "--tasks", "tiny_mc"],
            "unknown-task": ["--checkpoint", str(runs["tp2"]), "--tasks", "tiny_mc,no_such_task"],
            "missing-data": ["--checkpoint", str(runs["tp2"]), "--tasks", "broken_mc"],
            "missing-text": ["--checkpoint", str(runs["tp2"]), "--perplexity", str(tmp_path / "none.txt")]}[case]
    assert main([*args, "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = {"no-checkpoint": "no checkpoint here", "unknown-task": "unknown task 'no_such_task'",
            "missing-data": "missing.jsonl", "missing-text": "none.txt: no such file"}[case]
    assert err[-1].startswith("error: ") and want in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_perplexity_of_files(runs, tmp_path, capsys):
    docs = ["document 1: the quick brown fox jumps over the lazy dog lorem ipsum",
            "document 2: " + "the quick brown fox jumps over the lazy dog " * 5]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "b.txt").write_text(docs[1])
    assert main(["--checkpoint", str(runs["tp2"]), "--perplexity", str(tmp_path / "a.jsonl"),
                 str(tmp_path / "b.txt")]) == 0
    out = capsys.readouterr().out
    model, tok, _ = _loaded(runs["tp2"])
    from pretrain.eval.perplexity import file_perplexity

    scorer = ModelScorer(model, valid_vocab=tok.vocab_size)
    a, b = (file_perplexity(scorer, tok, tok.eos_id, str(tmp_path / f)) for f in ("a.jsonl", "b.txt"))
    assert a["documents"] == 2 and b["documents"] == 1 and a["tokens"] > b["tokens"] > model.cfg.seq_len
    assert f"perplexity {a['perplexity']:.4f}" in out and f"perplexity {b['perplexity']:.4f}" in out
    assert 1 < b["perplexity"] < tok.vocab_size  # better than uniform after 4 steps
