"""distill: the loss, the no-leak rule of the teacher, teacher files, and the stage's files, resume and config
check on a tiny data set (timm's test_resnet, 32-px crops, 24 lesions in 2 folds, 1 epoch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers import make_cnn_data, tiny_student, train_tiny_student
from lesionstack.config import ConfigError, save_config
from lesionstack.folds import read_folds
from lesionstack.models import ModelConfig
from lesionstack.paths import ArtifactPaths
from lesionstack.report.distill import comparison
from lesionstack.tabular.stack_config import StackConfig
from lesionstack.train.cnn_scores import check_oof
from lesionstack.train.distill import (
    WEIGHTS_FILE,
    distill,
    distill_loss,
    nested_scores,
    platt,
    teacher_from_file,
    teacher_scores,
)
from lesionstack.train.distill_config import DistillConfig, TeacherConfig
from lesionstack.trained.loaders import load_student

# ---- the loss -----------------------------------------------------------------------------------------


def test_loss_alpha_one_is_the_label_bce() -> None:
    logits, labels, teacher = torch.randn(16), (torch.rand(16) > 0.5).float(), torch.randn(16)
    expected = F.binary_cross_entropy_with_logits(logits, labels)
    assert torch.allclose(distill_loss(logits, labels, teacher, 1.0, 3.0), expected)


def test_soft_term_is_tempered_bce_scaled_by_t_squared() -> None:
    logits, labels, teacher = torch.randn(16), (torch.rand(16) > 0.5).float(), torch.randn(16)
    t = 3.0
    p = torch.sigmoid(teacher / t)
    q = torch.sigmoid(logits / t)
    manual = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).mean() * t * t
    assert torch.allclose(distill_loss(logits, labels, teacher, 0.0, t), manual, atol=1e-5)
    mixed = 0.3 * F.binary_cross_entropy_with_logits(logits, labels) + 0.7 * manual
    assert torch.allclose(distill_loss(logits, labels, teacher, 0.3, t), mixed, atol=1e-5)


def test_soft_term_is_minimal_at_the_teacher() -> None:
    teacher = torch.randn(32)
    logits = teacher.clone().requires_grad_(True)
    distill_loss(logits, torch.zeros(32), teacher, 0.0, 2.0).backward()
    assert logits.grad is not None and logits.grad.abs().max() < 1e-6
    moved = (teacher + 0.5).requires_grad_(True)
    distill_loss(moved, torch.zeros(32), teacher, 0.0, 2.0).backward()
    assert moved.grad is not None and (moved.grad > 0).all()  # pulled back towards the teacher


def test_config_refuses_a_gated_student_and_bad_alpha() -> None:
    with pytest.raises(ConfigError, match="image-only"):
        DistillConfig(model=ModelConfig(gate="train"))
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="^scores: expected a parquet or csv file with teacher.source: file"):
        TeacherConfig(source="file")


# ---- the teacher and the no-leak rule -----------------------------------------------------------------


def tabular_data(n: int = 300, n_folds: int = 3, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fold file and a feature table whose first feature carries the label (and a CNN-score column)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    folds = pd.DataFrame({"isic_id": [f"ISIC_{i:07d}" for i in range(n)], "patient_id": "p", "target": y,
                          "fold": np.arange(n) % n_folds})
    feats = pd.DataFrame({"isic_id": folds["isic_id"], "f0": y + rng.normal(0, 0.7, n),
                          "f1": rng.normal(size=n), "cnn_score": y.astype(float)})
    return folds, feats


TINY_STACK = StackConfig(models=("lgbm", "xgboost"), seeds=(0,), neg_pos_ratio=0, n_rounds=15, learning_rate=0.3,
                         max_depth=3, num_leaves=7, min_child_samples=3, n_jobs=1)


def test_nested_teacher_ignores_everything_in_the_students_validation_fold() -> None:
    """The rule itself: teacher scores for fold k's training rows do not move when fold k's labels and
    features change (no model behind them saw fold k), while a change in a training fold moves them."""
    folds, feats = tabular_data()
    k = 1
    base = nested_scores(feats, folds, TINY_STACK, k)
    assert base.shape == ((folds["fold"] != k).sum(),)
    in_k = (folds["fold"] == k).to_numpy()
    folds2, feats2 = folds.copy(), feats.copy()
    folds2.loc[in_k, "target"] = 1 - folds2.loc[in_k, "target"]
    feats2.loc[in_k, ["f0", "f1"]] = np.random.default_rng(1).normal(size=(in_k.sum(), 2))
    feats2.loc[in_k, "cnn_score"] = folds2.loc[in_k, "target"]
    np.testing.assert_array_equal(nested_scores(feats2, folds2, TINY_STACK, k), base)
    other = (folds["fold"] == 0).to_numpy()  # a training fold of student fold 1
    folds3 = folds.copy()
    folds3.loc[other, "target"] = 1 - folds3.loc[other, "target"]
    assert not np.array_equal(nested_scores(feats, folds3, TINY_STACK, k), base)


def test_nested_teacher_leaves_out_cnn_scores_and_learns_from_the_features() -> None:
    folds, feats = tabular_data()
    scores = nested_scores(feats.assign(cnn_score=0.0), folds, TINY_STACK, 0)
    np.testing.assert_array_equal(scores, nested_scores(feats, folds, TINY_STACK, 0))
    y = folds.loc[folds["fold"] != 0, "target"].to_numpy()
    assert scores[y == 1].mean() > scores[y == 0].mean() + 0.2  # f0 carries the label


def test_nested_teacher_from_a_runs_artifacts(tmp_path: Path) -> None:
    """teacher_scores reads the run's feature table and stack config (the path `distill` takes)."""
    folds, feats = tabular_data()
    art = ArtifactPaths(tmp_path / "art")
    art.features_train.parent.mkdir(parents=True)
    feats.to_parquet(art.features_train)
    stack_yaml = tmp_path / "stack.yaml"
    save_config(TINY_STACK, stack_yaml)
    scores = teacher_scores(TeacherConfig(stack_config=str(stack_yaml)), art, folds, 2)
    np.testing.assert_allclose(scores, nested_scores(feats, folds, TINY_STACK, 2))


