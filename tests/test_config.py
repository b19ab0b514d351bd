from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lesionstack.config import ConfigError, ensure_same_config, load_config, save_config
from lesionstack.pipeline import load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Inner:
    size: int = 64
    names: tuple[str, ...] = ("a",)


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    lr: float = 0.1
    note: str | None = None


def test_yaml_overrides_defaults_and_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {size: 32, names: [x, y]}\nlr: 0.5\n")
    cfg = load_config(Outer, path, note="hi")
    assert cfg == Outer(inner=Inner(size=32, names=("x", "y")), lr=0.5, note="hi")


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {sise: 32}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.inner: unknown key\(s\) \['sise'\]"):
        load_config(Outer, path)


def test_saved_config_is_compared_key_by_key(tmp_path):
    saved = save_config(Outer(), tmp_path / "config.yaml")
    ensure_same_config(Outer(), saved)
    with pytest.raises(ConfigError, match=r"lr: saved=0.1 now=0.2"):
        ensure_same_config(Outer(lr=0.2), saved)
    text = saved.read_text().replace("note: null\n", "")  # an older run without the optional key
    saved.write_text(text)
    ensure_same_config(Outer(), saved)


def test_shipped_run_configs_load():
    demo = load_run_config(CONFIGS / "run" / "demo.yaml")
    assert demo.cnn.model.segmenter_encoder == demo.segmenter.encoder
    real = load_run_config(CONFIGS / "run" / "isic2024.yaml")
    assert real.cnn.model.segmenter_encoder == real.segmenter.encoder and real.tune.enabled
