"""Config values are checked on load, by type, choice and range: one ConfigError line naming the file, the
dotted key, what was expected and what was given. Table-driven over every kind of field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from lesionstack.config import (
    ConfigError,
    Fraction,
    Invalid,
    PositiveFloat,
    PositiveInt,
    Probability,
    load_config,
    retired,
)


@dataclass
class Section:
    size: PositiveInt = 4
    names: tuple[str, ...] = ("a",)


@dataclass
class Every:
    """One field of each kind a config declares."""

    count: int = 1
    epochs: PositiveInt = 10
    lr: PositiveFloat = 0.1
    share: Fraction = 0.5
    p: Probability = 0.5
    flag: bool = True
    name: str = "x"
    gate: Literal["none", "train", "freeze"] = "train"
    keep: Literal["last", "best_inner"] = retired("last", best="best is gone; use keep: last")
    seeds: tuple[int, ...] = (0, 1)
    pair: tuple[float, float] = (0.5, 1.0)
    maybe: PositiveInt | None = None
    path: Path = Path("weights")
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    section: Section = field(default_factory=Section)
    optional_section: Section | None = None


GOOD = [  # (key, YAML value, the value loaded)
    ("count", "-3", -3),
    ("epochs", "5", 5),
    ("epochs", "5.0", 5),
    ("lr", "3", 3.0),
    ("lr", "1e-4", 1e-4),  # YAML 1.1 would read a string
    ("share", "0.2", 0.2),
    ("p", "1", 1.0),
    ("p", "0", 0.0),
    ("flag", "false", False),
    ("name", "resnet18", "resnet18"),
    ("gate", "freeze", "freeze"),
    ("seeds", "[3, 4, 5]", (3, 4, 5)),
    ("seeds", "[]", ()),
    ("pair", "[1, 2]", (1.0, 2.0)),
    ("maybe", "null", None),
    ("maybe", "7", 7),
    ("path", "w/x.safetensors", Path("w/x.safetensors")),
    ("params", "{lgbm: {max_bin: 63}}", {"lgbm": {"max_bin": 63}}),
    ("section", "{size: 2}", Section(size=2)),
    ("optional_section", "{names: [b]}", Section(names=("b",))),
    ("optional_section", "null", None),
]

BAD = [  # (key, YAML value, the message after "FILE: ")
    ("count", "many", "count: expected an integer, got 'many'"),
    ("count", "true", "count: expected an integer, got True"),
    ("count", "1.5", "count: expected an integer, got 1.5"),
    ("epochs", "many", "epochs: expected an integer >= 1, got 'many'"),
    ("epochs", "0", "epochs: expected an integer >= 1, got 0"),
    ("lr", "fast", "lr: expected a number > 0, got 'fast'"),
    ("lr", "0", "lr: expected a number > 0, got 0"),
    ("lr", "-1e-3", "lr: expected a number > 0, got -0.001"),
    ("share", "1", "share: expected a number in (0, 1), got 1"),
    ("p", "1.5", "p: expected a number in [0, 1], got 1.5"),
    ("flag", "maybe", "flag: expected true or false, got 'maybe'"),
    ("flag", "1", "flag: expected true or false, got 1"),
    ("name", "3", "name: expected a string, got 3"),
    ("name", "null", "name: expected a string, got null"),
    ("gate", "frozen", "gate: expected one of none, train, freeze; got 'frozen'"),
    ("keep", "best", "keep: best is gone; use keep: last"),
    ("keep", "worst", "keep: expected one of last, best_inner; got 'worst'"),
    ("seeds", "3", "seeds: expected a list of integers, got 3"),
    ("seeds", "[0, x]", "seeds[1]: expected an integer, got 'x'"),
    ("pair", "[1, 2, 3]", "pair: expected a list of 2 numbers, got [1, 2, 3]"),
    ("pair", "[1, x]", "pair[1]: expected a number, got 'x'"),
    ("maybe", "0", "maybe: expected an integer >= 1, got 0"),
    ("maybe", "x", "maybe: expected an integer >= 1, got 'x'"),
    ("path", "3", "path: expected a path, got 3"),
    ("params", "[1]", "params: expected a mapping, got [1]"),
    ("params", "{lgbm: 3}", "params.lgbm: expected a mapping, got 3"),
    ("section", "3", "section: expected a mapping of Section keys, got 3"),
    ("section", "{size: 0}", "section.size: expected an integer >= 1, got 0"),
    ("section", "{sise: 2}", "section: unknown key(s) ['sise']; known: ['names', 'size']"),
    ("optional_section", "{size: big}", "optional_section.size: expected an integer >= 1, got 'big'"),
    ("section", "{names: [a, 2]}", "section.names[1]: expected a string, got 2"),
]


@pytest.mark.parametrize(("key", "text", "value"), GOOD, ids=[f"{k}={t}" for k, t, _ in GOOD])
def test_good_values_load(tmp_path, key, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {text}\n")
    loaded = getattr(load_config(Every, path), key)
    assert loaded == value and type(loaded) is type(value)


@pytest.mark.parametrize(("key", "text", "message"), BAD, ids=[f"{k}={t}" for k, t, _ in BAD])
def test_bad_values_are_one_line_naming_file_key_expected_and_given(tmp_path, key, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Every, path)
    assert str(err.value) == f"{path}: {message}"
    assert "\n" not in str(err.value)


def test_overrides_are_checked_and_named_as_such():
    with pytest.raises(ConfigError, match=r"^command line: --epochs: expected an integer >= 1, got 0$"):
        load_config(Every, None, epochs=0)


@dataclass
class Bounds:
    low: int = 0
    high: int = 1

    def __post_init__(self) -> None:
        if self.high <= self.low:
            raise Invalid("high", f"an integer > low ({self.low})", self.high)


@dataclass
class Outer:
    inner: Bounds = field(default_factory=Bounds)


def test_a_rule_across_fields_is_named_by_its_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {low: 5, high: 2}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: inner.high: expected an integer > low \(5\), got 2$"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match=r"^high: expected"):  # built in code: the same error, no file
        Bounds(low=5, high=2)


def test_not_a_mapping_and_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: expected a mapping at the top level, got list"):
        load_config(Every, path)
    path.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML"):
        load_config(Every, path)


def test_a_run_config_names_the_stage_file_and_the_key_as_written_there(tmp_path):
    """A stage given as a file path is named with its key as written in that file; an inline section with
    the run config's dotted key. The whole run config is checked at load, before any stage runs."""
    from lesionstack.run_config import load_run_config

    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "bad.yaml").write_text("model: {gate: frozen}\n")
    run = tmp_path / "run.yaml"
    run.write_text("cnn: cnn/bad.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(run)
    bad = tmp_path / "cnn" / "bad.yaml"
    assert str(err.value) == f"{bad}: model.gate: expected one of train, freeze, none; got 'frozen'"
    run.write_text("stack: {n_rounds: 10}\ncnn: {epochs: many}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(run)
    assert str(err.value) == f"{run}: cnn.epochs: expected an integer >= 1, got 'many'"
    run.write_text("diagnosis: {balance: even}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: diagnosis.balance: expected one of weights, sampler, none"):
        load_run_config(run)
    run.write_text("segmenter: {encoder: resnet34}\n")  # a rule across stages, checked at load too
    with pytest.raises(ConfigError, match=r"run.yaml: segmenter.encoder: expected the CNN's "
                                          r"model.segmenter_encoder \(resnet18\).*got 'resnet34'$"):
        load_run_config(run)


def test_an_unknown_timm_model_is_named_with_close_names(tmp_path):
    from lesionstack.train.cnn_config import load_cnn_config

    path = tmp_path / "cnn.yaml"
    path.write_text("model: {classifier: resnet181, gate: none}\n")
    with pytest.raises(ConfigError, match=r"cnn.yaml: model.classifier: expected a timm model name, got 'resnet181' "
                                          r"\(close: resnet18, "):
        load_cnn_config(path)
