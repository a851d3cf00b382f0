"""What a checkpoint is, from its JSON alone: `pretrain-inspect-ckpt PATH [--step N] [--json]`.

Prints the step, layout, model, training config, data (fingerprint and the data manifest
of the tokenizer directory), the committed checkpoints of the run, whether converted
(reshardable: universal, consolidated) copies exist, and whether the export to
transformers is possible -- and verifies the commit manifest (sizes and checksums of every
file). Nothing is unpickled: only `state.json`, `manifest.json`, `latest` and the data
`manifest.json` are parsed; the DeepSpeed files are only hashed as bytes.

Exit status: 0 intact, 1 the checkpoint fails verification (the reason is printed),
2 not a checkpoint (one `error:` line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.checkpoint import store
from pretrain.errors import HelpFormatter, UserError, cli_entry


def _candidates(path: Path) -> tuple[Path | None, list[Path]]:
    """(checkpoints directory, its step_* dirs) for a run dir / checkpoints dir / step dir."""
    if store.TAG_RE.match(path.name) and path.is_dir():
        return path.parent, sorted(p for p in path.parent.glob("step_*") if store.TAG_RE.match(p.name))
    for d in (path / "checkpoints", path):
        tags = sorted(p for p in d.glob("step_*") if store.TAG_RE.match(p.name)) if d.is_dir() else []
        if tags or (d / "latest").is_file():
            return d, tags
    return None, []


def pick(path: str, step: int | None) -> tuple[Path, list[Path], str | None]:
    """(the step dir to inspect, every step dir of the run, the tag `latest` names)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or directory")
    ckpt_dir, tags = _candidates(p)
    if ckpt_dir is None or not tags:
        raise UserError(f"{path}: no checkpoint here (expected a run directory, its checkpoints/ directory, or a "
                        "step_* directory written by pretrain-train)")
    latest = None
    if (ckpt_dir / "latest").is_file():
        latest = (ckpt_dir / "latest").read_text().strip()
    if step is not None:
        want = ckpt_dir / store.tag_for(step)
        if want not in tags:
            raise UserError(f"{path}: no checkpoint of step {step} (have: {', '.join(t.name for t in tags)})")
        return want, tags, latest
    if store.TAG_RE.match(p.name):
        return p, tags, latest
    if latest and (ckpt_dir / latest).is_dir():
        return ckpt_dir / latest, tags, latest
    return tags[-1], tags, latest


def _data_summary(state: dict, tag_dir: Path) -> dict:
    problem = None
    try:
        tdir = store.tokenizer_dir(tag_dir, state)  # the checkpoint's own copy (older ones: the data's)
    except UserError as e:
        tdir, problem = None, str(e)
    out = {"fingerprint": state.get("data_fingerprint"), "tokenizer_dir": tdir,
           "paths": state.get("config", {}).get("data", {}).get("paths"),
           "synthetic": state.get("config", {}).get("data", {}).get("synthetic")}
    if problem:
        out["manifest"] = problem
    if tdir:
        f = Path(tdir) / "manifest.json"
        try:
            man = json.loads(f.read_text())
            tok = man.get("tokenizer", {})
            out["manifest"] = {"vocab_size": man.get("vocab_size"), "tokenizer": tok.get("spec") or tok.get("type"),
                               "eos_id": man.get("eos_id"), "bos_id": man.get("bos_id"),
                               "tokens": {k: v.get("tokens") for k, v in man.get("splits", {}).items()},
                               "prep_fingerprint": man.get("prep_fingerprint")}
        except (OSError, ValueError, AttributeError) as e:
            out["manifest"] = f"unreadable here ({e.__class__.__name__})"
    return out


