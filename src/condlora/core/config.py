"""Config loading for any config dataclass: YAML files that override its defaults.

A YAML config holds only what differs from the dataclass defaults. Keys are checked
against the dataclasses, so a misspelled key fails with the list of valid keys
instead of being silently ignored. Command-line overrides use dotted paths:
``train.lr=1e-3 lora.rank=8``. A file may name a ``base:`` file (relative to it)
that it overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sysconfig
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from condlora.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout (src/condlora/core/..)


def config_dirs(first: tuple[Path, ...] = ()) -> list[Path]:
    """Where configs are looked up: `first`, the cwd, the checkout and an install's data files."""
    installed = Path(sysconfig.get_path("data")) / "share" / "condlora" / "configs"
    return [*first, Path.cwd(), Path.cwd() / "configs", REPO_ROOT, REPO_ROOT / "configs", installed]


def find_config(name: str | Path, first: tuple[Path, ...] = ()) -> Path:
    """A config file by (relative) name: in `first`, then the cwd, the checkout, an install."""
    for folder in config_dirs(first):
        if (folder / name).is_file():
            return (folder / name).resolve()
    raise ConfigError(
        f"config '{name}' not found (looked in {', '.join(map(str, config_dirs(first)))}); "
        "run from the repository root or give its path"
    )


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a float", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _check_union(value: Any, options: tuple, where: str) -> Any:
    """The value checked against the first option of a union that accepts it."""
    if value is None and type(None) in options:
        return None
    inner = [o for o in options if o is not type(None)]
    if len(inner) == 1:
        return _check_value(value, inner[0], where)
    for option in inner:
        try:
            return _check_value(value, option, where)
        except ConfigError:
            continue
    names = " or ".join(_type_name(o) for o in inner)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Check (and lightly coerce) one value against its type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, typing.get_args(hint), where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a float, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in valid:
            raise ConfigError(
                f"unknown config key '{path}'{_suggest(str(key), valid)}; "
                f"valid keys{' in ' + repr(where) if where else ''}: {', '.join(valid)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, path)
        else:
            kwargs[key] = _check_value(value, hint, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML / JSON ready)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-3", ...]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. train.lr=1e-3)"
            )
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, with its `base:` file (relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {data!r}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a plain dict, its `base:` chain merged (no schema check)."""
    return _read_yaml(Path(path))


def read_config(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Dataclass `cls` from a YAML file (on its `base:` file and the defaults) and overrides."""
    data = _merge(_read_yaml(Path(path)), parse_overrides(overrides or []))
    return from_dict(cls, data)


def config_from_json(cls: type, text: str) -> Any:
    """Rebuild a config of class `cls` stored as JSON (checkpoint metadata)."""
    return from_dict(cls, json.loads(text))
