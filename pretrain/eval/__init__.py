"""Evaluation with lm-evaluation-harness, on the live model during training and on any checkpoint.

    scorer      the model in any layout (plain, tensor-parallel, pipeline, a DeepSpeed engine) as
                token batches -> log-probabilities, and generation (KV cache where it has one)
    requests    lm-eval's request kinds as tokens: batched by length, split over data-parallel
                copies, gathered on every rank (no lm-eval import: --perplexity works without it)
    lm          the lm-eval adapter (`PretrainLM`, an lm_eval.api.model.LM)
    harness     task loading (cached, local first), one evaluation with the RNG states kept, the
                metrics; the in-loop entry point `LiveEval` / `evaluate_live`
    perplexity  rolling-window perplexity of text / JSONL files
    cli         the `pretrain-eval` command

lm-eval is the optional extra `pretrain[eval]`; only `lm` and `harness` import it, when used.
See docs/EVAL.md.
"""
