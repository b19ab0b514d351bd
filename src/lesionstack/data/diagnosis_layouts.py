"""The diagnosis readers of the three layouts (`read_diagnosis` picks one: `detect_layout`): ISIC 2024
(train-metadata.csv + HDF5), HAM10000 (HAM10000_metadata.csv + image folders) and ISIC Task 3 (a one-hot
ground-truth CSV + an image folder). Each returns a `data.diagnosis.DiagnosisData`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from lesionstack.data.diagnosis import (
    DROP,
    GROUP_COLUMN,
    HAM10000_CLASSES,
    HAM10000_METADATA,
    LABEL_COLUMN,
    LAYOUTS,
    DiagnosisData,
    DiagnosisDataError,
    FolderImages,
    LabelMap,
    _check_files_cover,
    _check_unique,
    _finish,
    _iddx_paths,
    _image_folders,
    _line_of,
    _read_csv_strings,
)
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.metadata import MetadataError, check_images_cover, read_metadata
from lesionstack.data.schema import ID_COLUMN, PATIENT_COLUMN
from lesionstack.paths import DataPaths

log = logging.getLogger(__name__)


def detect_layout(data_dir: str | os.PathLike[str]) -> str:
    """'isic2024', 'ham10000' or 'task3' from the files in `data_dir`."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DiagnosisDataError(f"{root}: data folder not found")
    if (root / HAM10000_METADATA).is_file():
        return "ham10000"
    paths = DataPaths(root)
    if paths.train_metadata.is_file() and paths.train_images.is_file():
        return "isic2024"
    if _task3_truth_files(root):
        return "task3"
    raise DiagnosisDataError(
        f"{root}: no diagnosis layout found: expected {paths.train_metadata.name} + {paths.train_images.name} "
        f"(ISIC 2024), {HAM10000_METADATA} + image folders (HAM10000), or a *GroundTruth*.csv + image folder "
        "(ISIC 2017-2019 Task 3)")


def read_diagnosis(data_dir: str | os.PathLike[str], layout: str = "auto", label_map: LabelMap | None = None
                   ) -> DiagnosisData:
    """Read the diagnosis labels of a data folder in any of the three layouts (`layout="auto"` detects it).
    `label_map` applies to ISIC 2024 only; HAM10000 and Task 3 bring their own classes."""
    if layout not in LAYOUTS:
        raise DiagnosisDataError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    layout = detect_layout(data_dir) if layout == "auto" else layout
    if layout == "isic2024":
        return read_isic2024(data_dir, label_map or LabelMap())
    if layout == "ham10000":
        return read_ham10000(data_dir)
    return read_task3(data_dir)


def read_isic2024(data_dir: str | os.PathLike[str], label_map: LabelMap) -> DiagnosisData:
    """`train-metadata.csv` (checked by `read_metadata`) + `train-image.hdf5`; classes from `iddx_full`, or
    from `iddx_1..5` joined where `iddx_full` is absent or empty; grouped by patient."""
    paths = DataPaths(data_dir)
    try:
        meta = read_metadata(paths.train_metadata, kind="train")
    except MetadataError as err:
        raise DiagnosisDataError(str(err)) from err
    diagnosis = _iddx_paths(meta, paths.train_metadata)
    class_of = {p: label_map.class_of(p) for p in pd.unique(diagnosis)}  # a few dozen distinct paths in 401k rows
    labels = np.array([class_of[p] for p in diagnosis], dtype=object)
    unmapped = np.flatnonzero(pd.isna(labels))
    if len(unmapped):
        i = unmapped[0]
        raise DiagnosisDataError(
            f"{paths.train_metadata}: column 'iddx_full' line {_line_of(i)} (isic_id {meta[ID_COLUMN][i]}): "
            f"diagnosis {diagnosis[i]!r} matches no entry of labels.mapping {sorted(label_map.mapping)} "
            f"({len(unmapped)} such row(s)); add its first level (or a longer prefix) to the config")
    keep = labels != DROP
    if (~keep).any():
        log.info("%s: %d row(s) mapped to '%s' (e.g. %r) left out", paths.train_metadata, int((~keep).sum()),
                 DROP, diagnosis[np.flatnonzero(~keep)[0]])
    table = pd.DataFrame({ID_COLUMN: meta[ID_COLUMN], GROUP_COLUMN: meta[PATIENT_COLUMN], LABEL_COLUMN: labels})
    images = H5Images(paths.train_images)
    table = table[keep].reset_index(drop=True)
    try:
        check_images_cover(table, set(images.ids), paths.train_metadata, images.path)
    except MetadataError as err:
        raise DiagnosisDataError(str(err)) from err
    return _finish(table, label_map.classes, images, "isic2024", paths.train_metadata, "patient")


def read_ham10000(data_dir: str | os.PathLike[str]) -> DiagnosisData:
    """`HAM10000_metadata.csv` (lesion_id, image_id, dx, ...) and its images, in `HAM10000_images_part_1/2`,
    one image folder, or beside the CSV; grouped by lesion."""
    root = Path(data_dir)
    path = root / HAM10000_METADATA
    table = read_ham10000_labels(path)
    images = FolderImages.scan(_image_folders(root), root)
    _check_files_cover(table, images, path, "image_id")
    return _finish(table, HAM10000_CLASSES, images, "ham10000", path, "lesion")


