"""The real-data configs (configs/cnn/default.yaml, effb0_128.yaml, configs/run/isic2024.yaml): their
training budget at ISIC 2024 scale, the per-epoch validation subsample, the refusal of a missing weights
file, what happens to a gate without a trained segmenter, and (slow) each config trained on a 2,000-crop
demo sample on CPU."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError, read_config_dict
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.pipeline import _segmenter, run
from lesionstack.run_config import load_run_config
from lesionstack.runtime import load_weights
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig, load_cnn_config
from lesionstack.train.cnn_fold import validation_rows

REPO = Path(__file__).resolve().parents[1]
REAL_CNN = [REPO / "configs" / "cnn" / "default.yaml", REPO / "configs" / "cnn" / "effb0_128.yaml"]
# ISIC 2024, one of 5 folds: 401,059 crops and 393 positives in all
REAL_TRAIN_POSITIVES, REAL_VAL_CROPS = round(393 * 4 / 5), round(401_059 / 5)


def tiny(gate: str = "train", **changes: object) -> CNNConfig:
    return tiny_cnn_config(gate, **{"epochs": 1, **changes})


@pytest.mark.parametrize("path", REAL_CNN, ids=lambda p: p.name)
def test_real_configs_spend_the_fold_on_training(path: Path) -> None:
    cfg = load_cnn_config(path)
    steps = REAL_TRAIN_POSITIVES * (1 + cfg.neg_per_pos) / cfg.batch_size
    validations = math.ceil(cfg.epochs / cfg.val_every)
    scored = validations * (cfg.val_max_negatives + REAL_TRAIN_POSITIVES / 4)
    assert steps >= 1000, f"{path.name}: {steps:.0f} optimiser steps per epoch"
    assert scored < 0.2 * steps * cfg.batch_size * cfg.epochs  # validation well under a fifth of the images
    assert cfg.val_max_negatives < REAL_VAL_CROPS
    assert cfg.keep == "last" and cfg.model.classifier_weights and cfg.untrained_segmenter != "allow"


def test_the_real_data_student_gets_the_cnns_budget_of_steps() -> None:
    """configs/distill/default.yaml trains through the CNN's loop on the same real folds: the same bar."""
    from lesionstack.train.distill_config import load_distill_config

    cfg = load_distill_config(REPO / "configs" / "distill" / "default.yaml")
    steps = REAL_TRAIN_POSITIVES * (1 + cfg.neg_per_pos) / cfg.batch_size
    scored = math.ceil(cfg.epochs / cfg.val_every) * (cfg.val_max_negatives + REAL_TRAIN_POSITIVES / 4)
    assert steps >= 1000, f"{steps:.0f} optimiser steps per epoch"
    assert scored < 0.2 * steps * cfg.batch_size * cfg.epochs and cfg.keep == "last"


def test_validation_subsample_keeps_every_positive_and_the_same_draw() -> None:
    val = pd.DataFrame({"isic_id": [f"I{i}" for i in range(100)], "target": [int(i % 10 == 0) for i in range(100)]},
                       index=range(500, 600))
    sub = validation_rows(val, 20, seed=3)
    assert len(sub) == 30 and sub["target"].sum() == 10
    assert sub.equals(validation_rows(val, 20, seed=3)) and not sub.equals(validation_rows(val, 20, seed=4))
    assert validation_rows(val, None, seed=3) is val and validation_rows(val, 90, seed=3) is val


