"""One config mechanism for every section: typed dataclasses built from YAML mappings.

The run config and each of its sections, the model configs (LLMConfig, DiTConfig), the LoRA
section, the chat template and `megalm prep`'s settings are `Section` dataclasses built by
`build()`: unknown keys, wrong types and missing required keys are refused there, then every
section's `validate()` runs (innermost first). A section reports a bad value by raising
`Invalid(key, what)` with the key relative to itself; `build` names the file and the full dotted
key, so every config error reads `FILE: a.b.c: what was expected`.

`read_yaml` reads a mapping (a syntax error names FILE:LINE) and `apply_overrides` applies the
command line's `a.b.c=value` items to it before `build`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megalm.errors import UserError

T = TypeVar("T")


class Invalid(UserError):
    """A bad value in a section: `key` relative to the section that raises it."""

    def __init__(self, key: str, what: str):
        super().__init__(f"{key}: {what}")
        self.key, self.what = key, what


class Section:
    """Base of every config dataclass: `validate()` checks values across fields (types are
    already checked by `build`) and raises `Invalid(key, what)`."""

    def validate(self) -> None:
        pass


def build(cls: type[T], data: Any, source: str, prefix: str = "", internal: dict[str, Any] | None = None) -> T:
    """`cls` from a mapping, checked and validated; errors are one line naming `source` and the key.
    `internal` sets fields that are not config keys (`field(metadata=INTERNAL)`)."""
    obj = _build(cls, data, prefix, source, internal)
    validate_tree(obj, source, prefix)
    return obj


def validate_tree(obj: Any, source: str, prefix: str = "") -> None:
    """Run `validate()` of every Section inside `obj`, innermost first, naming the dotted key."""
    if not isinstance(obj, Section):
        return
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        validate_tree(getattr(obj, f.name), source, _join(prefix, f.name))
    try:
        obj.validate()
    except Invalid as exc:
        raise _named(exc, source, prefix) from None


INTERNAL = {"config_key": False}  # field metadata: set by the program, never by a config file


def field_names(cls: type) -> list[str]:
    """The keys a config may set: the fields, less the internal ones."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("config_key", True)]


def check_fields(cls: type, data: Mapping[str, Any], source: str, prefix: str = "",
                 extra: Iterable[str] = ()) -> dict[str, Any]:
    """Each value of `data` coerced to the type of `cls`'s field of that name (or one of `extra`,
    kept as is), without building `cls`: for a section completed later (a model config whose
    vocabulary comes from the data)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{_where(source, prefix)}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names, out = field_names(cls), {}
    for k, v in data.items():
        key = _join(prefix, str(k))
        if k in extra:
            out[k] = v
        elif k not in names:
            raise UserError(f"{source}: {key}: unknown key (expected one of {', '.join(sorted([*names, *extra]))})")
        else:
            out[k] = _coerce(v, hints[k], key, source)
    return out


def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _named(exc: Invalid, source: str, prefix: str) -> UserError:
    return UserError(f"{source}: {_join(prefix, exc.key)}: {exc.what}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type, data: Any, prefix: str, source: str, internal: dict[str, Any] | None = None) -> Any:
    values = {**check_fields(cls, data, source, prefix), **(internal or {})}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{source}: {_join(prefix, missing[0])}: required key missing")
    try:
        return cls(**values)
    except Invalid as exc:  # a section that checks itself when constructed (LLMConfig)
        raise _named(exc, source, prefix) from None


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> UserError:
        return UserError(f"{_where(source, key)}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{key}: config fields are one type or `X | None`, not {tp}")
        return None if value is None else _coerce(value, args[0], key, source)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = typing.get_args(tp)[0]
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return copy.deepcopy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value):
            raise bad("an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{key}: no coercion for a config field of type {tp}")


def read_yaml(path: str | Path, what: str = "config", name: str | None = None) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is an empty mapping); one line on any problem,
    naming the file as `name` (default: the path)."""
    name = str(path) if name is None else name
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{name}: expected a mapping of {what} keys at the top level")
    return raw


def key_line(path: str | Path, key: str) -> str:
    """`path:line` of a top-level key in a YAML file, or `path` when it is not found."""
    try:
        node = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return str(path)
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == key:
                return f"{path}:{k.start_mark.line + 1}"
    return str(path)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """raw[a][b][c] = value for `a.b.c`, creating sections on the way."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{source}: {'.'.join(parts[: i + 1])}: is not a section, cannot set {dotted}")
        node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], source: str) -> None:
    """`a.b.c=value` items (values in YAML syntax: `lr=3e-4`, `paths=[a,b]`) applied to `raw`."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        set_dotted(raw, key.strip(), value, source)
