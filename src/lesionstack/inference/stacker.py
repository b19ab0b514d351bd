"""Scoring a test table with a trained stacker: the one path `predict`, `run` and the Kaggle kernel share.

    scores = score_table(artifacts, test_metadata, cnn_scores)   # DataFrame[isic_id, score]

`cnn_scores` is the CNN fold models' test table (`trained.scorer.FoldScorer.score_hdf5(..., per_fold=True)`:
the mean `score` and one `score_fold_<k>` per fold), as `predict` scores it now or as `train-cnn` wrote it
(`test_cnn.parquet`, through the same scorer). The same feature function as in training builds the table;
stack fold k scores with CNN fold k's features (`tabular.pairing`). Rows whose CNN score is NaN (an
unreadable crop) are scored by the stacker's tabular-only variant; without one they get the median CNN
score, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths

log = logging.getLogger(__name__)


def uses_cnn(cv: dict[str, Any] | None) -> bool:
    """The stacker of this cv.json was trained with CNN features."""
    return bool(cv and cv.get("with_cnn"))


def has_tabular_variant(cv: dict[str, Any] | None) -> bool:
    """The stacker also trained models without CNN features (they score rows whose crop failed)."""
    return uses_cnn(cv) and "tabular" in cv.get("models", {})  # type: ignore[union-attr]


def score_table(artifacts: ArtifactPaths, metadata: pd.DataFrame, cnn_scores: pd.DataFrame | None = None,
                where: str = "test metadata") -> pd.DataFrame:
    """DataFrame[isic_id, score] from the stacker's fold models on `metadata` (+ `cnn_scores` when the stacker
    uses CNN features); see the module docstring."""
    from lesionstack.tabular.features import build_features, fill_unscored
    from lesionstack.tabular.pairing import fold_cnn_features, fold_score_columns
    from lesionstack.tabular.stack_predict import predict_stack

    if not artifacts.cv_json.is_file():
        raise FileNotFoundError(f"{artifacts.cv_json}: no trained stacker in {artifacts.root} "
                                "(run train-stack first)")
    cv = read_json(artifacts.cv_json)
    if not uses_cnn(cv):
        return predict_stack(build_features(metadata, None, where=where), artifacts)
    if cnn_scores is None:
        raise ValueError(f"{artifacts.cv_json}: the stacker uses CNN scores; pass cnn_scores")
    columns = ("score", *fold_score_columns(cnn_scores, f"{where}: cnn_scores").values())
    bad = ~np.isfinite(cnn_scores[list(columns)].to_numpy(dtype=np.float64)).all(axis=1)
    if bad.any() and not has_tabular_variant(cv):
        log.warning("%s: the stacker has no tabular-only variant (train_tabular off): %d unscored crop(s) "
                    "get the median CNN score", artifacts.root, int(bad.sum()))
    # a failed row's own CNN features are never used (tabular-only variant); the median keeps its
    # patient's features defined
    filled = fill_unscored(cnn_scores, where, columns)
    features = build_features(metadata, filled[[ID_COLUMN, "score"]], where=where)
    main = predict_stack(features, artifacts, fold_cnn=fold_cnn_features(metadata, filled, where))
    if not bad.any() or not has_tabular_variant(cv):
        return main
    tabular = predict_stack(features, artifacts, variant="tabular")
    failed = set(cnn_scores.loc[bad, ID_COLUMN].astype(str))
    use_tab = main[ID_COLUMN].isin(failed).to_numpy()
    log.warning("%d row(s) without a CNN score scored by the tabular-only stacker, e.g. %s",
                int(use_tab.sum()), sorted(failed)[:3])
    return main.assign(score=np.where(use_tab, tabular["score"].to_numpy(), main["score"].to_numpy()))
