"""Loading a run configuration: YAML file + dotted command-line overrides -> `Config`.

    cfg = load_config("configs/gpt2-124m.yaml", ["train.max_steps=100", "model.n_layer=4"])

* The file is read with a `yaml.SafeLoader` variant that also reads `6e-4` / `5e8` as
  numbers (plain YAML 1.1 reads them as strings), does not turn `2024-01-01` into a date,
  and rejects duplicate keys.
* Every key is checked against the schema; an unknown key names the full dotted key and
  the nearest valid one. Every value is checked against its field's annotation.
* Overrides are `section.field=value`; the value is parsed as YAML (`null`, `[a, b]`,
  `true`, `3e-4`). `deepspeed.a.b=v` sets a key of the DeepSpeed passthrough dict.
* `path=None` means all defaults (plus overrides); a list of files is merged in order.

Cross-field rules (batch sizes, parallel degrees, ...) are checked later by
`validate.resolve`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import yaml

from pretrain.config.deepspeed import deep_merge
from pretrain.config.schema import Config, to_dict
from pretrain.errors import UserError

__all__ = ["load_config", "config_from_dict", "config_to_yaml", "parse_yaml", "valid_keys"]

_PASSTHROUGH = "deepspeed"


# --------------------------------------------------------------------------- YAML reading
class _Loader(yaml.SafeLoader):
    """SafeLoader + exponent floats without a dot, no timestamps, duplicate keys rejected."""


_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_EXPNUM = "tag:pretrain,2024:expnum"


def _construct_expnum(loader: _Loader, node: yaml.ScalarNode) -> int | float:
    value = float(loader.construct_scalar(node).replace("_", ""))
    return int(value) if value.is_integer() and abs(value) < 2**63 else value  # 5e8 -> 500000000


_Loader.add_constructor(_EXPNUM, _construct_expnum)
_Loader.add_implicit_resolver(
    _EXPNUM,
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: SafeLoader reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(source: str, e: yaml.YAMLError) -> UserError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return UserError(f"{source}: invalid YAML{where}: {problem}")


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the project's loader; syntax errors -> UserError with the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None


# --------------------------------------------------------------------------- schema walking
def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _field_types(cls: type) -> dict[str, Any]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@lru_cache(maxsize=None)
def valid_keys() -> tuple[str, ...]:
    """Every dotted key of the schema (sections and their fields)."""
    keys = []
    for name, tp in _field_types(Config).items():
        keys.append(name)
        if _is_section(tp):
            keys.extend(f"{name}.{f}" for f in _field_types(tp))
    return tuple(keys)


def _suggest(key: str) -> str:
    """'; did you mean ...?' for an unknown dotted key, or ''."""
    keys = valid_keys()
    section, _, leaf = key.rpartition(".")
    # Same field name in another section (train.lr -> optim.lr).
    same_leaf = [k for k in keys if "." in k and k.rsplit(".", 1)[1] == leaf]
    if same_leaf:
        return f"; did you mean '{same_leaf[0]}'?"
    # Close match inside the same section, then anywhere.
    if section:
        in_section = [k.rsplit(".", 1)[1] for k in keys if k.startswith(section + ".")]
        near = difflib.get_close_matches(leaf, in_section, n=1, cutoff=0.6)
        if near:
            return f"; did you mean '{section}.{near[0]}'?"
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if near:
        return f"; did you mean '{near[0]}'?"
    if section and section in keys:
        fields = ", ".join(k.rsplit(".", 1)[1] for k in keys if k.startswith(section + "."))
        return f"; valid keys of '{section}' are: {fields}"
    sections = ", ".join(k for k in keys if "." not in k)
    return f"; valid sections are: {sections}"


def _unknown(source: str, key: str) -> UserError:
    return UserError(f"{source}: unknown key '{key}'{_suggest(key)}")


# --------------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string",
            list: "a list (e.g. [a, b])", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; returns the (possibly converted) value."""
    declared = tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = inner[0] if len(inner) == 1 else tp

    def bad(hint: str = "") -> UserError:
        return UserError(f"{source}: {key} must be {_type_name(declared)}, got {_show(value)}{hint}")

    if value is None:
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise bad(" (YAML reads yes/no/on/off/true/false as booleans; quote the value)")
        raise bad(" (quote the value)")
    if tp is list:
        if isinstance(value, list):
            return list(value)
        raise bad()
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad()
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not a user error


