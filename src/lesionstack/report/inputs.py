"""Read every artifact the report draws on; a missing optional piece becomes a note, never a crash.

Only `cv.json` and `oof_stack.parquet` are required. Everything else (folds, CNN and segmenter metrics,
feature importance, the images, the demo truth) is optional: when it is absent or unreadable the page says
so in a visible note and leaves that section out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths, DataPaths

T = TypeVar("T")

# Model name in cv.json -> its score column in oof_stack.parquet.
MODEL_COLUMNS: dict[str, str] = {
    "blend": "score",
    "lgbm": "score_lgbm",
    "catboost": "score_catboost",
    "xgboost": "score_xgboost",
    "tabular": "score_tabular",
    "cnn": "score_cnn",
}
MODEL_LABELS: dict[str, str] = {
    "blend": "Stacked blend",
    "lgbm": "LightGBM",
    "catboost": "CatBoost",
    "xgboost": "XGBoost",
    "tabular": "Tabular only",
    "cnn": "CNN alone",
}
OOF_REQUIRED = ("isic_id", "fold", "target", "score")


class ReportError(ValueError):
    """A required report input is missing or malformed (the message names the file, key/column and row)."""


@dataclass
class ReportInputs:
    """Everything loaded from one artifacts root. `oof` carries a `patient_id` column when one was found."""

    paths: ArtifactPaths
    cv: dict[str, Any]
    oof: pd.DataFrame
    data_dir: Path | None = None
    importance: pd.DataFrame | None = None
    cnn_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    segmenter_metrics: dict[str, Any] | None = None
    demo_truth: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        """Models present both in cv.json and as a score column of the OOF table, in a fixed order."""
        return [m for m, col in MODEL_COLUMNS.items() if m in self.cv["models"] and col in self.oof]

    @property
    def oof_models(self) -> list[str]:
        """Models with a score column in the OOF table (whether or not cv.json lists them)."""
        return [m for m, col in MODEL_COLUMNS.items() if col in self.oof]


def load_inputs(artifacts_root: str | Path, data_dir: str | Path | None = None) -> ReportInputs:
    """Load the report's inputs from `artifacts_root` (and the data folder, if one can be found)."""
    paths = ArtifactPaths(Path(artifacts_root))
    notes: list[str] = []
    cv = read_cv(paths.cv_json)
    oof = read_oof_stack(paths.oof_stack)
    oof = add_cnn_scores(oof, paths.oof_cnn, notes)
    found_dir = _find_data_dir(paths, data_dir, notes)
    oof = _add_patients(oof, paths.folds, found_dir, notes)
    inputs = ReportInputs(paths=paths, cv=cv, oof=oof, data_dir=found_dir, notes=notes)
    importance = _csv_reader("model", "fold", "feature", "importance")
    inputs.importance = _optional(paths.feature_importance, importance, "feature importance", notes)
    inputs.cnn_metrics = _read_cnn_metrics(paths, int(cv["n_folds"]), notes)
    inputs.segmenter_metrics = _optional(paths.segmenter.metrics, read_json, "segmenter metrics", notes)
    if found_dir is not None and DataPaths(found_dir).demo_truth.exists():
        truth = _csv_reader("isic_id", "split", "target", "probability")
        inputs.demo_truth = _optional(DataPaths(found_dir).demo_truth, truth, "demo truth", notes)
    return inputs


# ---- required inputs -----------------------------------------------------------------------------------


def read_cv(path: Path) -> dict[str, Any]:
    """cv.json, checked for the keys the report uses."""
    if not path.exists():
        raise ReportError(f"{path}: not found; run `lesionstack train-stack` first (cv.json is required)")
    try:
        cv = read_json(path)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from err
    for key in ("n_folds", "models"):
        if key not in cv:
            raise ReportError(f"{path}: missing key {key!r}")
    for name, entry in cv["models"].items():
        for key in ("pauc", "auc"):
            values = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(values, list) or len(values) != cv["n_folds"]:
                raise ReportError(f"{path}: models.{name}.{key} must be a list of {cv['n_folds']} fold values")
    return cv


