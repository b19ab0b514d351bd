from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lesionstack.config import ConfigError, ensure_same_config, load_config, save_config
from lesionstack.run_config import load_run_config

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
    text = saved.read_text().replace("note: null\n", "").replace("lr: 0.1\n", "")  # an older release's run
    saved.write_text(text)
    ensure_same_config(Outer(), saved)  # a missing key ran with the field's default
    with pytest.raises(ConfigError, match=r"lr: saved=0.1 now=0.2"):
        ensure_same_config(Outer(lr=0.2), saved)
    with pytest.raises(ConfigError, match=r"inner.size: saved=64 now=32"):  # nested keys are named in full
        ensure_same_config(Outer(inner=Inner(size=32)), saved)


def test_new_nested_optional_key_does_not_orphan_old_runs(tmp_path):
    @dataclass
    class InnerV2(Inner):
        widths: tuple[int, ...] | None = None  # a field added in a later release

    @dataclass
    class OuterV2(Outer):
        inner: InnerV2 = field(default_factory=InnerV2)

    saved = save_config(Outer(), tmp_path / "config.yaml")  # written by the older release
    ensure_same_config(OuterV2(), saved)
    with pytest.raises(ConfigError, match=r"inner.widths: saved=None now=\[8, 4\]"):  # the default then
        ensure_same_config(OuterV2(inner=InnerV2(widths=(8, 4))), saved)


def test_shipped_run_configs_load():
    demo = load_run_config(CONFIGS / "run" / "demo.yaml")
    assert demo.cnn.model.segmenter_encoder == demo.segmenter.encoder
    real = load_run_config(CONFIGS / "run" / "isic2024.yaml")
    assert real.cnn.model.segmenter_encoder == real.segmenter.encoder and real.tune.enabled
