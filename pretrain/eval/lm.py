"""The lm-eval model: our model (any layout, through a scorer) as an `lm_eval.api.model.LM`.

lm-eval sees one process (rank 0 of a world of one) on every rank: each rank builds the same
requests and gets back all the answers, so each computes the same metrics; the data-parallel
split and the gathering happen below (`pretrain.eval.requests`). This is the only module that
subclasses lm-eval's model API (its other calls are in `pretrain.eval.harness`).
"""
from __future__ import annotations

from lm_eval.api.model import LM

from pretrain.eval.requests import encode_pair, generate_texts, prefix_token, score_pairs, score_texts


class PretrainLM(LM):
    """`scorer`: a `pretrain.eval.scorer.Scorer`; `tok`: the run's tokenizer
    (`pretrain.data.tokenizer`). `batch_tokens` bounds the tokens of one scored batch (its
    logits are batch_tokens x vocabulary floats)."""

    def __init__(self, scorer, tok, *, prefix_id: int | None = None, batch_tokens: int = 4096,
                 max_gen_toks: int = 256, name: str = "pretrain"):
        super().__init__()
        self.scorer, self.tok, self.name = scorer, tok, name
        self.prefix_id = prefix_token(tok) if prefix_id is None else int(prefix_id)
        self.batch_tokens, self.max_gen_toks = batch_tokens, max_gen_toks

    @property
    def max_length(self) -> int:
        return self.scorer.seq_len

    @property
    def eot_token_id(self):
        return self.tok.eos_id

    def get_model_info(self) -> dict:
        return {"model": self.name, "max_length": self.max_length, "prefix_token_id": self.prefix_id}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, self.prefix_id, *r.args) for r in requests]
        return score_pairs(self.scorer, pairs, self.batch_tokens)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scored = score_texts(self.scorer, self.tok, self.prefix_id, [r.args[0] for r in requests], self.batch_tokens)
        return [lp for lp, _ in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return generate_texts(self.scorer, self.tok, [(r.args[0], dict(r.args[1])) for r in requests],
                              self.max_gen_toks)