def read_oof_stack(path: Path) -> pd.DataFrame:
    """oof_stack.parquet, checked: required columns, 0/1 targets, finite scores, unique ids."""
    if not path.exists():
        raise ReportError(f"{path}: not found; run `lesionstack train-stack` first (OOF scores are required)")
    oof = pd.read_parquet(path)
    missing = [c for c in OOF_REQUIRED if c not in oof]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing}; has {list(oof.columns)}")
    bad_target = ~oof["target"].isin([0, 1])
    if bad_target.any():
        row = int(np.flatnonzero(bad_target.to_numpy())[0])
        raise ReportError(f"{path}: column 'target' row {row} is {oof['target'].iloc[row]!r}; expected 0 or 1")
    for col in [c for c in oof.columns if c == "score" or c.startswith("score_")]:
        bad = ~np.isfinite(oof[col].to_numpy(dtype=float))
        if bad.any() and col != "score_cnn":  # a stack without CNN features may leave score_cnn empty
            row = int(np.flatnonzero(bad)[0])
            raise ReportError(f"{path}: column {col!r} row {row} is not a finite number")
    dup = oof["isic_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise ReportError(f"{path}: column 'isic_id' row {row} repeats {oof['isic_id'].iloc[row]!r}")
    oof["target"] = oof["target"].astype(int)
    oof["fold"] = oof["fold"].astype(int)
    return oof


# ---- optional inputs -----------------------------------------------------------------------------------


def _optional(path: Path, reader: Callable[[Path], T], what: str, notes: list[str]) -> T | None:
    """`reader(path)`, or None with a note when the file is missing or unreadable."""
    if not path.exists():
        notes.append(f"No {what}: {path} does not exist.")
        return None
    try:
        return reader(path)
    except (OSError, ValueError, KeyError) as err:
        notes.append(f"Could not read {what} from {path}: {err}")
        return None


def add_cnn_scores(oof: pd.DataFrame, oof_cnn: Path, notes: list[str]) -> pd.DataFrame:
    """Fill `score_cnn` from oof_cnn.parquet when the stack did not carry it."""
    if "score_cnn" in oof and oof["score_cnn"].notna().all():
        return oof
    if not oof_cnn.exists():
        notes.append(f"No CNN scores: neither oof_stack.parquet's score_cnn nor {oof_cnn} is present.")
        return oof.drop(columns=["score_cnn"], errors="ignore")
    cnn = pd.read_parquet(oof_cnn, columns=["isic_id", "score"]).rename(columns={"score": "score_cnn"})
    merged = oof.drop(columns=["score_cnn"], errors="ignore").merge(cnn, on="isic_id", how="left")
    if merged["score_cnn"].isna().any():
        notes.append(f"{oof_cnn} lacks {int(merged['score_cnn'].isna().sum())} OOF ids; CNN curves left out.")
        return merged.drop(columns=["score_cnn"])
    return merged


def _find_data_dir(paths: ArtifactPaths, data_dir: str | Path | None, notes: list[str]) -> Path | None:
    """DATA if given, else source.json's data_dir (relative paths resolve against the artifacts)."""
    if data_dir is not None:
        return Path(data_dir)
    if not paths.source.exists():
        notes.append(f"No data folder: name it (`lesionstack report DATA`) or write {paths.source}; the image "
                     "montage is left out.")
        return None
    raw = Path(read_json(paths.source)["data_dir"])
    for candidate in (raw, paths.root / raw):
        if candidate.exists():
            return candidate
    notes.append(f"The data folder {raw} named in {paths.source} does not exist here; images left out.")
    return None


def _add_patients(oof: pd.DataFrame, folds: Path, data_dir: Path | None, notes: list[str]) -> pd.DataFrame:
    """Attach patient_id (from folds.csv, else the training metadata) for the patient-level bootstrap."""
    sources = [folds] + ([DataPaths(data_dir).train_metadata] if data_dir is not None else [])
    for src in sources:
        if src.exists():
            ids = pd.read_csv(src, usecols=["isic_id", "patient_id"])
            merged = oof.drop(columns=["patient_id"], errors="ignore").merge(ids, on="isic_id", how="left")
            if merged["patient_id"].notna().all():
                return merged
            notes.append(f"{src} lacks patient_id for {int(merged['patient_id'].isna().sum())} OOF rows.")
    notes.append("No patient ids found (folds.csv or train metadata): the bootstrap resamples lesions instead.")
    return oof


def _csv_reader(*columns: str) -> Callable[[Path], pd.DataFrame]:
    """A CSV reader that insists on `columns`."""

    def read(path: Path) -> pd.DataFrame:
        frame = pd.read_csv(path)
        missing = [c for c in columns if c not in frame]
        if missing:
            raise ValueError(f"missing column(s) {missing}")
        return frame

    return read


def _read_cnn_metrics(paths: ArtifactPaths, n_folds: int, notes: list[str]) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for k in range(n_folds):
        got = _optional(paths.cnn_fold(k).metrics, read_json, f"CNN fold {k} metrics", notes)
        if got is not None and got.get("epochs"):
            found[k] = got
    if not found:  # one note for the whole section instead of one per fold
        notes[:] = [n for n in notes if not n.startswith("No CNN fold")]
        notes.append(f"No CNN training curves: no {paths.cnn_dir}/fold_k/metrics.json was found.")
    return found


def selection_caveat(cv: dict[str, Any]) -> str | None:
    """One sentence for the summary and the report, or None when nothing was chosen on the scored folds."""
    selection = cv.get("selection") or {}
    reasons = []
    if selection.get("tuned_on_same_folds"):
        reasons.append("the stacker's parameters or blend weights were tuned on these same folds")
    if selection.get("cnn_epoch_selected_on_scored_fold"):
        reasons.append("each CNN fold's epoch was picked by the pAUC of the fold it scores (keep: best)")
    if not reasons:
        return None
    return "caveat: optimistic scores: " + "; ".join(reasons) + " (cv.json selection)"
