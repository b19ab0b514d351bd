"""Configs: defaults live in dataclasses; a YAML file overrides some of them; the resolved config is saved
beside every artifact it made, and compared before a finished artifact is reused.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lesionstack.files import write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value that does not fit its dataclass."""


def config_from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly partial, possibly nested) dict; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = _optional_of(hints[key])
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value, where=f"{where}.{key}")
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _optional_of(hint: Any) -> Any:
    """`X` for a hint `X | None` (an optional section such as `aux_diagnosis: null`), else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, **overrides: Any) -> T:
    """Defaults from `cls`, then the YAML file at `path` (if any), then keyword overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(cls, data, where=str(path or cls.__name__))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a (nested) dataclass: tuples become lists, Paths strings."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def read_config_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def ensure_same_config(cfg: Any, saved: str | os.PathLike[str], *, ignore: tuple[str, ...] = (),
                       error: type[ConfigError] = ConfigError) -> None:
    """Refuse (raise `error`) to reuse or overwrite an artifact that a different config made.

    `ignore` names keys that do not change the artifact: top-level ones (a progress-bar switch) or dotted
    ones (`model.segmenter_weights`, a path kept as provenance: an artifacts folder may move).
    """
    def kept(key: str) -> bool:
        return key not in ignore and key.split(".")[0] not in ignore

    now = {k: v for k, v in _flat(config_to_dict(cfg)).items() if kept(k)}
    before = {k: v for k, v in _flat(read_config_dict(saved)).items() if kept(k)}
    # a key the saved config lacks comes from an older release: it ran with the field's default (new fields
    # default to the old behaviour), so adding a field does not orphan old runs
    defaults = _flat(config_to_dict(type(cfg)()))
    before = {**{k: defaults.get(k) for k in now if k not in before}, **before}
    diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if diff:
        details = ", ".join(f"{k}: saved={before.get(k)!r} now={now.get(k)!r}" for k in diff)
        raise error(
            f"{saved} was made with a different config ({details}). Use a new output folder, or delete "
            "that folder to retrain it on purpose."
        )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys ({"model": {"gate": "x"}} -> {"model.gate": "x"})."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
