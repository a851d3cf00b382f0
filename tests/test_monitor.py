"""pretrain/run/monitor.py: TensorBoard layout (losses first, loss against tokens), metrics.jsonl
rewound on resume, and the optional Weights & Biases logger in its offline mode."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from pretrain.run.monitor import Monitor, tensorboard_tags

ROOT = Path(__file__).resolve().parents[1]


def test_tensorboard_tags_put_the_losses_first_and_against_tokens():
    tags = tensorboard_tags(5, {"train/loss": 2.0, "train/consumed_tokens": 640, "perf/mfu": None,
                                "mem/cpu_rss_gib": 1.0, "perf/step_time_ms": 3.0}, None)
    assert ("loss/train", 2.0, 5) in tags and ("loss/train_vs_tokens", 2.0, 640) in tags
    assert not any(t[0] == "perf/mfu" for t in tags)  # None = not measured, not written
    assert sorted({t.split("/")[0] for t, _, _ in tags})[0] == "loss"
    val = tensorboard_tags(5, {"val/loss": 1.5, "val/perplexity": 4.5}, 640)
    assert set(val) == {("loss/val", 1.5, 5), ("loss/val_perplexity", 4.5, 5), ("loss/val_vs_tokens", 1.5, 640)}


def test_rewind_drops_rows_after_the_resumed_step(tmp_path):
    m = Monitor(tmp_path, True, False, 10)
    for step in range(1, 7):
        m.log(step, {"train/loss": float(step)})
    m.metrics.write('{"step": 7, "tr')  # a torn last line (killed mid-write)
    m.close()
    m = Monitor(tmp_path, True, False, 10)
    m.rewind(3)
    for step in (4, 5):
        m.log(step, {"train/loss": 10.0 + step})
    m.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline W&B run file (a log of length-prefixed protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, rows = Path(run_file).read_bytes(), 7, []
    while pos + 7 <= len(data):
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            break
        rec = pb.Record()
        rec.ParseFromString(data[pos:pos + length])
        pos += length
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline(tmp_path):
    code = ("from pathlib import Path\nfrom pretrain.run.monitor import Monitor\n"
            f"m = Monitor(Path({str(tmp_path)!r}), True, False, 10, {{'project': 'test', 'config': {{'a': 1}}}})\n"
            "m.log(1, {'train/loss': 2.5, 'perf/mfu': None}); m.log(2, {'train/loss': 2.0, 'val/loss': 2.25})\n"
            "m.close()\n")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} | {"step": row["_step"]}
            for row in _wandb_history(runs[0])]
    assert rows == [{"train/loss": 2.5, "step": 1}, {"train/loss": 2.0, "val/loss": 2.25, "step": 2}]


def test_wandb_requested_but_missing_is_a_config_error():
    code = ("import sys; sys.modules['wandb'] = None\n"  # as if not installed
            "from pretrain.config import load_config, resolve\n"
            "cfg = load_config(None, ['data.synthetic=true', 'model.vocab_size=64', 'logging.wandb=true'])\n"
            "resolve(cfg, 1, None, cuda_available=False)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "pip install 'pretrain[wandb]'" in r.stderr
