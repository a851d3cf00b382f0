"""Evaluation requests as tokens, batched by length and split over the data-parallel copies.

No lm-eval here (the `--perplexity` path works without it); `pretrain.eval.lm` adapts these
to lm-eval's request types. Every rank is handed the same request list: the copies take every
dp-th request of it, longest first, and `all_gather_object` gives every rank all results.

Tokenization follows lm-eval's Hugging Face model, so scores match it on an exported run:

* a (context, continuation) pair moves the context's trailing whitespace to the continuation,
  encodes context + continuation whole and splits at the context's token count; an empty
  context is the prefix token (end-of-text, which is what precedes a document in training);
* a text scored whole (perplexity) is split into windows of seq_len tokens, each predicting
  fresh tokens with as much context as fits (lm-eval's rolling windows, context_len 1);
* a scored row is the last seq_len tokens of context + continuation (left-truncated).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.errors import UserError
from pretrain.model.sampling import sample_logits

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def prefix_token(tok) -> int:
    """What precedes a text scored from its start: end-of-text, as between documents in training
    (beginning-of-text when the tokenizer has no end-of-text)."""
    prefix = tok.eos_id if tok.eos_id is not None else tok.bos_id
    if prefix is None:
        raise UserError("the tokenizer has neither an end-of-text nor a beginning-of-text token to begin a "
                        "scored text with; pass another one (--tokenizer SPEC)")
    return int(prefix)


def encode_pair(tok, prefix_id: int, context: str, continuation: str) -> Pair:
    if not context:
        cont = tok.encode(continuation)
        return ([prefix_id], cont) if not cont or cont[0] != prefix_id else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[Pair]:
    """Disjoint windows that predict every token of `tokens` once: the first from the prefix
    token, each later one after the max_len tokens before its first prediction."""
    out, done = [], 0
    while done < len(tokens):
        end = min(len(tokens), done + max_len)
        # end - max_len - 1 >= 0 after the first window, which predicts max_len tokens
        out.append(([prefix_id] if done == 0 else tokens[end - max_len - 1:done], tokens[done:end]))
        done = end
    return out


def _mine(n: int, lengths: list[int], dp_rank: int, dp: int) -> list[int]:
    """This copy's requests: every dp-th of them, longest first (balanced, and batches pad little)."""
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    return order[dp_rank::dp]


def _gather(scorer, mine: dict) -> dict:
    """Every copy's results on every rank."""
    if scorer.dp == 1:
        return mine
    parts = [None] * scorer.dp
    dist.all_gather_object(parts, mine, group=scorer.dp_group)
    return {k: v for p in parts for k, v in p.items()}


