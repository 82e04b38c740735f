"""A strict loader from YAML (or any plain data) into frozen dataclasses.

Unknown keys and values of the wrong type are errors that name the key path, e.g.
``stages[1].search.trials: expected int, got '3x' (str)``. Supported field types: ``int``, ``float``
(ints accepted), ``str``, ``bool``, ``None`` unions, ``Literal``, ``list[T]``, ``tuple[T, ...]``,
``dict[str, T]``, ``Any`` and nested dataclasses (given as mappings).
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ltc.errors import ConfigError, MissingFileError

T = TypeVar("T")


__all__ = ["ConfigError", "from_dict", "load_yaml"]


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors: list[tuple[Any, ConfigError]] = []
        for option in get_args(tp):
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append((option, err))
        # a mapping given for the one dataclass option (or a list for the one list option): its own error
        # says more than "expected X or Y"
        same_shape = [
            err
            for option, err in errors
            if (isinstance(value, dict) and (dataclasses.is_dataclass(option) or get_origin(option) is dict))
            or (isinstance(value, (list, tuple)) and get_origin(option) in (list, tuple))
        ]
        if len(same_shape) == 1:
            raise same_shape[0]
        raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(repr(a) for a in get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        kt, vt = get_args(tp) or (Any, Any)
        return {
            _convert(k, kt, f"{where}") if kt is not Any else k: _convert(v, vt, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: unsupported config type {tp!r}")
    raise ConfigError(f"{where}: expected {_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (see the module docstring)."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {data!r} ({type(data).__name__})")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{label}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{label}: missing key {name!r}")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a dataclass's own checks: say where it sits (the top level has no key)
        if not where:
            raise
        raise ConfigError(f"{where}: {err}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{label}: {err}") from err


def read_yaml(path: str | Path, *, what: str = "file") -> Any:
    """The data of YAML file ``path``; a missing file or a YAML syntax error names the file (and line)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (undecodable byte at {err.start}); a {what} is YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # PyYAML's message runs to several lines: the gist in one
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read ``path`` (YAML) into ``cls``; a YAML syntax error names the file and line."""
    data = read_yaml(path, what="sweep file")
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
