"""Image-score handling before the stacker (standardisation per CNN fold model, training-row noise) and
the within-patient local outlier factor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesionstack.tabular.image_scores import add_noise, logit, standard_scales, standardise_oof, standardise_rows
from lesionstack.tabular.outliers import patient_lof


def test_standardise_puts_each_fold_model_on_one_scale() -> None:
    rng = np.random.default_rng(0)
    folds = np.repeat([0, 1], 200)
    # fold 1's model is over-confident: the same ranking, logits twice as large and shifted
    base = rng.normal(-3, 1, 400)
    scores = 1 / (1 + np.exp(-np.where(folds == 1, 2 * base + 1, base)))
    scales = standard_scales(scores, folds)
    feats = pd.DataFrame({"cnn_score": scores.astype(np.float32), "other": 1.0})
    z = standardise_oof(feats, folds, scales)["cnn_score"].to_numpy()
    for k in (0, 1):
        assert abs(z[folds == k].mean()) < 1e-4 and abs(z[folds == k].std() - 1) < 1e-3
    assert scales["0"][1] == pytest.approx(logit(scores[:200]).std())
    test = standardise_rows(feats.iloc[200:], scales["1"])["cnn_score"].to_numpy()
    np.testing.assert_allclose(test, z[200:], atol=1e-5)  # a test row of model 1 maps as its OOF rows do


def test_noise_is_seeded_scaled_and_leaves_other_columns() -> None:
    X = pd.DataFrame({"cnn_score": np.linspace(0, 10, 1000), "age": np.arange(1000.0)})
    a = add_noise(X, ["cnn_score"], 0.1, [3, 0])
    b = add_noise(X, ["cnn_score"], 0.1, [3, 0])
    pd.testing.assert_frame_equal(a, b)
    noise = a["cnn_score"] - X["cnn_score"]
    assert noise.std() == pytest.approx(0.1 * X["cnn_score"].std(), rel=0.1)
    assert (a["age"] == X["age"]).all()
    assert not add_noise(X, ["cnn_score"], 0.1, [4, 0]).equals(a)
    assert add_noise(X, ["cnn_score"], 0.0, 1) is X


def test_lof_gives_the_outlier_the_top_score_per_patient() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (25, 4))
    a[11] = [6.0, -6.0, 6.0, 0.0]  # far from patient a's other lesions
    b = rng.normal(6, 1, (25, 4))  # patient b lives where a's outlier is: no outlier for b
    lof = patient_lof(np.vstack([a, b]), np.array(["a"] * 25 + ["b"] * 25))
    assert lof[:25].argmax() == 11 and lof[11] > 2.5
    assert lof[25:].max() < lof[11]


def test_lof_small_and_constant_patients_get_one() -> None:
    x = np.array([[0.0, 1.0], [5.0, 5.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    lof = patient_lof(x, np.array(["p", "p", "q", "q", "q", "r"]))
    np.testing.assert_array_equal(lof, np.ones(6))  # p: 2 lesions, q: identical, r: one
