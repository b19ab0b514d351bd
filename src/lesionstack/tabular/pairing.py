"""Fold-paired test predictions: stack fold k scores the test rows from CNN features built on CNN fold k's
test score, and the test prediction is the average over stack folds.

Why: every training row's CNN score (`oof_cnn.parquet`) comes from ONE fold model, while the mean of the
fold models' test scores has a narrower spread. CNN features built on that mean (the score, score /
patient mean, z-score and rank within the patient) would have another scale at test time than the
stacker learnt from. Paired, each stack fold sees test features of the kind its training rows had: one
CNN fold model's score. `score_shift` measures both ways against the OOF (quantiles, two-sample KS).

Pairing needs the stacker's folds to be the CNN's (one fold file): CNN fold k must be the model trained
without the rows of stack fold k. `check_fold_pairing` compares the fold-file digests both recorded
(`stack/fold_k/inputs.json`, `cnn/fold_k/inputs.json`) and REFUSES a mismatch or a missing record, rather
than falling back to the mean: a silent fallback is the very scale shift pairing removes. Retrain the
stacker on the CNN's fold file (`train-stack` already refuses CNN OOF scores of other folds), or ask
for the mean explicitly (`pairing="mean"`, used here to measure the before state).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.features import CNN_PREFIX, cnn_features
from lesionstack.trained.scorer import FOLD_SCORE_PREFIX

PAIRINGS = ("fold", "mean")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class PairingError(ValueError):
    """Test CNN scores that cannot be paired with the stacker's folds (old format, other fold file)."""


def fold_score_columns(scores: pd.DataFrame, where: str) -> dict[int, str]:
    """fold -> column of the per-fold CNN scores in `scores`; refused when there are none (a table of the
    mean score only, as releases before pairing wrote)."""
    found = {int(m.group(1)): c for c in scores.columns if (m := re.fullmatch(rf"{FOLD_SCORE_PREFIX}(\d+)", c))}
    if not found:
        raise PairingError(
            f"{where}: no per-fold CNN scores ({FOLD_SCORE_PREFIX}<k> columns), only their mean; the stacker "
            "pairs stack fold k with CNN fold k's test score. Rescore: `lesionstack train-cnn` (trained folds "
            "are reused; only the scores are rewritten), or Predictor.score_hdf5(..., per_fold=True)")
    return dict(sorted(found.items()))


def fold_cnn_features(metadata: pd.DataFrame, scores: pd.DataFrame, where: str) -> pd.DataFrame:
    """Long table isic_id, fold, cnn_*: the CNN features of every test row built on each CNN fold model's
    score (`scores`: isic_id + `score_fold_<k>` columns, finite; fill unscored rows first)."""
    parts = []
    for fold, column in fold_score_columns(scores, where).items():
        one = scores[[ID_COLUMN, column]].rename(columns={column: "score"})
        feats = cnn_features(metadata, one, where=f"{where} ({column})")
        parts.append(pd.concat([metadata[[ID_COLUMN]].astype(str).reset_index(drop=True),
                                pd.DataFrame({"fold": np.full(len(feats), fold, np.int64)}), feats], axis=1))
    return pd.concat(parts, ignore_index=True)


def paired_features(features: pd.DataFrame, fold_cnn: pd.DataFrame, fold: int, where: str) -> pd.DataFrame:
    """`features` (test, any CNN features) with its `cnn_*` columns replaced by CNN fold `fold`'s."""
    part = fold_cnn[fold_cnn["fold"] == fold].set_index(ID_COLUMN)
    if part.empty:
        raise PairingError(f"{where}: no test CNN features for CNN fold {fold} (folds there: "
                           f"{sorted(fold_cnn['fold'].unique().tolist())}); stack fold {fold} needs them")
    ids = features[ID_COLUMN].astype(str)
    missing = ids[~ids.isin(part.index)]
    if len(missing):
        raise PairingError(f"{where}: CNN fold {fold} scores no row for {len(missing)} test id(s), "
                           f"e.g. {missing.head(3).tolist()}")
    cols = [c for c in features.columns if c.startswith(CNN_PREFIX)]
    swapped = part.loc[ids, cols].reset_index(drop=True)
    return features.assign(**{c: swapped[c].to_numpy() for c in cols})


# ---- the fold files of the two halves ----------------------------------------------------------------


def _recorded_folds(path: Any) -> str | None:
    return read_json(path).get("folds") if path.is_file() else None


def check_fold_pairing(artifacts: ArtifactPaths, n_folds: int) -> None:
    """Refuse pairing unless stack fold k and CNN fold k were made from the same fold file, for every k
    (digests recorded in `stack/fold_k/inputs.json` and `cnn/fold_k/inputs.json`)."""
    for k in range(n_folds):
        stack_file, cnn_file = artifacts.stack_fold(k).inputs, artifacts.cnn_fold(k).inputs
        stack, cnn = _recorded_folds(stack_file), _recorded_folds(cnn_file)
        if stack is None or cnn is None:
            lacking = stack_file if stack is None else cnn_file
            raise PairingError(
                f"{lacking}: no fold-file record, so stack fold {k} cannot be paired with CNN fold {k}'s test "
                "scores (pairing needs both trained on one fold file). Retrain that stage here, or predict "
                "with pairing='mean' (every stack fold sees the mean CNN score: test features then have a "
                "narrower spread than training's)")
        if stack != cnn:
            raise PairingError(
                f"stack fold {k} ({stack_file}: folds {stack[:12]}...) and CNN fold {k} ({cnn_file}: folds "
                f"{cnn[:12]}...) were trained on different fold files, so CNN fold {k} is not the model that "
                f"never saw stack fold {k}'s rows; retrain the stacker on the CNN's fold file ({artifacts.folds})")


# ---- the measurement ---------------------------------------------------------------------------------


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
    from lesionstack.tabular.stack import fold_probabilities

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
