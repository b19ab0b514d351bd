"""Configs: defaults live in dataclasses; a YAML file overrides some of them; the resolved config is saved
beside every artifact it made, and compared before a finished artifact is reused.

* Loading checks every value against its field (type, choice, range: `config_check`) and names the file and
  the dotted key of the first bad one, before any stage starts.
* A YAML may name another as its `base:` (relative to itself); its keys override the base's, nested sections
  merge key by key, and a cycle is refused. A section typed as a config dataclass may also be given as the
  path of that section's own YAML (`cnn: ../cnn/demo.yaml` in a run config).
* A saved config carries `schema: SCHEMA`. A saved config without it is schema 1. A key missing from an
  older saved config ran with that release's default, listed in `OLD_DEFAULTS` when it differs from today's,
  so a dataclass default can become the recommended recipe without orphaning (or silently mismatching) old
  artifacts folders.
* Keys marked `runtime()` on their field (workers, threads, progress) are never compared on resume.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lesionstack.config_check import (  # noqa: F401  (re-exported: the field kinds configs declare)
    ConfigError,
    Fraction,
    Invalid,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Range,
    build,
    check_fields,
    retired,
    runtime,
    runtime_keys,
    section_class,
)
from lesionstack.files import write_text

T = TypeVar("T")

SCHEMA = 2
SCHEMA_KEY = "schema"
BASE_KEY = "base"
COMMAND_LINE = "command line"  # where keyword overrides of `load_config` come from

# What a saved config of an older schema meant by a missing key: per schema, per config class (a subclass
# inherits its bases' rows), the defaults of that release for the keys whose default changed after it.
# Schema 1 is every release before saved configs carried `schema`: CNNConfig's lr, neg_per_pos and
# untrained_segmenter were then values configs/cnn/default.yaml called wrong for real data, and a fold config
# from before the `keep` key kept its best epoch.
OLD_DEFAULTS: dict[int, dict[str, dict[str, Any]]] = {
    1: {
        "CNNConfig": {"lr": 1e-4, "neg_per_pos": 3.0, "untrained_segmenter": "allow", "keep": "best"},
    },
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; a config means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        try:
            return yaml.load(fh, Loader=_Loader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err


# ---- building a config from data -----------------------------------------------------------------------


def config_from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "config",
                     origins: dict[str, Origin] | None = None) -> T:
    """Build dataclass `cls` from a (possibly partial, possibly nested) dict, checking every value; a bad
    one raises one `ConfigError` line: `where` (the file, or the file a key came from in `origins`), the
    dotted key, what was expected and what was given."""
    try:
        return build(cls, data)
    except Invalid as err:
        file, section = _origin(err.key, origins or {}, where)
        key = err.key[len(section):] if section and err.key.startswith(section) else err.key
        if file == COMMAND_LINE and "." not in key:  # an override is a command's option
            key = "--" + key.replace("_", "-")
        raise ConfigError(f"{file}: {Invalid(key, err.expected, err.got, text=err.text)}") from None


class Origin(typing.NamedTuple):
    """Where a key was set: the file, and the section that file holds (`cnn.` for a run config's
    `cnn: ../cnn/demo.yaml`; empty for a file of the whole config), so a message names the key as it is
    written in that file."""

    file: str
    section: str = ""


def _origin(key: str, origins: dict[str, Origin], where: str) -> Origin:
    """The file that set `key` (or the closest section above it), else `where`."""
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for n in range(len(parts), 0, -1):
        if (found := origins.get(".".join(parts[:n]))) is not None:
            return found
    return Origin(where)


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, **overrides: Any) -> T:
    """Defaults from `cls`, then the YAML file at `path` (if any, with its `base:` chain), then keyword
    overrides (None: not given)."""
    data: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    if path is not None:
        data, origins = read_config_tree(path, cls)
        data = migrate(data, cls, str(path))
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    origins.update({k: Origin(COMMAND_LINE) for k in given})
    return config_from_dict(cls, data, where=str(path or cls.__name__), origins=origins)


def read_config_tree(path: str | os.PathLike[str], cls: type | None = None,
                     _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Origin]]:
    """The YAML at `path` merged over its `base:` chain, with sections given as file paths read in; and,
    for every key, the file that set it (dotted key -> path as the user would write it)."""
    resolved = Path(path).resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"{path}: base: files include each other ({cycle})")
    loaded = read_yaml(path) if Path(path).is_file() else _missing(path, _chain)
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    data, origins = {}, {}
    base = loaded.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: {BASE_KEY}: expected the path of a YAML file, got {base!r}")
        data, origins = read_config_tree(_beside(path, base), cls, (*_chain, resolved))
    own = _leaf_origins(loaded, str(path))
    if cls is not None:  # a section given as a file: its keys were set in that file
        loaded = _read_section_files(loaded, cls, path, own)
    return _merge(data, loaded), {**origins, **own}


def _missing(path: str | os.PathLike[str], chain: tuple[Path, ...]) -> Any:
    if chain:
        raise ConfigError(f"{chain[-1]}: {BASE_KEY}: no such file {path}")
    raise FileNotFoundError(f"{path}: no such config file")


def _beside(path: str | os.PathLike[str], other: str) -> str:
    """`other` relative to the folder of `path`, as a tidy path (configs/run/../cnn/x.yaml -> configs/cnn/x.yaml)."""
    return os.path.normpath(Path(path).parent / other) if not os.path.isabs(other) else other


def _read_section_files(loaded: dict[str, Any], cls: type, path: str | os.PathLike[str],
                        origins: dict[str, Origin]) -> dict[str, Any]:
    """Sections of `cls` given as a file path: that file's data (relative to `path`'s folder, else the working
    directory), its keys' origins recorded under the section's name."""
    if not dataclasses.is_dataclass(cls):
        return loaded
    hints = typing.get_type_hints(cls)
    out = dict(loaded)
    for key, value in loaded.items():
        section = section_class(hints[key]) if key in hints else None
        if section is None or not isinstance(value, str):
            continue
        candidates = [_beside(path, value), value]
        found = next((c for c in candidates if Path(c).is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: {key}: no such config file {value!r} (looked in "
                              f"{Path(path).resolve().parent} and {Path.cwd()})")
        sub, sub_origins = read_config_tree(found, section)
        out[key] = migrate(sub, section, found)
        origins.update({f"{key}.{k}": Origin(o.file, f"{key}.{o.section}") for k, o in sub_origins.items()})
        origins[key] = Origin(str(found), f"{key}.")
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_origins(data: dict[str, Any], where: str, prefix: str = "") -> dict[str, Origin]:
    out: dict[str, Origin] = {}
    for key, value in data.items():
        out.setdefault(f"{prefix}{key}", Origin(where))
        if isinstance(value, dict):
            out.update(_leaf_origins(value, where, f"{prefix}{key}."))
    return out


# ---- schema and migrations ------------------------------------------------------------------------------


def migrate(data: dict[str, Any], cls: type, where: str, *, default_schema: int = SCHEMA) -> dict[str, Any]:
    """`data` (a config file's keys) with its `schema` key resolved: a newer schema is refused; an older one
    gets, for each key it lacks whose default has changed since, the default of its own release.
    `default_schema`: the schema of a file without the key (a user's YAML: today's; a saved config: 1)."""
    data = dict(data)
    schema = data.pop(SCHEMA_KEY, default_schema)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ConfigError(f"{where}: {SCHEMA_KEY}: expected an integer >= 1, got {schema!r}")
    if schema > SCHEMA:
        raise ConfigError(f"{where}: {SCHEMA_KEY}: {schema} was written by a newer lesionstack (this one reads "
                          f"schemas 1 to {SCHEMA}); upgrade lesionstack, or use a new output folder")
    for version in range(schema, SCHEMA):
        for key, value in old_defaults(cls, version).items():
            _set_missing(data, key, value)
    return data


def old_defaults(cls: type, schema: int) -> dict[str, Any]:
    """The defaults of schema `schema` that changed later, for `cls` and its bases (dotted keys)."""
    table = OLD_DEFAULTS.get(schema, {})
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        out.update(table.get(klass.__name__, {}))
    return out


def _set_missing(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = data
    for name in sections:
        if not isinstance(node.get(name), dict):
            return  # the section itself is absent or null: nothing to fill
        node = node[name]
    node.setdefault(leaf, value)


# ---- saving and comparing -------------------------------------------------------------------------------


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
    """Write the resolved config as YAML, atomically, with the schema it follows."""
    return write_text(path, yaml.safe_dump({SCHEMA_KEY: SCHEMA, **config_to_dict(cfg)}, sort_keys=False))


def read_config_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved config's keys as written (its `schema` key aside)."""
    data = read_yaml(path) or {}
    data.pop(SCHEMA_KEY, None)
    return data


def read_saved_config(path: str | os.PathLike[str], cls: type) -> dict[str, Any]:
    """A saved config of class `cls` as today's keys: an older schema's missing keys filled with the defaults
    of its release (`migrate`); a file without `schema` is schema 1."""
    return migrate(read_yaml(path) or {}, cls, str(path), default_schema=1)


def ensure_same_config(cfg: Any, saved: str | os.PathLike[str], *, ignore: tuple[str, ...] = (),
                       error: type[ConfigError] = ConfigError) -> None:
    """Refuse (raise `error`) to reuse or overwrite an artifact that a different config made.

    Keys marked `runtime()` on their field are never compared; `ignore` names more (top-level or dotted,
    e.g. `model.segmenter_weights`, a path kept as provenance: an artifacts folder may move).
    """
    skipped = set(ignore) | set(runtime_keys(type(cfg)))

    def kept(key: str) -> bool:
        return key not in skipped and key.split(".")[0] not in skipped

    now = {k: v for k, v in _flat(config_to_dict(cfg)).items() if kept(k)}
    before = {k: v for k, v in _flat(read_saved_config(saved, type(cfg))).items() if kept(k)}
    # a key the saved config still lacks is one its release did not have: it ran with today's default
    # (a new field defaults to the old behaviour), so adding a field does not orphan old runs
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
