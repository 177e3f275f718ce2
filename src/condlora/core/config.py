"""Config loading for any config dataclass: YAML files that override its defaults.

A YAML config holds only what differs from the dataclass defaults. Keys are checked
against the dataclasses, so a misspelled key fails with the list of valid keys
instead of being silently ignored. Command-line overrides use dotted paths:
``train.lr=1e-3 lora.rank=8``. A file may name a ``base:`` file (relative to it)
that it overrides.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import json
import math
import sysconfig
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

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


@dataclasses.dataclass(frozen=True)
class Range:
    """A finite number in [low, high]; an open end excludes its bound; None: no bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        """None if `value` is in range, else the valid range in words."""
        lo, hi = self.low, self.high
        ok = isinstance(value, int | float) and math.isfinite(value)
        ok = ok and (lo is None or value > lo or (value == lo and not self.low_open))
        ok = ok and (hi is None or value < hi or (value == hi and not self.high_open))
        return None if ok else f"must be {self}"

    def __str__(self) -> str:
        lo, hi = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{lo}, {hi}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {lo}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {hi}"
        return "a finite number"


def _number(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    options: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        """None if `value` is one of the options, else the options."""
        return None if value in self.options else f"valid: {', '.join(map(str, self.options))}"


@dataclasses.dataclass(frozen=True)
class Each:
    """A list whose every item passes `item` (and that is non-empty unless allow_empty)."""

    item: Range | None = None  # None: any item
    allow_empty: bool = False

    def problem(self, value: Any) -> str | None:
        """None if the list is fine, else what is wrong with it."""
        if not isinstance(value, list | tuple) or (not value and not self.allow_empty):
            return "must be a non-empty list"
        if self.item is None:
            return None
        bad = [v for v in value if self.item.problem(v) is not None]
        return f"must be a list of numbers {self.item}" if bad else None


# Common ranges of config fields.
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)  # a probability or decay in [0, 1]
SEED = Range(0, 2**63 - 1)  # what torch.manual_seed takes


def check_fields(cfg: Any, where: str = "", error: type[Exception] = ConfigError) -> None:
    """Check one config dataclass's own fields against its class's CHECKS table.

    CHECKS maps a field name to a Range, OneOf or Each; a None value is not checked (fields
    typed `X | None` use None for "the default"). `error` names the dotted key, the valid
    range and the value, in one line. Nested configs check themselves (`Checked`).
    """
    table = getattr(type(cfg), "CHECKS", {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        rule = table.get(f.name)
        problem = None if rule is None or value is None else rule.problem(value)
        if problem is None:
            continue
        path = f"{where}.{f.name}" if where else f.name
        if isinstance(rule, OneOf):
            raise error(f"unknown {path} {value!r}; {problem}")
        raise error(f"{path} {problem}, got {value!r}")


# The dotted key of the config being built by `from_dict` ("" at the top), so that a nested
# config's errors name the key the user wrote; None outside from_dict (named by class).
_BUILDING_AT: contextvars.ContextVar[str | None] = contextvars.ContextVar("where", default=None)


@contextlib.contextmanager
def _building_at(where: str) -> Iterator[None]:
    token = _BUILDING_AT.set(where)
    try:
        yield
    finally:
        _BUILDING_AT.reset(token)


class Checked:
    """Base of every config dataclass: it checks itself when built (and on replace).

    Field rules go in the class's CHECKS table (Range, OneOf, Each); rules across fields in
    `check(key)`, which raises ERROR with `key(name)`, the field's dotted key as the user
    wrote it ("train.lr" from a file, "TrainConfig.lr" in code).
    """

    CHECKS: ClassVar[dict] = {}
    ERROR: ClassVar[type[Exception]] = ConfigError

    def __post_init__(self) -> None:
        where = _BUILDING_AT.get()
        where = type(self).__name__ if where is None else where
        check_fields(self, where, self.ERROR)

        def key(name: str) -> str:
            return f"{where}.{name}" if where else name

        self.check(key)

    def check(self, key: Callable[[str], str]) -> None:
        """Rules across fields (none here); raise ERROR naming fields by key(name)."""


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and values out of range."""
    return _build(cls, data, where)


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
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
            kwargs[key] = _build(hint, {} if value is None else value, path)
        else:
            kwargs[key] = _check_value(value, hint, path)
    with _building_at(where):
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
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': '{key}' is not a dotted key (e.g. train.lr)")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier '{part}=...'")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({yaml_problem(err)})"
            ) from None
    return nested


def yaml_problem(err: Exception) -> str:
    """What a YAML parser error says, and where, on one line."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or ' '.join(str(err).split())}{where}"


def read_text_file(path: str | Path, kind: str, error: type[Exception] = ConfigError) -> str:
    """The text of a (small) file; `error` if it is missing, a folder, unreadable or not text."""
    path = Path(path)
    if not path.exists():
        raise error(f"{kind} not found: {path}")
    if not path.is_file():
        raise error(f"{kind} {path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{kind} {path} is not a text file") from None
    except OSError as err:
        raise error(f"cannot read {kind} {path}: {err.strerror or err}") from None
    if "\0" in text:
        raise error(f"{kind} {path} is not a text file")
    return text


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a dict, with its `base:` file (relative to it) merged underneath."""
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(read_text_file(path, "config file")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {data!r}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / str(base), (*seen, path.resolve())), data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a plain dict, its `base:` chain merged (no schema check)."""
    return _read_yaml(Path(path))


def read_config(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Dataclass `cls` from a YAML file (on its `base:` file and the defaults; None: the
    defaults alone) and key=value overrides."""
    base = {} if path is None else _read_yaml(Path(path))
    data = _merge(base, parse_overrides(overrides or []))
    return from_dict(cls, data)


def config_from_json(cls: type, text: str) -> Any:
    """Rebuild a config of class `cls` stored as JSON (checkpoint metadata)."""
    return from_dict(cls, json.loads(text))
