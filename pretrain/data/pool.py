"""pretrain-prep's worker processes: a pool that encodes chunks in order, a bounded number in
flight, forked where that is safe (a forked worker is ready at once and reuses the loaded
tokenizer; a spawned one first starts Python and imports numpy, tokenizers and this package again:
the largest cost of the tool beyond the tokenizer on a small corpus, docs/PERFORMANCE.md "Data
preparation"), and the progress bar that --quiet replaces."""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import sys
import threading
import warnings

from pretrain.data import encode
from pretrain.data.tokenizer import parse_bpe_spec


def start_method(tokenizer_arg: str) -> str:
    """'fork' where it is safe (why fork: the module's docstring), else 'spawn'. Not on other
    systems, not while another Python thread runs (a lock it holds would stay held in the child),
    and not in a bpe: run (it trains the tokenizer here: the tokenizers library's thread pool has run)."""
    if (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and threading.active_count() == 1 and parse_bpe_spec(tokenizer_arg) is None):
        return "fork"
    return "spawn"


def _init_forked_worker(settings, tok, lock) -> None:
    lock.close()  # the child's copy of the output lock: the lock must end with the main process alone
    encode.init_worker(settings, tok)


def start_pool(settings, workers: int, tokenizer_arg: str, tok, lock):
    """The worker pool (None for --workers 1), started before anything else in this process could
    start a thread (the progress bar's monitor does): see start_method. `tokenizer_arg`: --tokenizer;
    `tok`: the loaded tokenizer; `lock`: the output directory's lock file."""
    if workers <= 1:
        return None
    settings.single_thread = True
    method = start_method(tokenizer_arg)
    ctx = mp.get_context(method)
    if method == "spawn":
        return ctx.Pool(workers, initializer=encode.init_worker, initargs=(settings,))
    # Forked workers reuse the loaded tokenizer. The tokenizers library warns in a forked child when
    # this process used its parallelism before (in-process callers) unless the variable is set; the
    # workers run single-threaded anyway (init_worker), and no other thread runs here to see it.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns of native threads (numpy's BLAS pool, fork-safe)
            warnings.filterwarnings("ignore", r".*multi-threaded, use of fork\(\)", DeprecationWarning)
            return ctx.Pool(workers, initializer=_init_forked_worker, initargs=(settings, tok, lock))
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def ordered_map(pool, settings, chunks, workers):
    """Results of encode.process_chunk in input order, at most 2*workers+1 chunks in flight
    (inline when `pool` is None)."""
    if pool is None:
        encode.init_worker(settings)
        for c in chunks:
            yield encode.process_chunk(c)
        return
    pending = collections.deque()
    for c in chunks:
        pending.append(pool.apply_async(encode.process_chunk, (c,)))
        if len(pending) > 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class NoBar:
    """The progress bar under --quiet (which need not import tqdm)."""

    def update(self, n):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass
