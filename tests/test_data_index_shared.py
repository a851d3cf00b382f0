"""The data index is built once and memory-mapped by every rank (pretrain.data.shared).

Ranks are real processes (tests/dist_util.py: spawn + gloo). Each child counts, by wrapping
them, the index builds (`SampleIndex._build`, the document-size concatenation) and shard checks
(`check_prefix`) it made itself, and returns them with its samples.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from dist_util import run_distributed
from pretrain.data.indexed import write_pair
from pretrain.data.loader import open_dataset
from pretrain.data.prep import main as prep_main

SEQ, SEED, N = 16, 7, 600


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A manifest directory of several shards (its sizes are concatenated into the cache) and a
    bare Megatron prefix (one shard: its sizes are the .idx map itself)."""
    tmp = tmp_path_factory.mktemp("shared_index")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " + "abcdefg"[i % 7] * (i % 53 + 1)}) + "\n"
                           for i in range(200)))
    out = tmp / "manifest"
    assert prep_main([str(src), "-o", str(out), "--tokenizer", "byte", "--split", "1", "--workers", "1",
                      "--shard-size", "800", "--quiet"]) == 0
    assert len(list(out.glob("train_*.idx"))) > 2
    rng = np.random.default_rng(0)
    bare = str(tmp / "bare")
    write_pair(bare, [rng.integers(0, 258, rng.integers(1, 90)) for _ in range(300)], np.uint16)
    return [str(out), bare]


def _counting():
    """Wrap the builders and the shard check in this process; returns the live counters."""
    import pretrain.data.loader as L
    import pretrain.data.sample_index as S

    counts = {"epochs": 0, "sizes": 0, "checks": 0}
    build, cached, check = S.SampleIndex._build, L.load_or_build, L.check_prefix

    def counted_build(self, e):
        counts["epochs"] += 1
        time.sleep(0.3)  # hold the build open so racing processes really wait on it
        return build(self, e)

    def counted_cached(*a, **k):  # TokenSource.open's document sizes (several shards) from the cache
        got, built = cached(*a, **k)
        counts["sizes"] += built
        return got, built

    def counted_check(*a, **k):
        counts["checks"] += 1
        return check(*a, **k)

    S.SampleIndex._build = counted_build
    L.load_or_build = counted_cached
    L.check_prefix = counted_check
    return counts


def _mapped(ds) -> bool:
    """Every document-size and (first epoch's) sample-index array of `ds` is a read-only memory map."""
    arrays = [s.sizes for s in ds.sources] + [a for ix in ds.index for a in ix.epoch(0)]
    return all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrays)


def _open(paths, cache, peers, n=N):
    ds = open_dataset(paths, [1, 2][:len(paths)], "train", SEQ, SEED, n, cache_dir=cache, peers=peers)
    return ds, np.stack([ds.get(i) for i in range(n)])


def _two_ranks(rank, world, paths, base):
    from pretrain.data.shared import torch_peers
    from pretrain.errors import UserError

    counts = _counting()
    peers = torch_peers()
    out = {}
    ds, samples = _open(paths, os.path.join(base, "shared"), peers)  # one cache directory for both
    out["shared"] = dict(counts, mapped=_mapped(ds), samples=samples)
    for k in counts:
        counts[k] = 0
    ds, samples = _open(paths, os.path.join(base, f"node{rank}"), peers)  # node-local: not visible to rank 0
    out["local"] = dict(counts, mapped=_mapped(ds), samples=samples)
    for k in counts:
        counts[k] = 0
    try:
        _open([os.path.join(base, "broken")], os.path.join(base, "shared"), peers)
        out["error"] = None
    except UserError as e:
        out["error"] = str(e)
    out["error_checks"] = counts["checks"]
    return out


@pytest.mark.slow
def test_rank0_builds_and_checks_the_others_map(sources, tmp_path):
    ref = _open(sources, None, None)[1]  # the single-process path, in memory
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(sources[0]):
        (broken / f).write_bytes((Path(sources[0]) / f).read_bytes())
    shard = sorted(broken.glob("train_*.bin"))[1]
    shard.write_bytes(shard.read_bytes()[:-3])  # truncated
    shards = len(list(broken.glob("train_*.idx")))

    r0, r1 = run_distributed(_two_ranks, 2, sources, str(tmp_path), timeout=240)

    # a shared cache: rank 0 checked every shard and built everything, rank 1 only mapped it
    assert r0["shared"]["checks"] == shards + 1 and r1["shared"]["checks"] == 0
    assert r0["shared"]["epochs"] >= 2 and r0["shared"]["sizes"] == 1  # both sources' epochs; one concatenation
    assert r1["shared"]["epochs"] == 0 and r1["shared"]["sizes"] == 0 and r1["shared"]["mapped"]
    assert r0["shared"]["mapped"]  # the builder drops its copy and maps the files too
    # a node-local cache: each node's first rank builds its own copy
    assert r0["local"]["epochs"] == r1["local"]["epochs"] == r0["shared"]["epochs"]
    assert r0["local"]["sizes"] == r1["local"]["sizes"] == 1
    for r in (r0, r1):
        for case in ("shared", "local"):
            assert np.array_equal(r[case]["samples"], ref)
    # a bad shard: rank 0 alone checked, every rank raised its message
    assert r0["error"] == r1["error"] and "corrupt or incomplete data" in r0["error"] and "bin_bytes" in r0["error"]
    assert r0["error_checks"] >= 1 and r1["error_checks"] == 0