def test_val_max_negatives_validates_on_the_subsample_but_scores_the_whole_fold(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")  # 2 folds of 12 lesions, 3 positives each
    train_cnn(root, root / "folds.csv", tiny(gate="none", val_max_negatives=2), tmp_path / "art")
    art = ArtifactPaths(tmp_path / "art")
    assert [read_json(art.cnn_fold(k).metrics)["n_val"] for k in (0, 1)] == [5, 5]
    assert len(pd.read_parquet(art.oof_cnn)) == 24


def test_missing_classifier_weights_stop_the_run_naming_the_key(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    cfg = tiny(gate="none")
    cfg.model = dataclasses.replace(cfg.model, classifier_weights=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ConfigError, match=r"model.classifier_weights .*absent.safetensors.*no such file"):
        train_cnn(root, root / "folds.csv", cfg, tmp_path / "art")
    assert not (tmp_path / "art").exists()  # refused before any work


def test_real_run_config_refuses_a_missing_weights_file_before_any_stage(tmp_path: Path, monkeypatch) -> None:
    from lesionstack.data.synthetic import DemoSpec, write_demo_data

    write_demo_data(tmp_path / "data", DemoSpec(patients=8, lesions_per_patient=5, seed=1, mask_count=0),
                    workers=1)
    monkeypatch.chdir(tmp_path)  # the config's relative weights path: tmp_path/weights/..., absent
    with pytest.raises(ConfigError, match="model.classifier_weights"):
        run(tmp_path / "data", tmp_path / "art", load_run_config(REPO / "configs/run/isic2024.yaml"))
    assert not ArtifactPaths(tmp_path / "art").folds.exists()


def test_untrained_segmenter_refuse_stops_train_cnn_with_what_to_do(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"model.segmenter_weights is null.*untrained_segmenter: gate_none"):
        train_cnn(root, root / "folds.csv", tiny(untrained_segmenter="refuse"), tmp_path / "art")


def test_untrained_segmenter_gate_none_trains_a_plain_classifier(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    train_cnn(root, root / "folds.csv", tiny(untrained_segmenter="gate_none"), tmp_path / "art", folds_only=[0])
    files = ArtifactPaths(tmp_path / "art").cnn_fold(0)
    assert read_config_dict(files.config)["model"]["gate"] == "none"
    assert not any(k.startswith("segmenter.") for k in load_weights(files.kept_weights))


def test_run_without_masks_refuses_or_falls_back_as_the_config_says(tmp_path: Path) -> None:
    cfg = load_run_config(REPO / "configs/run/isic2024.yaml")
    cfg.masks_dir = str(tmp_path / "no-masks")
    data, art = DataPaths(tmp_path / "data"), ArtifactPaths(tmp_path / "art")
    with pytest.raises(ConfigError, match=r"no masks folder .*no-masks \(masks_dir\)"):
        _segmenter(cfg, data, art)  # default.yaml: untrained_segmenter refuse
    cfg.cnn.untrained_segmenter = "gate_none"
    assert "without a gate" in str(_segmenter(cfg, data, art)) and cfg.cnn.model.gate == "none"


# ---- slow: each real config end to end on a 2,000-crop sample -------------------------------------------

# Only the knobs that make a CPU run finish are overridden: the epoch count and size (epochs 1, neg_per_pos 5:
# ~290 images per fold instead of every negative of the 2,000-crop sample), image and batch size, validation
# negatives (100), the segmenter's epochs and image size, and the tuning trials (2). Weights files are random
# timm weights saved where the configs expect them; keep, val_every, lr, weights paths, gate and the
# untrained_segmenter policy are the config's.
SMOKE_CNN = {"epochs": 1, "neg_per_pos": 5, "image_size": 32, "batch_size": 32, "eval_batch_size": 128,
             "num_workers": 0, "cpu_threads": 1, "progress": False, "val_max_negatives": 100}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lesionstack.data.synthetic import DemoSpec, write_demo_data

    root = tmp_path_factory.mktemp("sample") / "data"
    write_demo_data(root, DemoSpec(patients=67, lesions_per_patient=30, seed=5, mask_count=40), workers=1)
    return root


def save_random_weights(name: str, path: Path) -> None:
    from safetensors.torch import save_file

    from lesionstack._compat import ensure_timm_importable

    ensure_timm_importable()
    import timm

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}, str(path))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 min on a quiet 2-core box; this shared one runs far slower
def test_effb0_config_trains_on_a_2000_crop_sample(sample: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_cnn_config(REAL_CNN[1], **SMOKE_CNN)
    save_random_weights("efficientnet_b0", tmp_path / cfg.model.classifier_weights)
    art = ArtifactPaths(tmp_path / "art")
    from lesionstack.folds import make_folds_file

    make_folds_file(sample, art.folds, n_folds=5, seed=42)
    summary = train_cnn(sample, art.folds, cfg, art.root)  # no segmenter: gate_none, a plain classifier
    assert 0.0 <= summary["oof_pauc"] <= 0.2 and len(summary["folds"]) == 5
    assert read_config_dict(art.cnn_fold(0).config)["model"]["gate"] == "none"
    assert [e["epoch"] for e in read_json(art.cnn_fold(0).metrics)["epochs"] if e["val_pauc"] is not None] == [1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_isic2024_run_config_runs_on_a_2000_crop_sample(sample: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(REPO / "configs/run/isic2024.yaml")
    cfg.masks_dir = str(sample / "masks")
    cfg.cnn = dataclasses.replace(cfg.cnn, **SMOKE_CNN)
    cfg.segmenter = dataclasses.replace(cfg.segmenter, epochs=1, image_size=32)
    cfg.tune.n_trials = 2
    save_random_weights("resnet18", tmp_path / cfg.cnn.model.classifier_weights)
    summary = run(sample, tmp_path / "art", cfg)
    assert 0.0 <= summary["pauc_oof"]["blend"] <= 0.2 and Path(summary["submission"]).is_file()
    assert read_config_dict(ArtifactPaths(tmp_path / "art").cnn_fold(0).config)["model"]["gate"] == "train"