# --------------------------------------------------------------------------- building Config
def config_from_dict(data: Any, source: str = "<config>") -> Config:
    """A `Config` from a nested dict (as read from YAML); unknown keys and bad types -> UserError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (model:, train:, ...), "
                        f"got {type(data).__name__}")
    sections: dict[str, Any] = {}
    top = _field_types(Config)
    for name, value in data.items():
        if not isinstance(name, str) or name not in top:
            raise _unknown(source, str(name))
        tp = top[name]
        if name == _PASSTHROUGH:
            sections[name] = _coerce({} if value is None else value, dict, name, source)
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{source}: '{name}' must be a mapping of its fields "
                            f"(e.g. {name}.{next(iter(_field_types(tp)))}), got {value!r}")
        fields = _field_types(tp)
        kwargs = {}
        for fname, fvalue in value.items():
            if not isinstance(fname, str) or fname not in fields:
                raise _unknown(source, f"{name}.{fname}")
            kwargs[fname] = _coerce(fvalue, fields[fname], f"{name}.{fname}", source)
        sections[name] = tp(**kwargs)
    return Config(**sections)


def _apply_override(cfg: Config, item: str) -> None:
    source = f"override '{item}'"
    if "=" not in item:
        raise UserError(f"{source}: overrides look like section.field=value (e.g. train.max_steps=100)")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if any(not p for p in parts):
        raise UserError(f"{source}: '{key}' is not a dotted key (e.g. train.max_steps=100)")
    top = _field_types(Config)
    value = parse_yaml(text, source)
    if parts[0] == _PASSTHROUGH:
        if len(parts) == 1:
            cfg.deepspeed = deep_merge(cfg.deepspeed, _coerce(value, dict, key, source))
            return
        node = cfg.deepspeed
        for i, p in enumerate(parts[1:-1], start=1):
            if not isinstance(node.get(p, {}), dict):
                raise UserError(f"{source}: {'.'.join(parts[:i + 1])} is {node[p]!r}, not a mapping; "
                                f"set it as a whole instead")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        return
    if parts[0] not in top:
        raise _unknown(source, key)
    if len(parts) == 1:
        raise UserError(f"{source}: '{key}' is a section; override one of its fields, "
                        f"e.g. {key}.{next(iter(_field_types(top[key])))}=...")
    if len(parts) != 2:
        leaf = ".".join(parts[:2])
        if leaf in valid_keys():
            raise UserError(f"{source}: '{leaf}' is a field, not a section; use {leaf}=value")
        raise _unknown(source, key)
    section_cls = top[parts[0]]
    fields = _field_types(section_cls)
    if parts[1] not in fields:
        raise _unknown(source, key)
    tp = fields[parts[1]]
    # A bare word for a string field stays the text the user typed (out_dir=2024, device=on).
    wants_str = tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))
    if wants_str and value is not None and not isinstance(value, (str, list, dict)):
        value = text.strip()
    setattr(getattr(cfg, parts[0]), parts[1], _coerce(value, tp, key, source))


PRESETS = Path(__file__).resolve().parents[1] / "presets"  # configs/, shipped as package data


def preset_path(path: str) -> str:
    """`path`, or the shipped preset it names when it does not exist here: `gpt2-124m`,
    `gpt2-124m.yaml` or `configs/gpt2-124m.yaml` work from any directory, also after a
    non-editable `pip install .`."""
    p = Path(path)
    if p.exists() or p.parent.name not in ("", "configs"):
        return path
    for name in (p.name, p.name + ".yaml"):
        if (PRESETS / name).is_file():
            return str(PRESETS / name)
    return path


def _read_file(path: str) -> dict:
    path = preset_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise UserError(f"{path}: config file not found (presets: {names})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a YAML config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config file: {e}") from None
    data = parse_yaml(text, path)
    config_from_dict(data, path)  # every key and type checked, with this file's name
    return data or {}


def _merge_files(datas: list[dict]) -> dict:
    """Files merged in order: a later file's field replaces an earlier one's, field by field
    (lists too); the `deepspeed` passthrough merges recursively."""
    merged: dict = {}
    for data in datas:
        for name, value in data.items():
            if name == _PASSTHROUGH:
                merged[name] = deep_merge(merged.get(name) or {}, value or {})
            else:
                merged[name] = {**(merged.get(name) or {}), **(value or {})}
    return merged


def load_config(path: str | list[str] | tuple[str, ...] | None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML config file(s) and apply dotted overrides, in order.

    `path`: one file, several (merged in order, later files win field by field, as with
    `--config base.yaml --config mine.yaml`), or None/[] for all defaults.
    """
    paths = [path] if isinstance(path, str) else list(path or [])
    if not paths:
        cfg = Config()
    elif len(paths) == 1:
        cfg = config_from_dict(_read_file(paths[0]), paths[0])
    else:
        cfg = config_from_dict(_merge_files([_read_file(p) for p in paths]), " + ".join(paths))
    for item in overrides or ():
        _apply_override(cfg, item)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """The whole config as YAML (every field, defaults included), loadable by `load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
