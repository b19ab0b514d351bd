"""Every stage keeps one contract: `*_stage(data paths, artifacts paths, config, *, runtime knobs) -> frozen result`.

The test walks every module of the package, so a stage added anywhere with another shape fails here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable

import pytest

import lesionstack
from lesionstack import paths
from lesionstack.paths import ArtifactPaths

# keyword-only arguments a stage may take: they change how a stage runs, never what it reads or makes
RUNTIME_KNOBS = frozenset({"progress", "folds_only", "force", "rerun"})
# the stages that exist today: the walk must find at least these (so it cannot pass by finding nothing)
KNOWN = {"folds_stage", "segmenter_stage", "cnn_stage", "diagnosis_stage", "features_stage", "tune_stage",
         "stack_stage", "distill_stage", "phone_stage", "export_stage"}


def stages() -> dict[str, Callable[..., object]]:
    """Every public `*_stage` function defined in a module of the package, by `module.name`."""
    found: dict[str, Callable[..., object]] = {}
    for info in pkgutil.walk_packages(lesionstack.__path__, "lesionstack."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (name.endswith("_stage") and not name.startswith("_") and inspect.isfunction(obj)
                    and obj.__module__ == module.__name__):
                found[f"{module.__name__}.{name}"] = obj
    return found


def is_frozen_dataclass(cls: object) -> bool:
    return inspect.isclass(cls) and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def data_path_types() -> set[type]:
    """The data-paths types: the frozen `*Paths` classes of `lesionstack.paths`, the artifacts root's aside."""
    return {cls for name, cls in vars(paths).items()
            if name.endswith("Paths") and is_frozen_dataclass(cls) and cls is not ArtifactPaths}


def contract_problems(func: Callable[..., object]) -> list[str]:
    """What in `func`'s signature breaks the stage contract (empty when it keeps it)."""
    hints = typing.get_type_hints(func)
    params = list(inspect.signature(func).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out = []
    if len(positional) != 3:
        return [f"takes {len(positional)} positional parameters ({[p.name for p in positional]}), not 3: "
                "(data paths, artifacts paths, config)"]
    data, art, cfg = (hints.get(p.name) for p in positional)
    if data not in data_path_types():
        out.append(f"first parameter is {data}, not a data-paths type of lesionstack.paths "
                   f"({sorted(t.__name__ for t in data_path_types())})")
    if art is not ArtifactPaths:
        out.append(f"second parameter is {art}, not ArtifactPaths")
    if not (inspect.isclass(cfg) and dataclasses.is_dataclass(cfg)):
        out.append(f"third parameter is {cfg}, not one config dataclass")
    if any(p.default is not p.empty for p in positional):
        out.append("a positional parameter has a default: the three are always given")
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            out.append(f"takes *{p.name}")
        elif p.kind == p.KEYWORD_ONLY and p.name not in RUNTIME_KNOBS:
            out.append(f"keyword-only {p.name!r} is not a runtime knob ({sorted(RUNTIME_KNOBS)})")
        elif p.kind == p.KEYWORD_ONLY and p.default is p.empty:
            out.append(f"keyword-only {p.name!r} has no default")
    if not is_frozen_dataclass(hints.get("return")):
        out.append(f"returns {hints.get('return')}, not a frozen dataclass")
    return out


def test_the_walk_finds_every_known_stage() -> None:
    names = {qual.rsplit(".", 1)[1] for qual in stages()}
    assert KNOWN <= names, f"stages not found: {sorted(KNOWN - names)}"


@pytest.mark.parametrize("qualname", sorted(stages()))
def test_every_stage_keeps_the_contract(qualname: str) -> None:
    assert contract_problems(stages()[qualname]) == []


@dataclasses.dataclass
class Loose:
    value: int


def test_a_stage_off_the_contract_is_named() -> None:
    def art_first_stage(art: ArtifactPaths, cfg: Loose) -> Loose:  # stack_stage's old shape
        return cfg

    def knob_stage(data: paths.MaskPaths, art: ArtifactPaths, cfg: Loose, *, name: str = "x") -> Loose:
        return cfg

    def swapped_stage(art: ArtifactPaths, data: paths.DataPaths, cfg: int) -> Loose:
        return Loose(cfg)

    assert contract_problems(art_first_stage) == [
        "takes 2 positional parameters (['art', 'cfg']), not 3: (data paths, artifacts paths, config)"]
    assert contract_problems(knob_stage) == [
        "keyword-only 'name' is not a runtime knob (['folds_only', 'force', 'progress', 'rerun'])",
        f"returns {Loose}, not a frozen dataclass"]
    assert contract_problems(swapped_stage)[:3] == [
        f"first parameter is {ArtifactPaths}, not a data-paths type of lesionstack.paths "
        "(['DataPaths', 'MaskPaths', 'TablePaths'])",
        f"second parameter is {paths.DataPaths}, not ArtifactPaths",
        f"third parameter is {int}, not one config dataclass"]
