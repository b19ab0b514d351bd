from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lesionstack.config import (
    OLD_DEFAULTS,
    SCHEMA,
    ConfigError,
    _flat,
    config_to_dict,
    ensure_same_config,
    load_config,
    runtime_keys,
    save_config,
)
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
    with pytest.raises(ConfigError, match=r"c.yaml: inner: unknown key\(s\) \['sise'\]"):
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


# ---- base: inheritance ------------------------------------------------------------------------------------


def test_base_chain_merges_nested_sections_and_names_the_file_of_a_bad_key(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("inner: {size: 32, names: [x]}\nlr: 0.5\n")
    (tmp_path / "mid.yaml").write_text("base: shared/base.yaml\ninner: {names: [y, z]}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\nlr: 0.25\n")
    cfg = load_config(Outer, tmp_path / "top.yaml")
    assert cfg == Outer(inner=Inner(size=32, names=("y", "z")), lr=0.25)  # the section merged key by key
    (tmp_path / "shared" / "base.yaml").write_text("inner: {size: big}\n")
    with pytest.raises(ConfigError, match=r"shared/base.yaml: inner.size: expected an integer, got 'big'$"):
        load_config(Outer, tmp_path / "top.yaml")


def test_base_cycles_and_missing_bases_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base: files include each other"):
        load_config(Outer, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base: no such file .*nowhere.yaml"):
        load_config(Outer, tmp_path / "c.yaml")


def test_shipped_distill_overlays_resolve_to_their_documented_differences():
    """The demo students are configs/distill/demo.yaml plus a few keys each (the values the seven files held
    in full before they became overlays)."""
    from lesionstack.train.distill_config import load_distill_config

    base = config_to_dict(load_distill_config(CONFIGS / "distill" / "demo.yaml"))
    expected_overlays = {
        "demo_labels": {"alpha": 1.0},
        "demo_phone": {"augment.phone.p": 0.5},
        "demo_labels_phone": {"alpha": 1.0, "augment.phone.p": 0.5},
        "demo_minimal": {"alpha": 1.0, "model.classifier": "tf_mobilenetv3_small_minimal_100"},
        "demo_large": {"epochs": 3, "val_every": 3, "neg_per_pos": 5.0, "tta_hflip": False,
                       "teacher.stack_config": "configs/stack/teacher_fast.yaml"},
        "demo_large_labels": {"alpha": 1.0, "epochs": 3, "val_every": 3, "neg_per_pos": 5.0, "tta_hflip": False},
    }
    flat_base = _flat(base)
    for name, changes in expected_overlays.items():
        resolved = _flat(config_to_dict(load_distill_config(CONFIGS / "distill" / f"{name}.yaml")))
        assert resolved == {**flat_base, **changes}, name
    assert flat_base["lr"] == 0.002 and flat_base["neg_per_pos"] == 10.0 and flat_base["alpha"] == 0.5


# ---- schema and migrations ------------------------------------------------------------------------------


def test_saved_configs_carry_the_schema_and_a_newer_one_is_refused(tmp_path):
    saved = save_config(Outer(), tmp_path / "config.yaml")
    assert saved.read_text().startswith(f"schema: {SCHEMA}\n")
    ensure_same_config(Outer(), saved)
    saved.write_text(saved.read_text().replace(f"schema: {SCHEMA}", f"schema: {SCHEMA + 1}"))
    with pytest.raises(ConfigError, match=rf"config.yaml: schema: {SCHEMA + 1} was written by a newer lesionstack"):
        ensure_same_config(Outer(), saved)
    assert load_config(Outer, save_config(Outer(lr=0.3), tmp_path / "again.yaml")).lr == 0.3  # reusable as --config


def _old_cnn_config(tmp_path, drop: tuple[str, ...]):
    """A schema-1 CNN fold config (as releases before the schema key wrote it), without the keys `drop`."""
    from lesionstack.train.cnn_config import CNNConfig

    data = config_to_dict(CNNConfig(**{k: v for k, v in OLD_DEFAULTS[1]["CNNConfig"].items() if k != "keep"},
                                    keep="last"))
    for key in drop:
        data.pop(key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_an_old_saved_config_resumes_with_its_release_defaults(tmp_path):
    """A schema-1 fold config lacking keys whose default has changed since ran with the old defaults: the
    same recipe spelled out today resumes; today's (changed) defaults are refused, naming the key."""
    from lesionstack.train.cnn_config import CNNConfig

    old = OLD_DEFAULTS[1]["CNNConfig"]
    saved = _old_cnn_config(tmp_path, drop=("val_max_negatives", "untrained_segmenter", "lr"))
    same = CNNConfig(**{k: v for k, v in old.items() if k != "keep"}, keep="last")
    ensure_same_config(same, saved)
    now = CNNConfig(**{k: v for k, v in old.items() if k not in ("keep", "lr")}, keep="last")
    assert now.lr != old["lr"]  # the default changed in schema 2
    with pytest.raises(ConfigError, match=r"lr: saved=0.0001 now=0.0002"):
        ensure_same_config(now, saved)


def test_an_old_fold_config_without_keep_kept_its_best_epoch_and_is_refused(tmp_path):
    from lesionstack.train.cnn_config import CNNConfig

    old = OLD_DEFAULTS[1]["CNNConfig"]
    saved = _old_cnn_config(tmp_path, drop=("keep",))
    with pytest.raises(ConfigError, match=r"keep: saved='best' now='last'"):
        ensure_same_config(CNNConfig(**{k: v for k, v in old.items() if k != "keep"}, keep="last"), saved)


def test_runtime_keys_are_marked_on_the_fields_and_never_compared(tmp_path):
    from lesionstack.tabular.stack_config import StackConfig
    from lesionstack.train.cnn_config import CNNConfig
    from lesionstack.train.segmenter import SegConfig

    assert set(runtime_keys(CNNConfig)) == {"eval_batch_size", "num_workers", "cpu_threads", "fold_workers",
                                            "device", "progress", "untrained_segmenter"}
    assert set(runtime_keys(StackConfig)) == {"n_jobs", "workers"}
    assert set(runtime_keys(SegConfig)) == {"load_workers", "cpu_threads"}
    saved = save_config(StackConfig(), tmp_path / "config.yaml")
    ensure_same_config(StackConfig(n_jobs=4, workers=3), saved)
    with pytest.raises(ConfigError, match=r"n_rounds: saved=300 now=10"):
        ensure_same_config(StackConfig(n_rounds=10, workers=3), saved)