def _racing(rank, world, paths, base):
    import torch.distributed as dist

    from pretrain.data.shared import Peers, torch_peers

    counts = _counting()
    dist.barrier()  # start together
    ds, samples = _open(paths, os.path.join(base, "race"), Peers())  # no coordination: only the lock
    raced = dict(counts, mapped=_mapped(ds), samples=samples)
    for k in counts:
        counts[k] = 0
    ds, samples = _open(paths, os.path.join(base, "ranks"), torch_peers(), n=3 * N)
    return {"raced": raced, "ranks": dict(counts, mapped=_mapped(ds), samples=samples)}


@pytest.mark.slow
def test_four_racing_processes_build_the_index_once(sources, tmp_path):
    ref = _open(sources, None, None, n=3 * N)[1]
    res = run_distributed(_racing, 4, sources, str(tmp_path), timeout=240)
    for case in ("raced", "ranks"):
        epochs = [r[case]["epochs"] for r in res]
        sizes = [r[case]["sizes"] for r in res]
        built = sum(epochs)
        # one build of each artifact among the four: as many epoch builds as epoch directories
        cache = tmp_path / ("race" if case == "raced" else "ranks")
        assert built == len(list(cache.glob("sample_index/*/epoch_*[0-9]")))
        assert built >= 2 and sum(sizes) == 1, (case, epochs, sizes)
        assert all(r[case]["mapped"] for r in res)
        for r in res:
            assert np.array_equal(r[case]["samples"], ref[:len(r[case]["samples"])])
    assert [r["ranks"]["epochs"] for r in res][1:] == [0, 0, 0]  # with a process group rank 0 builds
    assert sum(r["ranks"]["epochs"] for r in res) > sum(r["raced"]["epochs"] for r in res)  # 3N reads more epochs
    left = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".damaged-" in p.name]
    assert not left


@pytest.mark.parametrize("damage", ["none", "pointer", "size", "doc_idx"])
def test_structure_check_in_chunks_gives_the_whole_index_verdict(tmp_path, damage):
    """Rank 0 checks the index in chunks (no int64 copy of a billion sizes); any chunk size finds
    the same problems, with the same messages, as one chunk over everything."""
    from pretrain.data.indexed import HEADER_SIZE, IndexedReader

    p = str(tmp_path / "p")
    write_pair(p, [np.arange(i % 7 + 1) for i in range(40)], np.uint16)
    raw = bytearray(open(p + ".idx", "rb").read())
    n = 40
    if damage == "pointer":  # sequence 29's pointer, in the fourth chunk of 8
        raw[HEADER_SIZE + 4 * n + 8 * 29:HEADER_SIZE + 4 * n + 8 * 30] = (12345).to_bytes(8, "little")
    elif damage == "size":  # a size in the third chunk: the .bin length and later pointers disagree
        raw[HEADER_SIZE + 4 * 20:HEADER_SIZE + 4 * 21] = (3).to_bytes(4, "little", signed=True)
    elif damage == "doc_idx":  # a fall between two chunks of doc_idx
        raw[HEADER_SIZE + 12 * n + 8 * 16:HEADER_SIZE + 12 * n + 8 * 17] = (2).to_bytes(8, "little")
    open(p + ".idx", "wb").write(bytes(raw))
    r = IndexedReader(p)
    whole = r.structure_problems(chunk=1 << 22)
    assert (whole == []) == (damage == "none")
    for chunk in (1, 3, 8, 16, 39):
        assert r.structure_problems(chunk=chunk) == whole
    assert r.total_tokens() == sum(i % 7 + 1 for i in range(40)) + (0 if damage != "size" else 3 - (20 % 7 + 1))


def test_unwritable_cache_falls_back_to_memory_with_a_warning(sources, tmp_path, capfd):
    ref = _open(sources, None, None)[1]
    (tmp_path / "file").write_text("not a directory")
    ds, samples = _open(sources, str(tmp_path / "file" / "cache"), None)
    assert np.array_equal(samples, ref)
    err = capfd.readouterr().err
    assert "warning: cannot use the sample-index cache" in err and "data.cache_dir" in err
    assert not any(isinstance(a, np.memmap) for ix in ds.index for a in ix.epoch(0))


@pytest.mark.slow
def test_bench_data_memory_smoke():
    """tools/bench_data_memory.py --smoke runs both ranks on both prefixes and prints its table."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tools" / "bench_data_memory.py"), "--smoke"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert [x["rank"] for x in res["ranks"]] == [0, 1] and res["documents"] == 128 << 10
    assert all(x["big_after"] > 0 and x["big_trimmed"] > 0 for x in res["ranks"])
    assert "| big - tiny MiB |" in r.stdout
