"""Generate docs/CONFIG.md from the field docstrings of `pretrain/config/schema.py`.

    python -m pretrain.config.docs            # (re)write docs/CONFIG.md
    python -m pretrain.config.docs --check    # exit 1 if docs/CONFIG.md is not current

The docstrings are read from the schema's source with `ast` (a dataclass field followed
by a string literal); types come from the annotations as written, defaults from the
dataclasses themselves.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from pretrain.config import schema

__all__ = ["field_docs", "render", "main", "DOC_PATH"]

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"

_HEADER = """\
# Configuration reference

<!-- Generated from pretrain/config/schema.py by `python -m pretrain.config.docs`; do not edit. -->

A run is configured by one YAML file with the sections below; every section and key is
optional and omitted keys take the defaults listed here. Presets live in `configs/`.
Any field can be overridden on the command line after the config path with a dotted
`section.field=value` (the value is parsed as YAML: `null`, `true`, `3e-4`, `[a, b]`):

```
pretrain-train configs/gpt2-124m.yaml train.max_steps=100 model.n_layer=4 parallel.zero_stage=2
```

`--print-config` prints the resolved configuration, `--plan` the parameter count, batch
plan, process layout, per-rank memory and checkpoint size estimates without starting training,
`--check` only validates (config, layout, data manifests, and the DeepSpeed config, `deepspeed:`
section included, with DeepSpeed's own config model) for `--world-size N`. Unknown
keys and values of the wrong type are rejected with the nearest valid key; invalid
combinations (batch sizes that do not divide, heads not divisible by the tensor-parallel
degree, ZeRO-2/3 with pipeline parallelism, ...) are rejected before any process starts.
"""


def field_docs(source: str | None = None) -> dict[str, dict[str, Any]]:
    """{class name: {"doc": class docstring, "fields": [(name, annotation, docstring)]}}."""
    if source is None:
        source = Path(inspect.getsourcefile(schema)).read_text(encoding="utf-8")
    tree = ast.parse(source)
    out: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = []
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = ""
                nxt = body[i + 1] if i + 1 < len(body) else None
                if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    doc = inspect.cleandoc(nxt.value.value)
                fields.append((stmt.target.id, ast.unparse(stmt.annotation), doc))
        out[node.name] = {"doc": ast.get_docstring(node) or "", "fields": fields}
    return out


def _type(annotation: str) -> str:
    m = re.fullmatch(r"Optional\[(.+)\]", annotation)
    if m:
        return f"{_type(m.group(1))} or null"
    return {"list": "list", "dict": "mapping", "int": "int", "float": "float", "bool": "bool",
            "str": "string"}.get(annotation, annotation)


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, (list, dict)):
        return "[]" if isinstance(v, list) and not v else ("{}" if not v else repr(v))
    return repr(v)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The text of docs/CONFIG.md."""
    docs = field_docs()
    top = {f.name: f for f in dataclasses.fields(schema.Config)}
    config_doc = docs["Config"]
    top_docs = {name: doc for name, _, doc in config_doc["fields"]}
    defaults = schema.Config()
    parts = [_HEADER]
    parts.append("## Sections\n")
    for name in top:
        parts.append(f"- [`{name}`](#{name})")
    parts.append("")
    for name, f in top.items():
        value = getattr(defaults, name)
        parts.append(f"## {name}\n")
        if dataclasses.is_dataclass(value):
            cls_name = type(value).__name__
            info = docs[cls_name]
            if info["doc"]:
                parts.append(_cell(info["doc"]) + "\n")
            parts.append("| key | type | default | description |")
            parts.append("|---|---|---|---|")
            for fname, annotation, doc in info["fields"]:
                parts.append(f"| `{name}.{fname}` | {_type(annotation)} | `{_value(getattr(value, fname))}` "
                             f"| {_cell(doc)} |")
        else:
            parts.append(_cell(top_docs.get(name, "")) + "\n")
            from pretrain.config.validate import DEEPSPEED_OWNED_KEYS

            parts.append("The generated config is built by `pretrain/config/deepspeed.py`. Keys generated "
                         "from our own fields are rejected here; set the field instead:\n")
            parts.extend(f"- `{k}`: {v}" for k, v in DEEPSPEED_OWNED_KEYS.items())
            parts.append("")
            parts.append(f"Type: {_type(str(f.type))}, default `{_value(value)}`. Example:\n")
            parts.append("```yaml\ndeepspeed:\n  zero_optimization:\n    reduce_bucket_size: 200000000\n"
                         "  communication_data_type: fp32\n```")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate docs/CONFIG.md from the config schema.")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    ap.add_argument("--out", default=str(DOC_PATH), help="output path (default: docs/CONFIG.md)")
    args = ap.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            print(f"{out} is out of date; run: python -m pretrain.config.docs", file=sys.stderr)
            return 1
        print(f"{out} is current")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