def test_plain_oof_teacher_is_refused_and_per_fold_scores_accepted(tmp_path: Path) -> None:
    folds, _ = tabular_data(n=30)
    oof = folds[["isic_id"]].assign(fold=folds["fold"], score=np.linspace(0, 1, len(folds)))
    oof.to_parquet(tmp_path / "oof.parquet")
    with pytest.raises(ConfigError, match="leak"):
        teacher_from_file(tmp_path / "oof.parquet", folds, 0, allow_leak=False)
    assert len(teacher_from_file(tmp_path / "oof.parquet", folds, 0, allow_leak=True)) == 20
    nested = pd.concat(folds[folds["fold"] != k][["isic_id"]].assign(student_fold=k, score=0.5) for k in range(3))
    nested.to_csv(tmp_path / "nested.csv", index=False)
    assert (teacher_from_file(tmp_path / "nested.csv", folds, 2, allow_leak=False) == 0.5).all()
    nested[nested["student_fold"] != 2].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ConfigError, match="student fold 2"):
        teacher_from_file(tmp_path / "short.csv", folds, 2, allow_leak=False)


def test_platt_logits_are_monotone_and_at_the_base_rate() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.05).astype(int)
    ranks = (np.argsort(np.argsort(y + rng.normal(0, 0.8, 2000))) + 1) / 2000
    logits = platt(ranks, y)
    assert (np.diff(logits[np.argsort(ranks)]) >= 0).all()
    # a logistic fit with an intercept matches the mean probability to the base rate (soft targets ~ 5 %)
    assert abs((1 / (1 + np.exp(-logits))).mean() - y.mean()) < 1e-3


# ---- the stage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DistillConfig, dict]:
    return train_tiny_student(tmp_path_factory.mktemp("distill"))


