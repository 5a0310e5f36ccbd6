"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

Every component owns the dataclass of its options (``ModelConfig`` in ``model.py``, ``DataConfig`` in
``data.py`` ...). This module only knows how to build any such dataclass from nested dicts, check the types,
reject unknown keys with the closest valid key suggested, and apply ``a.b.c=value`` overrides.

Range checks live with the dataclasses: a dataclass may define ``validate(self)`` that raises
:class:`ConfigError`; :func:`from_dict` calls it after construction.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration problem. The message is one line naming the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for a one-line error that quotes it."""
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def import_module_from_cwd(name: str) -> Any:
    """``importlib.import_module(name)`` with the working directory on ``sys.path`` first, as under ``python -m``:
    a user's ``myopt.py`` or ``mymodel.py`` beside the command is importable from ``gnlm`` too (the console script
    does not put the working directory on the path). ImportError propagates."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float and str -> Path where harmless)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}; fix the value in the config"
        )
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} options, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            renamed = getattr(cls, "RENAMED", {}).get(key)
            if renamed is not None:
                raise ConfigError(f"config key '{full}' was renamed: write '{prefix + '.' if prefix else ''}{renamed}' "
                                  f"instead")
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else (
                f"valid keys: {', '.join(fields)}")
            raise ConfigError(f"unknown config key '{full}': {hint}")
        default = _field_default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A partial mapping refines the field's own default (e.g. gn.inner_optim keeps Muon when only lr is given).
            value = merge(to_dict(default), value)
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(_under_prefix(str(e), prefix, fields)) from None
    return obj


def _under_prefix(message: str, prefix: str, fields: dict[str, Any]) -> str:
    """A ``validate`` message placed under ``prefix``. A dataclass names its keys under its usual place (OptimConfig:
    ``optim.lr``); used elsewhere (``gn.inner_optim``) every such key is renamed, so the message names the key the
    user must set: ``gn.inner_optim.lr``, not ``gn.inner_optim.optim.lr``."""
    if not prefix or message.startswith(prefix):
        return message
    head = message.split(":", 1)[0].split(" ", 1)[0]  # e.g. "optim.lr"
    own, _, key = head.partition(".")
    if own and key and own not in fields and key.split(".")[0].split("[")[0] in fields:
        return re.sub(rf"(?<![\w.]){re.escape(own)}\.", f"{prefix}.", message)
    return f"{prefix}.{message}"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(obj: Any) -> Any:
    """A plain (YAML/JSON-safe) nested dict of a dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (nan, ±inf) replaced by None, recursively (dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` for every JSON file gnlm writes: non-finite floats become ``null`` (bare ``NaN``/``Infinity``
    are not JSON, and strict parsers reject them)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=3e-4", "train.steps=10"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value; write e.g. optim.lr=3e-4")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key; write e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"gn": {"damping": 0.1}}`` -> ``{"gn.damping": 0.1}`` (lists and other values are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict[str, Any], now: dict[str, Any], ignore: set[str] | frozenset[str] = frozenset(),
                       normalize: Callable[[str, Any], Any] | None = None) -> list[str]:
    """The dotted keys in which a config written earlier (``saved``: a run's config.yaml, a study's study.yaml)
    differs from ``now``, sorted: the one comparison behind every "is this the same run / the same study?".

    Both sides should be complete (every option, defaults included; bring an older file up to date first), so
    that a key on one side only is a real difference. Keys in ``ignore`` (or below one of them) are skipped;
    ``normalize(key, value)`` maps equivalent values to one (e.g. paths to absolute paths). Tuples and lists
    compare alike."""
    a, b = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(now)))

    def ignored(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in ignore)

    def norm(key: str, value: Any) -> Any:
        return normalize(key, value) if normalize is not None else value

    return sorted(k for k in set(a) | set(b) if not ignored(k) and norm(k, a.get(k)) != norm(k, b.get(k)))


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r} ({e.strerror}); make it readable") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file; give the path of a YAML file") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}; fix its syntax") from None
    if data is None:  # an empty file would silently stand for every default
        raise ConfigError(f"config file {str(path)!r} is empty; write its options in it")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of options at its top level")
    return data