def inspect(path: str, step: int | None = None, verify: bool = True) -> dict:
    """Everything `pretrain-inspect-ckpt` prints, as a dict (JSON only, no unpickling)."""
    tag_dir, tags, latest = pick(path, step)
    report: dict = {"checkpoint": str(tag_dir), "latest": latest,
                    "checkpoints": {t.name: ("committed" if (t / store.MANIFEST).is_file() else "uncommitted")
                                    for t in tags}}
    try:
        state = json.loads((tag_dir / store.STATE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        state = None
        report["problem"] = f"no {store.STATE} (not written by pretrain-train, or the save never finished)"
    except (OSError, ValueError) as e:
        state = None
        report["problem"] = f"unreadable {store.STATE} ({e})"
    if verify:
        reason = store.verify(tag_dir)
        report["verified"] = reason is None
        if reason is not None:
            report["problem"] = report.get("problem") or reason
    try:
        manifest = json.loads((tag_dir / store.MANIFEST).read_text())
        files = manifest.get("files", {})
        report["files"] = {"count": len(files), "bytes": sum(int(f.get("size", 0)) for f in files.values())}
    except (OSError, ValueError, AttributeError):
        report["files"] = None
    for copy in ("universal", "consolidated"):  # pretrain-convert reshard
        u = tag_dir / copy
        done = (u / store.MANIFEST).is_file() if not verify else u.is_dir() and store.verify(u) is None
        report[copy] = "committed" if done else "incomplete" if u.exists() else None
    if state is not None:
        report.update({"step": state.get("step"), "consumed_samples": state.get("consumed_samples"),
                       "consumed_tokens": state.get("consumed_tokens"), "skipped_steps": state.get("skipped_steps"),
                       "layout": state.get("layout"), "model_shape": state.get("model_shape"),
                       "versions": state.get("versions"), "config": state.get("config"),
                       "data": _data_summary(state, tag_dir)})
        try:
            from pretrain.interop.names import ARCHITECTURES, architecture

            report["export"] = ARCHITECTURES[architecture(state["config"]["model"])]
        except UserError as e:
            report["export"] = f"not exportable: {e}"
        except (KeyError, TypeError):
            report["export"] = None
    return report


def _fmt(report: dict) -> str:
    def mb(n):
        return f"{n / 1e6:,.1f} MB"

    lines = [f"checkpoint   {report['checkpoint']}"]
    tags = report["checkpoints"]
    lines.append("run          " + ", ".join(f"{k}{' (latest)' if k == report.get('latest') else ''}"
                                            f"{'' if v == 'committed' else ' [' + v + ']'}" for k, v in tags.items()))
    if "step" in report:
        lines.append(f"step         {report['step']}  (consumed {report.get('consumed_samples')} samples = "
                     f"{report.get('consumed_tokens')} tokens; skipped steps {report.get('skipped_steps')})")
        lay = report.get("layout") or {}
        lines.append(f"layout       data {lay.get('dp')} x tensor {lay.get('tp', 1)} x pipeline {lay.get('pp', 1)}, "
                     f"ZeRO stage {lay.get('zero_stage')}")
        ms = report.get("model_shape") or {}
        lines.append("model        " + " ".join(f"{k}={v}" for k, v in ms.items()))
        cfg = report.get("config") or {}
        t, o = cfg.get("train", {}), cfg.get("optim", {})
        gbs = t.get("global_batch_size")
        if gbs is None and t.get("micro_batch_size") and lay.get("dp"):  # null = micro x data-parallel
            gbs = f"{t['micro_batch_size'] * lay['dp']} (= micro x data {lay['dp']}, train.global_batch_size null)"
        lines.append(f"training     precision {t.get('precision')}, global batch {gbs}, "
                     f"micro batch {t.get('micro_batch_size')}, max_steps {t.get('max_steps')}, lr {o.get('lr')}, "
                     f"seq_len {cfg.get('model', {}).get('seq_len')}")
        d = report.get("data") or {}
        lines.append(f"data         {'synthetic' if d.get('synthetic') else d.get('paths')}; "
                     f"fingerprint {d.get('fingerprint')}")
        man = d.get("manifest")
        if isinstance(man, dict):
            lines.append(f"data manifest {d.get('tokenizer_dir')}: tokenizer {man.get('tokenizer')}, vocab "
                         f"{man.get('vocab_size')}, tokens {man.get('tokens')}")
        elif man:
            lines.append(f"data manifest {d.get('tokenizer_dir')}: {man}")
        lines.append(f"export       {report.get('export')}")
        v = report.get("versions") or {}
        lines.append(f"written by   torch {v.get('torch')}, deepspeed {v.get('deepspeed')}")
    f = report.get("files")
    if f:
        lines.append(f"files        {f['count']} ({mb(f['bytes'])})")
    copies = [f"{c} copy {report[c]}" for c in ("universal", "consolidated") if report.get(c)]
    lines.append("reshardable  " + (", ".join(copies) if copies else "no converted copy (pretrain-convert reshard)"))
    if "verified" in report:
        lines.append("manifest     " + ("OK: every file's size and checksum match" if report["verified"]
                                        else f"FAILED: {report.get('problem')}"))
    if report.get("problem") and report.get("verified") is not False:
        lines.append(f"problem      {report['problem']}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain-inspect-ckpt", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("path", help="run directory, its checkpoints/ directory, or a step_* directory")
    p.add_argument("--step", type=int, default=None, help="inspect this step (default: latest)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (with the full config)")
    p.add_argument("--no-verify", action="store_true", help="skip hashing the files (fast on huge checkpoints)")
    p.add_argument("--config", action="store_true", help="also print the run's full config (JSON)")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    report = inspect(a.path, a.step, verify=not a.no_verify)
    if a.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print(_fmt(report))
        if a.config and report.get("config"):
            print(json.dumps(report["config"], indent=1, sort_keys=True))
    bad = report.get("verified") is False or report.get("problem")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