def test_distill_writes_folds_oof_and_metrics_then_resumes(trained: tuple[Path, Path, DistillConfig, dict]) -> None:
    root, art_root, cfg, summary = trained
    art = ArtifactPaths(art_root)
    for k in (0, 1):
        files = art.distill_fold("tiny", k)
        assert (files.dir / WEIGHTS_FILE).is_file() and files.done.is_file() and files.config.is_file()
        assert not files.weights.exists() and not files.checkpoint.exists()  # no pickle left behind
    oof = pd.read_parquet(art.distill_file("tiny", "oof.parquet"))
    check_oof(oof, read_folds(root / "folds.csv"))
    assert 0.0 <= summary["oof_pauc"] <= 0.2 and len(summary["fold_pauc"]) == 2
    teacher = pd.read_parquet(art.distill_file("tiny", "teacher.parquet"))
    assert set(teacher["student_fold"]) == {0, 1} and np.isfinite(teacher["logit"]).all()
    model, saved = load_student(art.distill_fold("tiny", 0).dir)
    assert saved["alpha"] == cfg.alpha and model(torch.zeros(2, 3, 32, 32)).shape == (2,)
    again = distill(root, art.root, cfg, name="tiny", folds_path=root / "folds.csv")  # every fold DONE: reused
    assert again["oof_pauc"] == pytest.approx(summary["oof_pauc"])
    with pytest.raises(ConfigError, match="alpha"):
        distill(root, art.root, dataclasses.replace(cfg, alpha=0.9), name="tiny", folds_path=root / "folds.csv")


def test_labels_only_student_needs_no_teacher(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    art = ArtifactPaths(tmp_path / "art")
    summary = distill(root, art.root, tiny_student(alpha=1.0), name="labels", folds_path=root / "folds.csv",
                      folds_only=[0])
    assert set(summary["folds"]) == {0} and "oof_pauc" not in summary  # fold 1 not trained yet
    assert not art.distill_file("labels", "teacher.parquet").exists()


def test_report_shows_the_students_beside_the_teacher(trained: tuple[Path, Path, DistillConfig, dict],
                                                      tmp_path: Path) -> None:
    from lesionstack.files import write_json
    from lesionstack.report.build import _distill_section
    from lesionstack.report.inputs import ReportInputs

    _, art_root, _, summary = trained
    art = ArtifactPaths(art_root)
    write_json(art.cv_json, {"models": {"blend": {"pauc_oof": 0.15, "pauc_mean": 0.15, "pauc_std": 0.01}}})
    rows = {r["model"]: r for r in comparison(art_root)}
    assert rows["student tiny, distilled (alpha 0.5, T 2.0)"]["oof_pauc"] == pytest.approx(summary["oof_pauc"])
    assert rows["stacker blend"]["oof_pauc"] == 0.15
    write_json(art.robustness_file("tiny.json"), {"model": "tiny", "clean": {"oof_pauc": 0.1},
                                                   "degraded": {"oof_pauc": 0.08}})
    inputs = ReportInputs(paths=art, cv={}, oof=pd.DataFrame(), data_dir=None, notes=[])
    page = _distill_section(inputs, None, tmp_path)  # type: ignore[arg-type]
    assert "student tiny, distilled (alpha 0.5, T 2.0)" in page and "stacker blend" in page and "-0.0200" in page
    assert "Exported phone model" not in page
    write_json(art.export_dir / "export.json", {
        "student": "tiny", "fold": 0, "classifier": "test_resnet", "image_size": 32, "n_val": 12,
        "torch": {"pauc": 0.05}, "fp32": {"pauc": 0.05, "bytes": 2_000_000, "max_abs_diff_vs_torch": 2e-6},
        "int8": {"pauc": 0.047, "bytes": 600_000, "recipe": "u8s8", "pauc_minus_fp32": -0.003,
                 "within_tolerance": True}})
    page = _distill_section(inputs, None, tmp_path)  # type: ignore[arg-type]
    assert "Exported phone model" in page and "ONNX int8 (U8S8)" in page and "0.0470" in page
    assert "within the 0.005 check" in page
    empty = ReportInputs(paths=ArtifactPaths(tmp_path / "none"), cv={}, oof=pd.DataFrame(), data_dir=None, notes=[])
    assert _distill_section(empty, None, tmp_path) == ""  # type: ignore[arg-type]