def read_ham10000_labels(path: Path) -> pd.DataFrame:
    """`HAM10000_metadata.csv` checked (ids filled, image_id unique, dx one of the seven classes) as
    `isic_id, group (lesion_id), label`."""
    raw = _read_csv_strings(path, ["lesion_id", "image_id", "dx"])
    _check_unique(raw, "image_id", path)
    dx = raw.get_column("dx").str.strip_chars().str.to_lowercase()
    bad = (~dx.is_in(list(HAM10000_CLASSES))).arg_true()
    if len(bad):
        i = bad[0]
        raise DiagnosisDataError(f"{path}: column 'dx' line {_line_of(i)} (image_id {raw['image_id'][i]}): "
                                 f"{raw['dx'][i]!r} is not one of {list(HAM10000_CLASSES)}")
    return pd.DataFrame({ID_COLUMN: raw["image_id"].to_list(), GROUP_COLUMN: raw["lesion_id"].to_list(),
                         LABEL_COLUMN: dx.to_list()})


def _task3_truth_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.csv") if "groundtruth" in p.name.lower().replace("_", ""))


def read_task3(data_dir: str | os.PathLike[str], truth_csv: str | os.PathLike[str] | None = None,
               groups_csv: str | os.PathLike[str] | None = None, implicit_class: str | None = None
               ) -> DiagnosisData:
    """ISIC 2017-2019 Task 3: a ground-truth CSV (an image column, then one 0/1 column per class) and an
    image folder. Exactly one class per row; ISIC 2017's CSV has no column for its third class (nevus), so
    a row of zeros is that class when `implicit_class` names it, else an error. A class column with no
    positive row (2019's UNK) is left out. Groups: `lesion_id` from `groups_csv` (ISIC 2018's
    LesionGroupings, ISIC 2019's training metadata; found beside the truth file when not given), else each
    image is its own group, with a warning (images of one lesion may then be split across folds)."""
    root = Path(data_dir)
    truth = Path(truth_csv) if truth_csv else _single(_task3_truth_files(root), root, "*GroundTruth*.csv")
    raw = _read_csv_strings(truth, None)  # every column must be filled
    id_col = raw.columns[0]
    _check_unique(raw, id_col, truth)
    onehot = _onehot(raw, raw.columns[1:], truth, id_col)
    classes = [c for c in raw.columns[1:] if onehot[c].sum() > 0]
    labels = onehot[classes].idxmax(axis=1).astype(object)
    none = np.flatnonzero(onehot.sum(axis=1).to_numpy() == 0).tolist()
    if none and implicit_class is None:
        i = none[0]
        raise DiagnosisDataError(f"{truth}: line {_line_of(i)} ({id_col} {raw[id_col][i]}): no class column is 1 "
                                 f"({len(none)} such row(s)); ISIC 2017's nevus rows need implicit_class")
    labels[onehot.sum(axis=1) == 0] = implicit_class
    if implicit_class is not None and implicit_class not in classes:
        classes.append(implicit_class)
    table = pd.DataFrame({ID_COLUMN: raw[id_col].to_list(), LABEL_COLUMN: labels.to_numpy()})
    table[GROUP_COLUMN], kind = _task3_groups(table[ID_COLUMN], root, truth, groups_csv)
    images = FolderImages.scan(_image_folders(root), root)
    _check_files_cover(table, images, truth, id_col)
    return _finish(table[[ID_COLUMN, GROUP_COLUMN, LABEL_COLUMN]], tuple(classes), images, "task3", truth, kind)


def _single(found: list[Path], root: Path, pattern: str) -> Path:
    if len(found) != 1:
        raise DiagnosisDataError(f"{root}: expected exactly one {pattern}, found {[p.name for p in found]}")
    return found[0]


def _onehot(raw: pl.DataFrame, columns: list[str], path: Path, id_col: str) -> pd.DataFrame:
    """The class columns as 0/1 integers; every row holds at most one 1."""
    out = {}
    for col in columns:
        values = raw.get_column(col).str.strip_chars().cast(pl.Float64, strict=False)
        bad = (values.is_null() | ~values.is_in([0.0, 1.0])).arg_true()
        if len(bad):
            i = bad[0]
            raise DiagnosisDataError(f"{path}: column '{col}' line {_line_of(i)} ({id_col} {raw[id_col][i]}): "
                                     f"value {raw[col][i]!r} is not 0 or 1")
        out[col] = values.cast(pl.Int64).to_numpy()
    frame = pd.DataFrame(out)
    several = np.flatnonzero(frame.sum(axis=1).to_numpy() > 1).tolist()
    if len(several):
        i = several[0]
        raise DiagnosisDataError(f"{path}: line {_line_of(i)} ({id_col} {raw[id_col][i]}): more than one class "
                                 f"column is 1 ({[c for c in columns if frame[c][i]]})")
    return frame


def _task3_groups(ids: pd.Series, root: Path, truth: Path, groups_csv: str | os.PathLike[str] | None
                  ) -> tuple[pd.Series, str]:
    candidates = [Path(groups_csv)] if groups_csv else [
        p for p in sorted(root.glob("*.csv")) if p != truth and ("group" in p.name.lower() or "metadata" in
                                                                 p.name.lower())]
    for path in candidates:
        raw = pl.read_csv(path, infer_schema=False, null_values=[""]) if path.is_file() else None
        if raw is None or "lesion_id" not in raw.columns:
            if groups_csv:
                raise DiagnosisDataError(f"{path}: needs an image column and 'lesion_id'")
            continue
        id_col = raw.columns[0]
        lesion = dict(zip(raw[id_col].to_list(), raw["lesion_id"].to_list()))
        groups = pd.Series([lesion.get(i) or f"image:{i}" for i in ids])  # no lesion_id: its own group
        return groups, "lesion"
    log.warning("%s: no lesion groupings file; every image is its own group, so images of one lesion may "
                "land in different folds", truth)
    return ids.copy(), "image"
