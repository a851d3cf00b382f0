"""The model, in whatever layout it is, as a function from token batches to log-probabilities.

A scorer is one copy of the model: one process (a plain `GPT`), or the ranks that hold one copy
together (tensor-parallel peers, pipeline stages). Every rank of the copy calls each method with
the same batch; data-parallel copies score different batches (`dp_group`).

    token_logprobs(idx, targets) -> (logprob (B, T) fp32, greedy (B, T) bool)   on every rank of the copy
    generate(idx, max_new, choose, done) -> new tokens (B, n)                    on every rank of the copy

Logits are taken over the tokenizer's `valid_vocab` columns only: the rest of the embedding
table is padding (a multiple of 128 * tp), which the exported transformers model does not have.

* `ModelScorer`: a `GPT`, a `ParallelGPT` (its forward gathers the vocab-parallel logits) or a
  DeepSpeed engine around either (called as the trainer's validation pass calls it, so ZeRO-3
  gathers its partitions). A plain GPT generates with its KV cache; a tensor-parallel one
  recomputes the sequence each step (its attention has no cache).
* `PipeScorer`: a DeepSpeed pipeline stage (`parallel.pipeline.GPTPipe`). The activations go
  stage to stage with point-to-point sends (no DeepSpeed schedule: evaluation has no backward);
  the last stage gathers the logits over its tensor-parallel group, scores them and broadcasts
  the small results to the other stages.

ZeRO-3 gathers parameters inside every forward, a collective over the data-parallel group: its
ranks must run the same number of forwards although they score different requests. With
`lockstep` every forward is preceded by a one-integer vote over that group, and `finish()` runs
one-token forwards until every rank is done.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.model.gpt import GPT
from pretrain.parallel.comm import get_rank, get_world_size
from pretrain.parallel.tensor import gather_from_tensor_model_parallel_region


class Scorer:
    """Base: subclasses give `_logits` (full logits where this rank holds them, else None) and
    `_share` (those results from the holder to the copy's other ranks)."""

    def __init__(self, seq_len: int, valid_vocab: int, device: torch.device, dp_group=None,
                 multiple: int = 1, lockstep: bool = False):
        self.seq_len, self.valid_vocab, self.device = seq_len, valid_vocab, torch.device(device)
        self.dp_group, self.dp_rank, self.dp = dp_group, get_rank(dp_group), get_world_size(dp_group)
        self.multiple = multiple  # sequence parallelism splits T over the TP ranks
        self.lockstep = lockstep and self.dp > 1

    # ------------------------------------------------------------------ subclass hooks
    def _logits(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _share(self, t: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return t

    def _decoder(self, idx: torch.Tensor, max_len: int):
        return _Recompute(self, idx)

    # ------------------------------------------------------------------ collective calls
    def vote(self, working: bool = True) -> bool:
        """Lockstep: whether any data-parallel rank is still working (one all-reduce)."""
        dev = self.device if dist.get_backend(self.dp_group) == "nccl" else torch.device("cpu")
        t = torch.tensor([int(working)], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dp_group)
        return bool(t.item())

    @torch.no_grad()
    def finish(self) -> None:
        """After this rank's last batch: keep the data-parallel ranks in step (lockstep only)."""
        while self.lockstep and self.vote(False):
            self._logits(torch.zeros(1, self.multiple, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits (B, T, valid_vocab) of idx (B, T) where this rank holds them, else None."""
        T = idx.size(1)
        pad = -T % self.multiple
        if pad:  # right padding: causal attention keeps it out of the real positions
            idx = F.pad(idx, (0, pad))
        if self.lockstep:
            self.vote(True)
        out = self._logits(idx)
        return None if out is None else out[:, :T, :self.valid_vocab]

    @torch.no_grad()
    def token_logprobs(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(targets[b, t] | idx[b, :t+1]) (B, T) in fp32, and whether it is the argmax."""
        logits = self.logits(idx)
        out = None
        if logits is not None:
            x = logits.float()
            target = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            greedy = x.argmax(-1) == targets
            out = torch.stack([target - torch.logsumexp(x, -1), greedy.float()], -1)  # (B, T, 2)
        out = self._share(out, (*idx.shape, 2), torch.float32)
        return out[..., 0], out[..., 1] > 0.5

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new: int, choose: Callable[[torch.Tensor], torch.Tensor],
                 done: Callable[[torch.Tensor], bool]) -> torch.Tensor:
        """Up to max_new tokens (B, n) after idx (B, T0): `choose(logits (B, V)) -> (B, 1)` picks
        each (on the rank holding the logits), `done(tokens so far)` stops early. The caller
        keeps T0 + max_new <= seq_len."""
        seq = idx[:, :0]
        if max_new < 1:
            return seq
        dec = self._decoder(idx, idx.size(1) + max_new)
        logits = dec.first()
        for _ in range(max_new):
            nxt = self._share(None if logits is None else choose(logits), (idx.size(0), 1), torch.long)
            seq = torch.cat([seq, nxt], 1)
            if seq.size(1) == max_new or done(seq):
                break
            logits = dec.step(nxt)
        return seq


class _Recompute:
    """Next-token logits by running the whole sequence again (models without a KV cache)."""

    def __init__(self, scorer: Scorer, idx: torch.Tensor):
        self.scorer, self.seq = scorer, idx

    def first(self):
        out = self.scorer.logits(self.seq)
        return None if out is None else out[:, -1]

    def step(self, tok: torch.Tensor):
        self.seq = torch.cat([self.seq, tok], 1)
        return self.first()


class _Cached:
    """Next-token logits from a plain GPT's KV cache: the prompt once, then one token a step."""

    def __init__(self, scorer: "ModelScorer", idx: torch.Tensor, max_len: int):
        self.scorer, self.idx, self.pos = scorer, idx, 0
        self.cache = scorer.module.make_cache(idx.size(0), max_len=max_len, device=idx.device)

    def _run(self, idx: torch.Tensor) -> torch.Tensor:
        s = self.scorer
        if s.lockstep:
            s.vote(True)
        out = s.call(idx, cache=self.cache, start_pos=self.pos)
        self.pos += idx.size(1)
        return out[:, -1, :s.valid_vocab]

    def first(self):
        return self._run(self.idx)

    def step(self, tok: torch.Tensor):
        return self._run(tok)


class ModelScorer(Scorer):
    """A GPT / ParallelGPT, or a DeepSpeed engine around one (`model` is what is called,
    `module` the GPT inside: its config, and its KV cache)."""

    def __init__(self, model, module: Optional[GPT] = None, *, valid_vocab: Optional[int] = None, dp_group=None,
                 multiple: int = 1, lockstep: bool = False):
        module = model if module is None else module
        p = next(module.parameters())
        super().__init__(module.cfg.seq_len, valid_vocab or module.vocab_size, p.device, dp_group, multiple, lockstep)
        self.call, self.module = model, module
        # ParallelGPT (and any other subclass with its own forward) has no KV cache.
        self.cached = type(module).forward is GPT.forward

    def _logits(self, idx):
        return self.call(idx)

    def _decoder(self, idx, max_len):
        return _Cached(self, idx, max_len) if self.cached else _Recompute(self, idx)


class PipeScorer(Scorer):
    """One stage of a DeepSpeed pipeline (`topo`: the job's `parallel.topology.Topology`)."""

    def __init__(self, pipe, topo, d_model: int, seq_len: int, valid_vocab: int, sequence_parallel: bool = False):
        p = next(pipe.parameters())
        sp = sequence_parallel and topo.tp > 1
        super().__init__(seq_len, valid_vocab, p.device, topo.dp_group if topo.dp > 1 else None,
                         topo.tp if sp else 1)
        self.pipe, self.topo, self.d_model, self.dtype, self.sp = pipe, topo, d_model, p.dtype, sp
        lay, s = topo.layout, topo.pp_rank
        self.prev = None if topo.is_first_stage else lay.rank(s - 1, topo.dp_rank, topo.tp_rank)
        self.next = None if topo.is_last_stage else lay.rank(s + 1, topo.dp_rank, topo.tp_rank)
        self.last = lay.rank(topo.pp - 1, topo.dp_rank, topo.tp_rank)
        self.pp_group = topo.grid.get_pipe_parallel_group()

    def _logits(self, idx):
        B, T = idx.shape
        x = idx
        if self.prev is not None:  # the previous stage's output: (B, T, C), or its T/tp rows under SP
            x = torch.empty(B, T // self.topo.tp if self.sp else T, self.d_model, dtype=self.dtype,
                            device=self.device)
            dist.recv(x, src=self.prev)
        y = self.pipe(x)
        if self.next is not None:
            dist.send(y.contiguous(), dst=self.next)
            return None
        head = self.pipe.forward_funcs[-1]
        if hasattr(head, "loss"):  # a head that leaves the projection to its loss hands hidden states
            y = F.linear(y, head._weight())
        return gather_from_tensor_model_parallel_region(y, self.topo.tp_group)  # (B, T, V)

    def _share(self, t, shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=self.device) if t is None else t.contiguous()
        dist.broadcast(t, src=self.last, group=self.pp_group)
        return t


def make_scorer(model, model_cfg, valid_vocab: int, topo=None, zero_stage: int = 0,
                sequence_parallel: bool = False, dp_group=None) -> Scorer:
    """The scorer of `model` (a GPT, ParallelGPT, pipeline stage, or a DeepSpeed engine around one)
    in the job's `topo` (None: one process, or `dp_group` ranks that each hold the whole model)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine: its module
    if topo is None:
        return ModelScorer(model, module, valid_vocab=valid_vocab, dp_group=dp_group)
    if topo.pp > 1:
        return PipeScorer(module, topo, model_cfg.d_model, model_cfg.seq_len, valid_vocab, sequence_parallel)
    return ModelScorer(model, module, valid_vocab=valid_vocab, dp_group=topo.dp_group if topo.dp > 1 else None,
                       multiple=topo.tp if sequence_parallel and topo.tp > 1 else 1, lockstep=zero_stage == 3)
