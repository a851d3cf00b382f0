"""Local lm-eval tasks for tests/test_eval.py, written into a directory (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

PHRASE = "the quick brown fox jumps over the lazy dog "


def _task(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def write_tasks(d: Path) -> Path:
    """tiny_mc (multiple choice, 24 items), tiny_ppl (rolling log-likelihood of 8 texts longer
    than the 32-token context) and broken_mc (its data file does not exist)."""
    choices = [" lazy dog", " quick fox", " lorem ipsum", " brown cat"]
    mc = []
    for i in range(24):
        k = i % 4  # rotate the choices so the right answer is at every position
        ctx = f"document {i}: " + PHRASE * (i % 3) + "the quick brown fox jumps over the"
        mc.append({"context": ctx, "choices": choices[k:] + choices[:k], "answer": (4 - k) % 4})
    (d / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    texts = [{"text": f"document {i}: " + PHRASE * (i % 4 + 2) + "lorem ipsum"} for i in range(8)]
    (d / "ppl.jsonl").write_text("".join(json.dumps(x) + "\n" for x in texts))
    mc_body = ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: choices\n'
               'doc_to_target: answer\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'
               '    aggregation: mean\n    higher_is_better: true\n')
    (d / "tiny_mc.yaml").write_text(_task("tiny_mc", d / "mc.jsonl", mc_body))
    (d / "broken_mc.yaml").write_text(_task("broken_mc", d / "missing.jsonl", mc_body))
    ppl_body = 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    (d / "tiny_ppl.yaml").write_text(_task("tiny_ppl", d / "ppl.jsonl", ppl_body))
    return d


def sample_scores(results: dict, task: str) -> list:
    """Each document's model answers (log-likelihoods; for choices also the greedy flags), by doc_id."""
    out = []
    for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for r in s["resps"]:
            x = r[0]
            out.append(tuple(x) if isinstance(x, (list, tuple)) else (x,))
    return out


def assert_same_scores(a: dict, b: dict, tasks, tol: float) -> None:
    for task in tasks:
        sa, sb = sample_scores(a, task), sample_scores(b, task)
        assert len(sa) == len(sb) > 0, task
        for x, y in zip(sa, sb):
            assert abs(float(x[0]) - float(y[0])) <= tol * max(1.0, abs(float(y[0]))), (task, x, y)
            assert x[1:] == y[1:], (task, x, y)  # the greedy flags
