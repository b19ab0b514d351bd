"""Predict the test set from trained artifacts and write a validated `submission.csv` (packaging for
the offline Kaggle kernel is `inference/package.py`).

`predict` needs only `test-image.hdf5` and `test-metadata.csv` (the 44 test columns): the CNN fold models
score every crop, the same feature function as in training builds the table, the stacker's fold models
score it. Nothing is written unless the submission passes `validate_submission`, and then atomically.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack.data.hdf5 import list_ids
from lesionstack.data.metadata import check_images_cover, id_mismatch, read_metadata
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import atomic_path
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.provenance import warn_if_synthetic

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = [ID_COLUMN, "target"]


class SubmissionError(ValueError):
    """A submission that Kaggle would reject or score wrongly."""


def validate_submission(sub: pd.DataFrame, test_ids: Sequence[str]) -> None:
    """Header `isic_id,target`, exactly one row per test id and no other id, values finite in [0, 1]."""
    if list(sub.columns) != SUBMISSION_COLUMNS:
        raise SubmissionError(f"submission header is {list(sub.columns)}, expected {SUBMISSION_COLUMNS}")
    if why := id_mismatch(sub[ID_COLUMN], test_ids):
        raise SubmissionError(f"submission ids must be the test set's, each once: {why}")
    values = pd.to_numeric(sub["target"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise SubmissionError(f"{int(bad.sum())} target value(s) not finite in [0, 1], "
                              f"first {sub['target'].iloc[i]} for '{sub[ID_COLUMN].iloc[i]}'")


def write_submission(scores: pd.DataFrame, test_ids: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write `scores` (isic_id, score) as a submission in test-id order, after validating it."""
    sub = scores.rename(columns={"score": "target"})[[ID_COLUMN, "target"]].astype({ID_COLUMN: str})
    validate_submission(sub, test_ids)
    order = pd.Series(range(len(test_ids)), index=list(map(str, test_ids)))
    sub = sub.iloc[order[sub[ID_COLUMN]].argsort()]  # the test metadata's order, like sample_submission
    with atomic_path(path) as tmp:
        sub.to_csv(tmp, index=False, float_format="%.8g", lineterminator="\n")
    return Path(path)


# ---- prediction ---------------------------------------------------------------------------------------


def predict(data_dir: str | os.PathLike[str], artifacts_dir: str | os.PathLike[str],
            out: str | os.PathLike[str], device: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Score test-metadata.csv + test-image.hdf5 with trained artifacts; write a validated submission.

    A test crop that cannot be read or decoded never stops it: its row is scored by the stacker's
    tabular-only variant (see `Predictor.predict_table`), and the summary line counts it."""
    from lesionstack.inference.package import check_versions
    from lesionstack.inference.predictor import Predictor
    from lesionstack.tabular.drift import read_drift_warnings

    data, art = DataPaths(data_dir), ArtifactPaths(artifacts_dir)
    if not art.cv_json.is_file():
        raise FileNotFoundError(f"{art.cv_json}: no trained stacker in {art.root} (run train-stack first)")
    for line in check_versions(art):
        print(f"warning: {line}; the models are in that library's own format, so they load, "
              "but their scores may differ slightly")
    warn_if_synthetic(art.root)  # a demo model's submission must not be read as a real one
    meta = read_metadata(data.test_metadata, kind="test")
    drift = read_drift_warnings(meta, art.features_ranges, str(data.test_metadata))
    for line in drift:  # values the models never saw move scores: say which column, how many rows
        log.warning(line)
    ids = meta[ID_COLUMN].tolist()
    predictor = Predictor.load(art.root, device=device, progress=progress)
    cnn_scores, summary = None, f"predict: {len(ids)} test rows"
    if predictor.stacker_uses_cnn:
        # the file's keys as a set only for this check, and no HDF5 handle left open (with its key index)
        # while the loader workers are forked
        check_images_cover(meta, set(list_ids(data.test_images).astype(str).tolist()), data.test_metadata,
                           data.test_images)
        start = time.perf_counter()
        cnn_scores = predictor.score_hdf5(data.test_images, ids, per_fold=True)  # stack fold k pairs with CNN fold k
        rate = len(ids) / max(time.perf_counter() - start, 1e-9)
        failed = int(cnn_scores["score"].isna().sum())
        print(f"CNN scored {len(ids)} test crops with {len(predictor.folds)} fold models: {rate:.0f} crops/s")
        summary += (f", {len(ids) - failed} CNN-scored with {len(predictor.folds)} fold models ({rate:.0f} crops/s)"
                    f", {failed} unreadable crop(s) scored "
                    f"{'tabular-only' if predictor.has_tabular_variant else 'with the median CNN score'}"
                    ", stack fold k on CNN fold k's scores")
    scores = predictor.predict_table(meta, cnn_scores, where=str(data.test_metadata))
    write_submission(scores, ids, out)
    for line in drift:
        print(f"warning: {line}")
    if drift:
        summary += f", {len(drift)} input warning(s) above (what may have moved the scores)"
    print(f"{summary} -> {out}")
    scores.attrs["input_warnings"] = drift
    return scores
