"""The score-shift measurement: how far the test scores the stacker sees are from the OOF scores it learnt
from, before pairing (every stack fold on the mean of the CNN folds' test scores) and after (stack fold k on
CNN fold k's), as quantiles and two-sample KS statistics. `run` records it in `score_shift.json` and the
report shows it (`report.shift`). A measurement only: nothing the models are trained or scored with reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.features import CNN_PREFIX
from lesionstack.tabular.stack_predict import fold_probabilities

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def distribution(values: np.ndarray) -> dict[str, Any]:
    """n, mean, std and `QUANTILES` of one sample."""
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()),
            "quantiles": {f"q{round(q * 100):02d}": float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES),
                                                                          strict=True)}}


def compare(train: np.ndarray, tests: dict[str, np.ndarray]) -> dict[str, Any]:
    """The training (OOF) sample's distribution and, per test sample, its distribution and the two-sample
    Kolmogorov-Smirnov statistic against training (0: same distribution; pooled per-fold test samples are
    not independent, so no p-value is given)."""
    out: dict[str, Any] = {"oof": distribution(train)}
    for name, values in tests.items():
        out[name] = {**distribution(values), "ks": float(ks_2samp(train, values).statistic)}
    return out


def score_shift(artifacts: ArtifactPaths, test_features: pd.DataFrame, fold_cnn: pd.DataFrame,
                paired_probabilities: dict[str, np.ndarray]) -> dict[str, Any]:
    """OOF vs test distributions, test features from the mean of the CNN folds (`test_mean`, before
    pairing) and from each fold model (`test_paired`, pooled over folds; `paired_probabilities`: the stack's
    `fold_probabilities` on them, as the prediction computed them):

    * `features`: every CNN feature (`cnn_*`), OOF = the training feature table;
    * `cnn_score_by_fold`: KS of CNN fold k's OOF scores (its validation rows) against the test scores
      that stack fold k sees, mean vs paired;
    * `stack_fold_probability`: what one stack fold outputs (mean over the blended families' probabilities),
      OOF = each row from its own fold's models, test = every fold's models pooled;
    * `stack_final_probability`: the test probability averaged over stack folds (what the rank blend ranks).
    """
    cv = read_json(artifacts.cv_json)
    train = pd.read_parquet(artifacts.features_train)
    cols = [c for c in train.columns if c.startswith(CNN_PREFIX)]
    features = {c: compare(train[c].to_numpy(), {"test_mean": test_features[c].to_numpy(),
                                                   "test_paired": fold_cnn[c].to_numpy()}) for c in cols}
    oof_cnn = pd.read_parquet(artifacts.oof_cnn)
    by_fold = {}
    for k in range(cv["n_folds"]):
        own = oof_cnn.loc[oof_cnn["fold"] == k, "score"].to_numpy()
        paired = fold_cnn.loc[fold_cnn["fold"] == k, f"{CNN_PREFIX}score"].to_numpy()
        by_fold[str(k)] = {"ks_mean": float(ks_2samp(own, test_features[f"{CNN_PREFIX}score"]).statistic),
                           "ks_paired": float(ks_2samp(own, paired).statistic)}
    families = list(cv["blend"]["weights"])
    oof = pd.read_parquet(artifacts.oof_stack)
    oof_p = oof[[f"score_{m}" for m in families]].mean(axis=1).to_numpy()
    before = fold_probabilities(test_features, artifacts, pairing="mean")
    fold_p = {name: np.mean([p[m] for m in families], axis=0) for name, p in (("test_mean", before),
                                                                              ("test_paired", paired_probabilities))}
    return {
        "what": "OOF vs test score distributions; test_mean: test CNN features from the mean of the CNN fold "
                "models' scores (before pairing); test_paired: stack fold k on CNN fold k's scores (pooled "
                "over folds). ks: two-sample Kolmogorov-Smirnov statistic against the OOF sample",
        "n_folds": cv["n_folds"], "n_test": len(test_features),
        "features": features,
        "cnn_score_by_fold": by_fold,
        "stack_fold_probability": compare(oof_p, {n: p.ravel() for n, p in fold_p.items()}),
        "stack_final_probability": compare(oof_p, {n: p.mean(axis=0) for n, p in fold_p.items()}),
    }