def score_pairs(scorer, pairs: list[Pair], batch_tokens: int = 4096) -> list[tuple[float, bool]]:
    """(log-likelihood of the continuation, whether greedy decoding produces it) per pair.
    Collective: every rank of the job calls it with the same pairs."""
    L = scorer.seq_len
    rows = []
    for ctx, cont in pairs:
        if not cont:
            rows.append(None)  # nothing to score: log 1
            continue
        if len(cont) > L:
            raise UserError(f"a request's continuation of {len(cont)} tokens exceeds the model's {L} positions "
                            "(model.seq_len): this task cannot be scored with this model")
        full = (ctx + cont)[-(L + 1):]
        rows.append((full[:-1], full[1:], len(cont)))
    lengths = [0 if r is None else len(r[0]) for r in rows]
    todo = [i for i in _mine(len(rows), lengths, scorer.dp_rank, scorer.dp) if rows[i] is not None]
    out, start = {}, 0
    while start < len(todo):
        width = lengths[todo[start]]  # the longest row of this batch (sorted longest first)
        batch = todo[start:start + max(1, batch_tokens // width)]
        start += len(batch)
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        tgt = torch.zeros(len(batch), width, dtype=torch.long)
        for b, i in enumerate(batch):
            inp, t, _ = rows[i]
            idx[b, :len(inp)], tgt[b, :len(t)] = torch.tensor(inp), torch.tensor(t)
        lp, greedy = scorer.token_logprobs(idx.to(scorer.device), tgt.to(scorer.device))
        lp, greedy = lp.double().cpu(), greedy.cpu()
        for b, i in enumerate(batch):
            T, k = lengths[i], rows[i][2]
            out[i] = (float(lp[b, T - k:T].sum()), bool(greedy[b, T - k:T].all()))
    scorer.finish()
    out = _gather(scorer, out)
    return [(0.0, True) if r is None else out[i] for i, r in enumerate(rows)]


def score_texts(scorer, tok, prefix_id: int, texts: list[str], batch_tokens: int = 4096) -> list[tuple[float, int]]:
    """(log-likelihood, token count) of each text, scored whole in rolling windows."""
    encoded = [tok.encode(t) for t in texts]
    windows, owner = [], []
    for n, ids in enumerate(encoded):
        for w in rolling_windows(ids, prefix_id, scorer.seq_len):
            windows.append(w)
            owner.append(n)
    sums = [0.0] * len(texts)
    for n, (lp, _) in zip(owner, score_pairs(scorer, windows, batch_tokens)):
        sums[n] += lp
    return [(s, len(ids)) for s, ids in zip(sums, encoded)]


# ----------------------------------------------------------------------------- generation
def _settings(kw: dict, default_max: int) -> tuple:
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0) or 0) > 0
    return (tuple(until), int(kw.get("max_gen_toks", default_max)), sample,
            float(kw.get("temperature", 1.0) or 0) if sample else 0.0,
            kw.get("top_k") if sample else None, kw.get("top_p") if sample else None)


def _cut(text: str, until) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


def generate_texts(scorer, tok, prompts: list[tuple[str, dict]], max_gen_toks: int = 256,
                   batch_rows: int = 16, seed: int = 1234) -> list[str]:
    """The continuation of each (context, generation kwargs) prompt, cut at its first stop string.

    Greedy unless do_sample with a temperature > 0 (then temperature, top_k, top_p and a generator
    seeded by `seed` and the batch). Prompts of equal token length and settings share a batch
    (the model has no padding mask); a context is left-truncated to leave room for the new tokens.
    Collective, like score_pairs."""
    L = scorer.seq_len
    items = []
    for ctx, kw in prompts:
        s = _settings(kw, max_gen_toks)
        room = max(1, min(s[1], L - 1))
        ids = tok.encode(ctx)[-(L - room):] or [tok.eos_id if tok.eos_id is not None else 0]
        items.append((ids, s))
    groups: dict = {}
    for i in sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i)):
        groups.setdefault((len(items[i][0]), items[i][1]), []).append(i)
    batches = [g[k:k + batch_rows] for g in groups.values() for k in range(0, len(g), batch_rows)]
    out = {}
    for n, batch in enumerate(batches):
        if n % scorer.dp != scorer.dp_rank:
            continue
        until, max_new, sample, temp, top_k, top_p = items[batch[0]][1]
        idx = torch.tensor([items[i][0] for i in batch], dtype=torch.long, device=scorer.device)
        max_new = max(0, min(max_new, L - idx.size(1)))
        gen = torch.Generator(device=scorer.device).manual_seed(seed + n) if sample else None

        def choose(logits, gen=gen, temp=temp, top_k=top_k, top_p=top_p):
            return sample_logits(logits, temp, top_k, top_p, gen)

        def done(seq, until=until):
            return all((tok.eos_id is not None and tok.eos_id in row) or any(u in tok.decode(row) for u in until)
                       for row in seq.tolist())

        seq = scorer.generate(idx, max_new, choose, done).tolist()
        for i, row in zip(batch, seq):
            if tok.eos_id is not None and tok.eos_id in row:
                row = row[:row.index(tok.eos_id)]
            out[i] = _cut(tok.decode(row), until)
    scorer.finish()
    out = _gather(scorer, out)
    return [out[i] for i in range(len(items))]
