"""Config values checked against their dataclass fields: type, choice and range, before anything runs.

A field says what it accepts through its annotation: `int`, `float` (an int is accepted and widened),
`bool`, `str`, `Literal["a", "b"]` (a choice), `tuple[int, ...]` / `tuple[float, float]` (a YAML list),
`dict[str, X]`, `X | None` (null allowed), another config dataclass (a nested section), `Path`, or
`Annotated[X, Range(...)]` for a range (the aliases below name the common ones). `build` turns a plain dict
into the dataclass and raises `Invalid` naming the dotted key, what was expected and what was given;
`config.config_from_dict` adds the file. Two field markers travel in `dataclasses.field(metadata=...)`:
`runtime()` (the key changes speed or display, never the artifact: the resume guard skips it) and
`retired` choices (a value that once existed, refused with its own explanation).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

T = TypeVar("T")

RUNTIME = "lesionstack.runtime"  # field metadata: speed or display only, never compared on resume
RETIRED = "lesionstack.retired"  # field metadata: {value: why it is gone}


@dataclass(frozen=True)
class Range:
    """Bounds of a number: `ge`/`gt` below, `le`/`lt` above (each optional)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def ok(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
        return ""


def _num(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, lt=1)]  # strictly between 0 and 1
Probability = Annotated[float, Range(ge=0, le=1)]


def runtime(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field that changes how fast or how visibly a stage runs (workers, threads, progress bars, device),
    never what it makes: a finished or resumable artifact made with another value is still reused."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RUNTIME: True})


def retired(default: Any, **gone: str) -> Any:
    """A choice field with values that no longer exist: each is refused with its explanation."""
    return dataclasses.field(default=default, metadata={RETIRED: gone})


def runtime_keys(cls: type) -> tuple[str, ...]:
    """The dotted keys of `cls` (and its nested sections) marked `runtime()`."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get(RUNTIME):
            keys.append(f.name)
        section = section_class(hints[f.name])
        if section is not None:
            keys += [f"{f.name}.{k}" for k in runtime_keys(section)]
    return tuple(keys)


class ConfigError(ValueError):
    """A config file or value that does not fit its dataclass (exit code 3)."""


class Invalid(ConfigError):
    """A value that does not fit its field: `key` (dotted), what was `expected`, what was `got`. Raised by
    `build`, and by a dataclass's `__post_init__` for a rule across fields; `build` prefixes the section."""

    def __init__(self, key: str, expected: str, got: Any = None, text: str | None = None) -> None:
        self.key, self.expected, self.got, self.text = key, expected, got, text
        super().__init__(key, expected, got, text)

    def __str__(self) -> str:
        if self.text is not None:
            return f"{self.key}: {self.text}" if self.key else self.text
        sep = ";" if "one of" in self.expected else ","  # a list of choices has commas of its own
        return f"{self.key}: expected {self.expected}{sep} got {shown(self.got)}"

    def under(self, prefix: str) -> Invalid:
        key = f"{prefix}.{self.key}" if self.key and not self.key.startswith("[") else f"{prefix}{self.key}"
        return Invalid(key, self.expected, self.got, text=self.text)


def shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build(cls: type[T], data: Any) -> T:
    """The dataclass `cls` from a (partial, nested) mapping: unknown keys and ill-typed values are `Invalid`."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Invalid("", f"a mapping of {cls.__name__} keys", data)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise Invalid("", "", text=f"unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        try:
            kwargs[key] = check(value, hints[key], fields[key].metadata.get(RETIRED, {}))
        except Invalid as err:
            raise err.under(key) from None
    try:
        return cls(**kwargs)
    except Invalid:
        raise
    except (ValueError, TypeError) as err:  # a rule across fields, in the class's own words
        raise Invalid("", "", text=" ".join(str(err).split())) from err


def check_fields(obj: Any) -> None:
    """Check (and normalise: lists to tuples, ints to floats) every field of a config built in code; call it
    first in `__post_init__`. A loaded config was checked key by key already; this catches the same mistakes
    in a config a program builds or `dataclasses.replace`s."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            continue  # a nested section checked itself when it was built
        try:
            checked = check(value, hints[f.name], f.metadata.get(RETIRED, {}))
        except Invalid as err:
            raise err.under(f.name) from None
        if checked is not value:
            object.__setattr__(obj, f.name, checked)  # frozen configs too


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check(value: Any, hint: Any, gone: dict[str, str] | None = None) -> Any:
    """`value` as field type `hint` wants it (lists become tuples, ints floats), or `Invalid` (key "")."""
    hint, bounds = _strip_annotated(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, args, bounds, gone)
    if gone and isinstance(value, str) and value in gone:
        raise Invalid("", "", text=gone[value])
    if hint is Any or hint is object:
        return value
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise Invalid("", "one of " + ", ".join(map(str, args)), value)
    if dataclasses.is_dataclass(hint):
        return build(hint, value)
    if origin is tuple or hint is tuple:
        return _check_tuple(value, args)
    if origin is dict or hint is dict:
        return _check_dict(value, args)
    if origin is list:
        return list(_check_tuple(value, (args[0], ...) if args else ()))
    scalar = _check_scalar(value, hint, bounds)
    if bounds is not None and not bounds.ok(scalar):
        raise Invalid("", describe(hint, bounds), value)
    return scalar


def describe(hint: Any, bounds: Range | None = None) -> str:
    """What a field of type `hint` accepts, as the error message says it ("an integer >= 1")."""
    hint, inner = _strip_annotated(hint)
    bounds = bounds or inner
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [describe(a, bounds) for a in args if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} keys"
    if origin is tuple or hint is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0]) if args else 'items'}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    noun = _NOUNS.get(hint, getattr(hint, "__name__", str(hint)))
    return f"{noun} {bounds}" if bounds is not None and str(bounds) else noun


_NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings", Path: "paths"}


def _plural(hint: Any) -> str:
    base, bounds = _strip_annotated(hint)
    noun = _PLURALS.get(base, "items")
    return f"{noun} {bounds}" if bounds is not None else noun


def _strip_annotated(hint: Any) -> tuple[Any, Range | None]:
    if typing.get_origin(hint) is Annotated:
        ranges = [m for m in hint.__metadata__ if isinstance(m, Range)]
        return hint.__origin__, (ranges[0] if ranges else None)
    return hint, None


def _check_union(value: Any, args: tuple[Any, ...], bounds: Range | None, gone: dict[str, str] | None) -> Any:
    options = [a for a in args if a is not type(None)]
    if value is None:
        if type(None) in args:
            return None
        raise Invalid("", describe(typing.Union[tuple(args)], bounds), value)  # noqa: UP007
    if len(options) == 1:  # X | None: X's own error is the precise one
        return check(value, Annotated[options[0], bounds] if bounds else options[0], gone)
    for option in options:
        try:
            return check(value, Annotated[option, bounds] if bounds else option, gone)
        except Invalid:
            continue
    raise Invalid("", describe(typing.Union[tuple(args)], bounds), value)  # noqa: UP007


def _check_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise Invalid("", describe(tuple[args] if args else tuple), value)
    if len(args) == 2 and args[1] is Ellipsis:
        kinds = [args[0]] * len(value)
    elif args:
        if len(value) != len(args):
            raise Invalid("", describe(tuple[args]), list(value))
        kinds = list(args)
    else:
        kinds = [Any] * len(value)
    out = []
    for i, (item, kind) in enumerate(zip(value, kinds, strict=True)):
        try:
            out.append(check(item, kind))
        except Invalid as err:
            raise err.under(f"[{i}]") from None
    return tuple(out)


def _check_dict(value: Any, args: tuple[Any, ...]) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise Invalid("", "a mapping", value)
    key_type, value_type = args if args else (Any, Any)
    out = {}
    for k, v in value.items():
        try:
            out[check(k, key_type)] = check(v, value_type)
        except Invalid as err:
            raise err.under(str(k)) from None
    return out


def _check_scalar(value: Any, hint: Any, bounds: Range | None = None) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value  # an annotation this checker does not know: accepted as given
    raise Invalid("", describe(hint, bounds), value)


def section_class(hint: Any) -> type | None:
    """The dataclass of a section hint (`Section` or `Section | None`), else None."""
    hint, _ = _strip_annotated(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else None
    return hint if dataclasses.is_dataclass(hint) else None
