"""The resume guard: every reuse decision checks a digest of the content it depends on, and a change is
refused naming what changed (or, where recomputing is the stage's contract, recomputed saying what
changed). One test per refusal; the config refusals and the segmenter's masks refusal are in the stage
tests (test_train_cnn, test_train_seg, test_stack, test_pipeline)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save_file

from helpers import TINY_STACK, crop_jpeg, make_cnn_data, make_stack_inputs, tiny_cnn_config
from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.files import read_json, write_text
from lesionstack.paths import ArtifactPaths, DataPaths, FoldFiles
from lesionstack.resume import Resume, ResumeError, frame_digest, guard, images_digest
from lesionstack.runtime import load_weights
from lesionstack.tabular.features_stage import FeaturesConfig, features_stage
from lesionstack.tabular.pairing import PairingError
from lesionstack.tabular.stack import train_stack
from lesionstack.tabular.stack_config import StackConfig
from lesionstack.tabular.tune import tune
from lesionstack.train.cnn import train_cnn


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1
    workers: int = 2


def test_guard_starts_resumes_skips_and_names_the_changed_key_and_file(tmp_path: Path) -> None:
    files = FoldFiles(tmp_path / "fold_0")
    inputs = {"folds": "a", "features": "b"}
    assert guard(files, Cfg(), inputs) is Resume.START  # records config and inputs
    assert read_json(files.inputs) == inputs and files.config.is_file()
    assert guard(files, Cfg(lr=0.5), inputs) is Resume.START  # nothing reusable yet: a new attempt
    write_text(files.checkpoint, "x")
    assert guard(files, Cfg(lr=0.5, workers=8), inputs, ignore=("workers",)) is Resume.RESUME
    write_text(files.done, "done\n")
    assert guard(files, Cfg(lr=0.5), inputs) is Resume.SKIP
    with pytest.raises(ResumeError, match=r"fold_0/config.yaml was made with a different config \(lr: saved=0.5"):
        guard(files, Cfg(lr=0.1), inputs)
    with pytest.raises(ResumeError, match=r"other inputs than now: features changed .*fold_0/inputs.json"):
        guard(files, Cfg(lr=0.5), {"folds": "a", "features": "c"})


def test_frame_digest_sees_values_not_only_columns() -> None:
    a = pd.DataFrame({"x": [1.0, 2.0], "y": ["u", "v"]})
    assert frame_digest(a) == frame_digest(a.copy())
    assert frame_digest(a) != frame_digest(a.assign(x=[1.0, 2.5]))  # same columns, other values
    assert frame_digest(a) != frame_digest(a.iloc[::-1].reset_index(drop=True))  # row order counts


# ---- CNN folds and their scores --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = make_cnn_data(tmp_path_factory.mktemp("resume_cnn_data"))
    out = tmp_path_factory.mktemp("resume_cnn_art")
    train_cnn(root, root / "folds.csv", tiny_cnn_config(epochs=1), out)
    return root, out


def _rewrite_crop(h5_path: Path, isic_id: str, data: bytes) -> None:
    with h5py.File(h5_path, "a") as h5:
        del h5[isic_id]
        h5[isic_id] = np.bytes_(data)


def test_cnn_fold_refuses_other_training_crops(cnn_run: tuple[Path, Path], tmp_path: Path) -> None:
    root, out = cnn_run
    data = tmp_path / "data"
    shutil.copytree(root, data)
    before = images_digest(data / "train-image.hdf5")
    _rewrite_crop(data / "train-image.hdf5", "ISIC_0000003", crop_jpeg(np.random.default_rng(9), False, size=48))
    assert images_digest(data / "train-image.hdf5") != before
    with pytest.raises(ResumeError, match=r"cnn/fold_\d was made from other inputs than now: train_images changed"):
        train_cnn(data, data / "folds.csv", tiny_cnn_config(epochs=1), out)


def test_cnn_scores_are_rescored_when_fold_models_or_test_crops_change(cnn_run: tuple[Path, Path], tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Contract: scores are recomputed (not refused) on a change, by content, whatever the file times."""
    root, trained = cnn_run
    data, out = tmp_path / "data", tmp_path / "art"
    shutil.copytree(root, data)
    shutil.copytree(trained, out)
    art, cfg = ArtifactPaths(out), tiny_cnn_config(epochs=1)
    oof_before, test_before = pd.read_parquet(art.oof_cnn), pd.read_parquet(art.test_cnn)
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        train_cnn(data, data / "folds.csv", cfg, out)  # unchanged: reused, not rescored
    assert not any("rescoring" in m for m in caplog.messages)

    # a fold model changes (as a retrained fold would): its weights, under the same DONE marker
    weights = art.cnn_fold(1).safetensors
    state = load_weights(weights)
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        train_cnn(data, data / "folds.csv", cfg, out)
    assert any("rescoring" in m and "fold_models changed" in m for m in caplog.messages)
    oof = pd.read_parquet(art.oof_cnn)
    assert not np.allclose(oof.loc[oof["fold"] == 1, "score"], oof_before.loc[oof_before["fold"] == 1, "score"])

    # the test crops change: test_cnn is rescored and covers the new crop
    with h5py.File(data / "test-image.hdf5", "a") as h5:
        h5["ISIC_9999999"] = np.bytes_(crop_jpeg(np.random.default_rng(1), True))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        train_cnn(data, data / "folds.csv", cfg, out)
    assert any("rescoring" in m and "test_images changed" in m for m in caplog.messages)
    assert len(pd.read_parquet(art.test_cnn)) == len(test_before) + 1


# ---- features ------------------------------------------------------------------------------------------


def test_features_are_rebuilt_when_metadata_values_or_cnn_scores_change(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Contract: the feature tables are recomputed on a change, reused when every input is unchanged."""
    data = DataPaths(tmp_path / "data")
    write_demo_data(data.root, DemoSpec(patients=8, lesions_per_patient=6, seed=1, mask_count=0))
    art = ArtifactPaths(tmp_path / "art")
    assert not features_stage(data, art, FeaturesConfig()).reused
    assert features_stage(data, art, FeaturesConfig()).reused
    meta = pd.read_csv(data.train_metadata)
    meta.loc[3, "tbp_lv_areaMM2"] += 1.0  # one value, same columns and rows
    meta.to_csv(data.train_metadata, index=False)
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        result = features_stage(data, art, FeaturesConfig())
    assert not result.reused and any("train_metadata changed" in m for m in caplog.messages)
    # CNN scores appear: the train table is rebuilt with them
    ids = meta["isic_id"]
    pd.DataFrame({"isic_id": ids, "fold": 0, "score": np.linspace(0, 1, len(ids))}).to_parquet(art.oof_cnn)
    test_ids = pd.read_csv(data.test_metadata)["isic_id"]
    pd.DataFrame({"isic_id": test_ids, "score": 0.5}).to_parquet(art.test_cnn)  # an older release's: the mean only
    with pytest.raises(PairingError, match=r"test_cnn.parquet: no per-fold CNN scores .* `lesionstack train-cnn`"):
        features_stage(data, art, FeaturesConfig())
    pd.DataFrame({"isic_id": test_ids, "score": 0.5, "score_fold_0": 0.4, "score_fold_1": 0.6}).to_parquet(art.test_cnn)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        result = features_stage(data, art, FeaturesConfig())
    assert result.with_cnn and any("train_cnn_scores changed" in m for m in caplog.messages)
    assert "cnn_score" in pd.read_parquet(art.features_train).columns
    paired = pd.read_parquet(art.features_test_folds)  # each CNN fold's test features, for stack fold k
    assert sorted(paired["fold"].unique()) == [0, 1] and len(paired) == 2 * len(test_ids)
    assert np.allclose(paired.groupby("fold")["cnn_score"].mean(), [0.4, 0.6])
    # losing the paired table alone rebuilds the tables
    art.features_test_folds.unlink()
    assert not features_stage(data, art, FeaturesConfig()).reused and art.features_test_folds.is_file()


# ---- tuning, best params, stacker folds ----------------------------------------------------------------


@pytest.fixture()
def stack_inputs(tmp_path: Path) -> tuple[pd.DataFrame, ArtifactPaths, pd.DataFrame]:
    return make_stack_inputs(tmp_path, n=200)


def _tabular(feats: pd.DataFrame) -> pd.DataFrame:
    return feats[[c for c in feats.columns if not c.startswith("cnn_")]]


def test_tuning_study_refuses_other_feature_values(stack_inputs: tuple) -> None:
    feats, art, _ = stack_inputs
    cfg = StackConfig(**{**TINY_STACK, "models": ("lgbm",)})
    tune(_tabular(feats), art.folds, art, cfg, n_trials=1)
    changed = _tabular(feats).assign(age_approx=feats["age_approx"] + 5)  # same columns, other values
    with pytest.raises(ResumeError, match=r"tune was made from other inputs than now: features changed"):
        tune(changed, art.folds, art, cfg, n_trials=1)
    with pytest.raises(ResumeError, match=r"tune/config.yaml was made with a different config \(n_rounds"):
        tune(_tabular(feats), art.folds, art, dataclasses.replace(cfg, n_rounds=30), n_trials=1)


def test_best_params_are_refused_for_other_folds(stack_inputs: tuple) -> None:
    feats, art, _ = stack_inputs
    cfg = StackConfig(**{**TINY_STACK, "models": ("lgbm",)})
    tune(_tabular(feats), art.folds, art, cfg, n_trials=1)
    folds = pd.read_csv(art.folds)
    folds["fold"] = (folds["fold"] + 1) % 3  # the same groups, renumbered: another assignment
    other = art.root / "other-folds.csv"
    folds.to_csv(other, index=False)
    with pytest.raises(ResumeError, match=r"tune was made from other inputs than now: folds changed"):
        train_stack(_tabular(feats), other, art, cfg)
    assert not art.stack_dir.exists()  # refused before any fold was trained


def test_stack_folds_refuse_other_feature_values_with_the_same_columns(stack_inputs: tuple) -> None:
    feats, art, cnn = stack_inputs
    cfg = StackConfig(**{**TINY_STACK, "models": ("lgbm",), "train_tabular": False})
    train_stack(feats, art.folds, art, cfg, cnn_oof=cnn)
    changed = feats.assign(age_approx=feats["age_approx"] + 5)
    assert list(changed.columns) == list(feats.columns)
    with pytest.raises(ResumeError, match=r"stack/fold_0 was made from other inputs than now: features changed"):
        train_stack(changed, art.folds, art, cfg, cnn_oof=cnn)
