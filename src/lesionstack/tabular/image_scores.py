"""How the CNN's scores enter the stacker, as the 1st place of ISIC 2024 handled its image models' scores.

- `standardise`: each fold model's scores on one scale. Every training row's score comes from one CNN fold
  model (out-of-fold), and the models differ in calibration; stack fold k learns from four models' scores
  and is applied to a fifth's. Each model's scores become z-scores of their logit, with the mean and
  standard deviation of that model's own out-of-fold scores (`standard_scales`); a test score of CNN fold
  k (paired with stack fold k) is mapped with fold k's scale, never with statistics of the test rows.
  Within a patient every score comes from one model (folds group patients), so the within-patient
  features (z-score, rank) do not change; `cnn_score` does, and the ratio to the patient's mean stays on
  the probability (a ratio of z-scores around 0 means nothing).
- `add_noise`: Gaussian noise on the training rows' CNN features, `sigma` times each column's standard
  deviation over those rows, so that the GBDTs do not over-trust out-of-fold scores that are cleaner than a
  test score will be. Seeded; applied only when fitting, never to rows that are scored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

SCORE_COLUMN = "cnn_score"  # tabular.features.CNN_PREFIX + "score"
LOGIT_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def standard_scales(scores: np.ndarray, folds: np.ndarray) -> dict[str, list[float]]:
    """{fold: [mean, std]} of the logit of each CNN fold model's out-of-fold scores, and "all": the pooled
    scale (for test scores that are a mean over fold models). JSON-safe, saved beside the stacker."""
    z = logit(scores)
    out = {str(int(k)): [float(z[folds == k].mean()), float(z[folds == k].std())] for k in np.unique(folds)}
    out["all"] = [float(z.mean()), float(z.std())]
    return out


def standardise(scores: np.ndarray, scale: Iterable[float]) -> np.ndarray:
    """z-scores of `scores`' logits under one model's (mean, std)."""
    mean, std = scale
    return (logit(scores) - mean) / (std if std > 0 else 1.0)


def standardise_oof(features: pd.DataFrame, folds: np.ndarray, scales: dict[str, list[float]]) -> pd.DataFrame:
    """`features` (training rows, fold-file order) with `cnn_score` standardised by each row's CNN fold."""
    out = features.copy()
    raw = out[SCORE_COLUMN].to_numpy(dtype=np.float64)
    z = np.empty(len(out), dtype=np.float64)
    for k in np.unique(folds):
        rows = folds == k
        z[rows] = standardise(raw[rows], scales[str(int(k))])
    out[SCORE_COLUMN] = z.astype(out[SCORE_COLUMN].dtype)
    return out


def standardise_rows(features: pd.DataFrame, scale: Iterable[float]) -> pd.DataFrame:
    """`features` with `cnn_score` standardised under one scale (test rows paired with one CNN fold)."""
    out = features.copy()
    out[SCORE_COLUMN] = standardise(out[SCORE_COLUMN].to_numpy(), scale).astype(out[SCORE_COLUMN].dtype)
    return out


def add_noise(X: pd.DataFrame, columns: list[str], sigma: float, seed: int | list[int]) -> pd.DataFrame:
    """`X` with N(0, (sigma * column std)^2) added to each of `columns` (training rows only: see the module
    doc). The same seed gives the same noise; sigma 0 returns `X` unchanged."""
    if sigma <= 0 or not columns:
        return X
    rng = np.random.default_rng(seed)
    out = X.copy()
    for col in columns:
        values = out[col].to_numpy(dtype=np.float64)
        out[col] = (values + rng.normal(0.0, sigma * float(values.std()), len(values))).astype(out[col].dtype)
    return out


def standardise_training(features: pd.DataFrame, oof_cnn: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """(training features with `cnn_score` standardised per CNN fold model, the scales to save): `features`
    and `oof_cnn` (isic_id, fold, score) in the same row order (the fold file's)."""
    scales = standard_scales(oof_cnn["score"].to_numpy(), oof_cnn["fold"].to_numpy())
    return standardise_oof(features, oof_cnn["fold"].to_numpy(), scales), scales


def standardise_test(features: pd.DataFrame, scales: dict[str, list[float]], fold: int | None) -> pd.DataFrame:
    """Test features whose `cnn_score` is CNN fold `fold`'s (paired), or the mean over folds (`fold` None:
    the pooled scale), standardised as that model's training rows were."""
    return standardise_rows(features, scales["all" if fold is None else str(fold)])
