"""Test-time scoring with a trained stacker: each stack fold's saved models on the test feature table (stack
fold k on CNN fold k's test CNN features, `tabular.pairing`), averaged over folds, then blended as in training
(cv.json).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.blend import blend
from lesionstack.tabular.estimator import load_models
from lesionstack.tabular.features import has_cnn
from lesionstack.tabular.image_scores import standardise_test
from lesionstack.tabular.pairing import PAIRINGS, check_fold_pairing, paired_features
from lesionstack.tabular.stack_config import StackError

TABULAR = "tabular_"  # prefix of the models trained without CNN features


def _load_features(features: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    return features.copy() if isinstance(features, pd.DataFrame) else pd.read_parquet(features)


def predict_stack(test_features: str | os.PathLike[str] | pd.DataFrame, artifacts: ArtifactPaths,
                  variant: str = "main", *, fold_cnn: pd.DataFrame | None = None,
                  pairing: str = "fold") -> pd.DataFrame:
    """Score a test feature table with the saved fold models: mean over folds and seeds, then the blend
    of training (cv.json). Returns DataFrame[isic_id, score].

    With CNN features, stack fold k scores the test rows with CNN fold k's features (`fold_cnn`, the long
    table of `pairing.fold_cnn_features`; the fold files are checked, `pairing.check_fold_pairing`), so
    train and test features have one scale. `pairing="mean"` scores every fold on `test_features`' own
    CNN features (the mean of the fold models' scores): only to measure what pairing changes.
    `variant="tabular"` scores with the models trained without CNN features (`tabular_<family>`, trained
    when `train_tabular` is on), rank-mean blended: the score of a row whose crop could not be read."""
    feats = _load_features(test_features)
    per_fold = fold_probabilities(feats, artifacts, variant, fold_cnn=fold_cnn, pairing=pairing)
    return blend_folds(feats, per_fold, artifacts, variant)


def blend_folds(feats: pd.DataFrame, per_fold: dict[str, np.ndarray], artifacts: ArtifactPaths,
                variant: str = "main") -> pd.DataFrame:
    """DataFrame[isic_id, score] from `fold_probabilities`' output: each family's mean over the stack folds,
    then the blend of training (cv.json)."""
    cv = read_json(artifacts.cv_json)
    sums = {m: p.mean(axis=0) for m, p in per_fold.items()}
    # the tabular variant's blend weights are not saved (cv.json keeps the main blend's): rank mean
    weights = cv["blend"]["weights"] if cv["blend"]["method"] == "weights" and variant == "main" else None
    return pd.DataFrame({ID_COLUMN: feats[ID_COLUMN].astype(str).to_numpy(), "score": blend(sums, weights)})


def fold_probabilities(feats: pd.DataFrame, artifacts: ArtifactPaths, variant: str = "main", *,
                       fold_cnn: pd.DataFrame | None = None, pairing: str = "fold") -> dict[str, np.ndarray]:
    """Per blended family: (n_folds, n) probabilities, row k from stack fold k's models (see
    `predict_stack` for `fold_cnn` and `pairing`)."""
    if variant not in ("main", "tabular"):
        raise StackError(f"variant must be 'main' or 'tabular', got {variant!r}")
    if pairing not in PAIRINGS:
        raise StackError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    cv = read_json(artifacts.cv_json)
    if cv["with_cnn"] and not has_cnn(feats):
        raise StackError("the stacker was trained with CNN features, but the test features hold none: "
                         "build them with the CNN's test scores")
    paired = cv["with_cnn"] and variant == "main" and pairing == "fold"
    if paired and fold_cnn is None:
        raise StackError(f"{artifacts.cv_json}: the stacker uses CNN features, so stack fold k scores the test "
                         "rows with CNN fold k's score: pass fold_cnn (tabular.pairing.fold_cnn_features of the "
                         "per-fold test scores), or pairing='mean' to use the mean score for every fold")
    if paired:
        check_fold_pairing(artifacts, cv["n_folds"])
    names = [m if variant == "main" else f"{TABULAR}{m}" for m in cv["blend"]["weights"]]
    out = {m: np.zeros((cv["n_folds"], len(feats))) for m in names}
    for k in range(cv["n_folds"]):
        ff = artifacts.stack_fold(k)
        if not ff.done.is_file():
            raise StackError(f"{ff.dir}: fold {k} of the stacker did not finish; run train-stack first")
        fitted = load_models(ff.dir)
        if missing := [m for m in names if m not in fitted]:
            raise StackError(f"{ff.dir}: no {missing} models (train the stacker with train_tabular on)")
        X = paired_features(feats, fold_cnn, k, "test CNN features") if paired else feats  # type: ignore[arg-type]
        if cv.get("cnn_scales") and has_cnn(X):  # the scale of the CNN model whose score X holds
            X = standardise_test(X, cv["cnn_scales"], k if paired else None)
        for m in names:
            out[m][k] = fitted[m].predict_proba(X)[:, 1]
    return out
