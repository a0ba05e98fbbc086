"""Fill typed dataclasses from YAML data and `key=value` overrides, collecting every error.

Reads nothing from disk; `config.py` hands it the recipe's parsed YAML and the command line.
The schema is plain dataclasses whose fields carry a docstring (the string literal right after
the field), which `field_docs()` reads back for `--help`, and number fields their allowed values
(`ranged()`), which `check_ranges()` enforces.

    python -c "from cai_lite.config import Config; from cai_lite.typed_yaml import describe; print(describe(Config))"
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def ranged(default: float | str, span: str) -> Any:
    """A number field and the values it takes: "> 0", ">= 1" or an interval such as "(0, 1]",
    optionally followed by why (the end of the error message). In a number-or-word field
    (`int | Literal["auto"]`) the span holds for the numbers."""
    return dataclasses.field(default=default, metadata={"range": span})


_SPAN = re.compile(r"(>=?) (-?[\d.]+)|([(\[])(-?[\d.]+), (-?[\d.]+)([)\]])")


def _allows(span: str, value: float) -> bool:
    """Whether `value` is in `span`; NaN never is."""
    m = _SPAN.match(span)
    if m[1]:
        return value >= float(m[2]) if m[1] == ">=" else value > float(m[2])
    low, high = float(m[4]), float(m[5])
    return (low <= value if m[3] == "[" else low < value) and (value <= high if m[6] == "]" else value < high)


def check_ranges(obj: Any, prefix: str = "") -> list[str]:
    """`KEY must be SPAN (got VALUE)` for each field of `obj`, its sections and its lists of
    sections, that lies outside its `ranged()` span."""
    errors = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            errors += check_ranges(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    errors += check_ranges(item, f"{prefix}{f.name}[{i}].")
        # A number-or-word field (`int | Literal["auto"]`) has a range for its numbers only.
        elif "range" in f.metadata and isinstance(value, (int, float)) and not _allows(f.metadata["range"], value):
            span = f.metadata["range"]
            errors.append(f"{prefix}{f.name} must be {'in ' if span[0] in '([' else ''}{span} (got {value})")
    return errors


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, key + ".")
    return keys


def type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(t))
    if origin is list:
        return f"list[{type_name(typing.get_args(t)[0])}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(t))
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, key: str, errors: list[str], raw: str | None) -> Any:
    """Return `value` as type `t`, or append an error naming `key` and return None."""

    def bad() -> None:
        shown = raw if raw is not None else value
        errors.append(f"{key}: expected {type_name(t)}, got {shown!r}")

    origin = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        if isinstance(value, str) and getattr(t, "SHORTHAND", None):
            # e.g. `judge=llamacpp` means `judge.backend=llamacpp`
            return {t.SHORTHAND: value}
        if not isinstance(value, dict):
            return bad()
        return value
    if origin is Literal:
        choices = typing.get_args(t)
        if value in choices:
            return value
        errors.append(f"{key}: expected one of {', '.join(map(str, choices))}, got {raw if raw is not None else value!r}")
        return None
    if origin in (typing.Union, types.UnionType):
        # e.g. `int | Literal["auto"]`: the first member that takes the value, else one error for the union
        for member in typing.get_args(t):
            tried: list[str] = []
            v = _coerce(value, member, key, tried, raw)
            if not tried:
                return v
        return bad()
    if origin is list:
        (item_t,) = typing.get_args(t)
        if isinstance(value, str) and raw is not None and not raw.startswith("["):
            value = [v.strip() for v in value.split(",") if v.strip()]  # `stages=sft,ppo` also works
        if not isinstance(value, list):
            return bad()
        out = []
        for i, v in enumerate(value):
            item = _coerce(v, item_t, f"{key}[{i}]", errors, None)
            if dataclasses.is_dataclass(item_t) and isinstance(item, dict):
                item = build(item_t, item, f"{key}[{i}].", errors)
            out.append(item)
        return out
    if t is bool:
        if isinstance(value, bool):
            return value
        return bad()
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return bad()
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `1e-4` as a string; users mean the number
            except ValueError:
                pass
        return bad()
    if t is str:
        if raw is not None:
            return raw  # the command line text as typed: `run_name=007` stays "007"
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return bad()
    raise TypeError(f"{key}: unsupported schema type {t}")


def _unknown(key: str, known: list[str], errors: list[str], root: type) -> None:
    """`KEY: no such key`, and the key meant: where the last part is another tool's name for one of
    ours (the root class's OTHER_NAMES, e.g. TRL's learning_rate), ours within KEY's section; else
    the closest spelling."""
    section, _, name = key.rpartition(".")
    meant = getattr(root, "OTHER_NAMES", {}).get(name)
    if isinstance(meant, str):  # a setting we do not have, and why
        errors.append(f"{key}: no such key ({meant})")
        return
    ours = [k for k in meant or [] if not section or k.startswith(section + ".")]
    if ours:
        listed = f"{', '.join(ours[:-1])} or {ours[-1]}? each stage has its own" if len(ours) > 1 else f"{ours[0]}?"
        errors.append(f"{key}: no such key (did you mean {listed})")
        return
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    errors.append(f"{key}: no such key{hint}")


def build(cls: type, data: dict, prefix: str, errors: list[str], root: type | None = None) -> Any:
    """Instantiate `cls` from nested `data`, defaults filling the gaps; errors are appended. `root`:
    the class of the whole tree (`cls` at the top), whose OTHER_NAMES guide "did you mean"."""
    root = root or cls
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in known:
            _unknown(key, all_keys(cls, prefix), errors, root)
            continue
        t = _hints(cls)[name]
        v = _coerce(value, t, key, errors, None)
        if v is None:
            continue
        if dataclasses.is_dataclass(t):
            v = build(t, v, key + ".", errors, root)
        kwargs[name] = v
    return cls(**kwargs)


def parse_override(arg: str) -> tuple[str, Any, str] | None:
    """`a.b=[x,y]` -> ("a.b", ["x", "y"], "[x,y]"); None if `arg` has no `=`."""
    if "=" not in arg:
        return None
    key, raw = arg.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value, raw


def apply_override(obj: Any, root: type, key: str, value: Any, raw: str, errors: list[str]) -> None:
    """Set dotted `key` on the dataclass tree `obj`, coercing `value` to the field's type."""
    parts = key.split(".")
    target, cls = obj, root
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            _unknown(key, all_keys(root), errors, root)
            return
        t = _hints(cls)[part]
        if i == len(parts) - 1:
            v = _coerce(value, t, key, errors, raw if not isinstance(value, (dict, list)) else None)
            if v is None:
                return
            if dataclasses.is_dataclass(t):
                # A whole section (or its shorthand) replaces only the fields it names.
                current = dataclasses.asdict(getattr(target, part))
                current.update(v)
                v = build(t, current, key + ".", errors, root)
            setattr(target, part, v)
            return
        if not dataclasses.is_dataclass(t):
            errors.append(f"{key}: {'.'.join(parts[: i + 1])} is a {type_name(t)}, not a section")
            return
        target, cls = getattr(target, part), t


def describe(cls: type, prefix: str = "", obj: Any = None) -> list[str]:
    """One line per key: name, type, its value in `obj` (the schema's defaults if None) and the
    schema's default where that differs, then the docstring (for `--help`)."""
    defaults = cls()
    obj = obj if obj is not None else defaults
    lines = []
    docs = field_docs(cls)

    def shown(v: Any) -> Any:
        return "[...]" if isinstance(v, list) and v and dataclasses.is_dataclass(v[0]) else v

    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(t):
            lines.append(f"\n  [{prefix}{f.name}] {docs.get(f.name, '')}")
            lines += describe(t, prefix + f.name + ".", value)
            continue
        value, default = shown(value), shown(getattr(defaults, f.name))
        differs = f"   (default {default!r})" if value != default else ""
        span = f"   (must be {f.metadata['range']})" if "range" in f.metadata else ""
        lines.append(f"  {prefix}{f.name}: {type_name(t)} = {value!r}{differs}{span}\n      {docs.get(f.name, '')}")
    return lines
