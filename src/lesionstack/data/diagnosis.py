"""Multi-class diagnosis labels from the three layouts people have, and lesion- or patient-grouped folds.

    data = read_diagnosis("demo/data", label_map=LabelMap())      # ISIC 2024: train-metadata.csv + HDF5
    data = read_diagnosis("HAM10000/")                            # HAM10000_metadata.csv + image folders
    data = read_diagnosis("ISIC2018/")                            # Task 3 ground-truth CSV + image folder
    folds = diagnosis_folds(data.table, n_folds=5, seed=42)

Every reader returns the same `DiagnosisData`: a table of `isic_id, group, label, y` (the class index into
`classes`), an image reader with `read(id, min_side)` and where the labels came from. `group` is what folds
must keep together: the patient for ISIC 2024, the lesion for HAM10000 (several images per lesion: a classic
leak when folds split them) and for Task 3 when a lesion-groupings file is there.

ISIC 2024's diagnoses are "::" paths (`iddx_full`, e.g. "Malignant::Malignant epidermal proliferations::
Squamous cell carcinoma in situ", or its levels `iddx_1..5`). A `LabelMap` sends a path to a class by its
longest matching prefix (whole levels only), so "Malignant" catches every malignant diagnosis that no more
specific entry claims. The class "drop" removes the rows: ISIC 2024's Indeterminate lesions (no
histopathological verdict either way) are dropped by default; a config can give them their own class.
Errors name the file, the column and the CSV line (line 1 is the header), as `data.metadata` does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold

from lesionstack.data.decode import decode_image
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.metadata import MetadataError, check_images_cover, read_metadata
from lesionstack.data.schema import ID_COLUMN, PATIENT_COLUMN
from lesionstack.paths import DataPaths

log = logging.getLogger(__name__)

GROUP_COLUMN, LABEL_COLUMN, CLASS_COLUMN = "group", "label", "y"
TABLE_COLUMNS = [ID_COLUMN, GROUP_COLUMN, LABEL_COLUMN, CLASS_COLUMN]
PROB_PREFIX = "prob_"  # OOF and score tables: one probability column per class, prob_<class>
DROP = "drop"  # a LabelMap target that removes the rows
LAYOUTS = ("auto", "isic2024", "ham10000", "task3")

HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IDDX_LEVELS = tuple(f"iddx_{i}" for i in range(1, 6))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

DEFAULT_CLASSES = ("benign", "melanoma", "basal cell carcinoma", "squamous cell carcinoma", "other malignant")
DEFAULT_MAPPING = {
    "Benign": "benign",
    "Malignant": "other malignant",
    "Malignant::Malignant melanocytic proliferations (Melanoma)": "melanoma",
    "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma":
        "basal cell carcinoma",
    "Malignant::Malignant epidermal proliferations": "squamous cell carcinoma",
    "Indeterminate": DROP,
}


class DiagnosisDataError(ValueError):
    """Diagnosis labels or images that cannot be used; the message names the file, column and line."""


def _line_of(index: int) -> int:
    return index + 2  # CSV line: one for the header, one for 1-based counting


@dataclass
class LabelMap:
    """ISIC 2024 diagnosis paths -> classes: the longest prefix in `mapping` (whole "::" levels) wins."""

    classes: tuple[str, ...] = DEFAULT_CLASSES
    mapping: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MAPPING))

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise DiagnosisDataError(f"labels.classes must name at least two distinct classes, got {self.classes}")
        bad = {k: v for k, v in self.mapping.items() if v != DROP and v not in self.classes}
        if bad:
            raise DiagnosisDataError(f"labels.mapping sends {bad} to classes not in labels.classes "
                                     f"{list(self.classes)} (or '{DROP}')")

    def class_of(self, path: str) -> str | None:
        """The class of one diagnosis path, or None when no mapping entry is a prefix of it."""
        levels = [p.strip() for p in path.split("::")]
        for n in range(len(levels), 0, -1):
            found = self.mapping.get("::".join(levels[:n]))
            if found is not None:
                return found
        return None


class FolderImages:
    """Images stored as files (`<id>.jpg` / `.png`), with the `read` interface of `H5Images`."""

    def __init__(self, files: dict[str, Path], path: str | os.PathLike[str]) -> None:
        self.files = dict(files)
        self.path = Path(path)

    @classmethod
    def scan(cls, folders: list[Path], root: Path) -> FolderImages:
        """Every image file in `folders` (not recursive), keyed by its name without the suffix."""
        files: dict[str, Path] = {}
        for folder in folders:
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and not f.stem.endswith("_segmentation"):
                    files.setdefault(f.stem, f)
        return cls(files, root)

    @property
    def ids(self) -> list[str]:
        return sorted(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def read_bytes(self, image_id: str) -> bytes:
        try:
            return self.files[image_id].read_bytes()
        except KeyError as err:
            raise KeyError(f"{self.path}: no image file for '{image_id}'") from err

    def read(self, image_id: str, min_side: int | None = None, max_side: int | None = None) -> np.ndarray:
        """One image as (H, W, 3) uint8 RGB, decoded as the HDF5 crops are (`decode_image`: JPEGs at a reduced
        DCT scale, PNG and others through Pillow, both under the same pixel limits)."""
        return decode_image(self.read_bytes(image_id), min_side=min_side, max_side=max_side, where=image_id,
                            path=self.files[image_id])

    def __repr__(self) -> str:
        return f"FolderImages({str(self.path)!r}, {len(self.files)} files)"


@dataclass
class DiagnosisData:
    """Labels of one data set: `table` (isic_id, group, label, y), the classes, the images, the source."""

    table: pd.DataFrame
    classes: tuple[str, ...]
    images: H5Images | FolderImages
    layout: str
    labels_file: Path
    group_kind: str  # what `group` holds: "patient", "lesion" or "image"

    def counts(self) -> pd.Series:
        """Rows per class, in class order."""
        return self.table[LABEL_COLUMN].value_counts().reindex(list(self.classes), fill_value=0)


# ---- readers ------------------------------------------------------------------------------------------


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


def read_iddx_classes(path: str | os.PathLike[str], label_map: LabelMap) -> pd.Series:
    """isic_id -> class index (into `label_map.classes`) of every row of an ISIC 2024 `train-metadata.csv`,
    from its iddx columns (as `read_isic2024`), reading only those columns. -1 where the mapping says
    "drop" (Indeterminate) or no entry matches: such rows have no class and are not given one."""
    path = Path(path)
    wanted = {ID_COLUMN, "iddx_full", *IDDX_LEVELS}
    try:
        meta = pd.read_csv(path, usecols=lambda c: c in wanted, dtype=str)
    except (OSError, ValueError) as err:
        raise DiagnosisDataError(f"{path}: cannot read the diagnosis columns ({err})") from err
    if ID_COLUMN not in meta.columns:
        raise DiagnosisDataError(f"{path}: missing required column '{ID_COLUMN}'")
    if meta[ID_COLUMN].duplicated().any():
        i = int(np.flatnonzero(meta[ID_COLUMN].duplicated())[0])
        raise DiagnosisDataError(f"{path}: column '{ID_COLUMN}' line {_line_of(i)}: duplicate '{meta[ID_COLUMN][i]}'")
    diagnosis = _iddx_paths(meta, path)
    index = {c: k for k, c in enumerate(label_map.classes)}
    class_of = {p: index.get(label_map.class_of(p) or DROP, -1) for p in pd.unique(diagnosis)}
    y = pd.Series([class_of[p] for p in diagnosis], index=meta[ID_COLUMN].to_numpy(), dtype=np.int64)
    unmapped = sorted({p for p in class_of if label_map.class_of(p) is None})
    log.info("%s: diagnosis classes %s; %d row(s) without a class (dropped%s)", path,
             {c: int((y == k).sum()) for c, k in index.items()}, int((y < 0).sum()),
             f"; unmapped, e.g. {unmapped[0]!r}" if unmapped else "")
    return y


def _iddx_paths(meta: pd.DataFrame, path: Path) -> np.ndarray:
    """One "::" diagnosis path per row: iddx_full, else the iddx_1..5 levels joined; checked to agree."""
    levels = [c for c in IDDX_LEVELS if c in meta.columns]
    if "iddx_full" not in meta.columns and "iddx_1" not in meta.columns:
        raise DiagnosisDataError(f"{path}: no diagnosis column: needs 'iddx_full' or 'iddx_1'..'iddx_5'")
    full = meta["iddx_full"] if "iddx_full" in meta.columns else pd.Series([None] * len(meta))
    out = full.fillna("").astype(str).str.strip().to_numpy(dtype=object)
    missing = np.flatnonzero(out == "")
    if len(missing) and levels:  # join the levels only where iddx_full is empty (row-wise: slow at 401k)
        out[missing] = meta.iloc[missing][levels].apply(
            lambda r: "::".join(str(v).strip() for v in r if pd.notna(v) and str(v).strip()), axis=1).to_numpy()
    empty = np.flatnonzero(out == "")
    if len(empty):
        i = empty[0]
        raise DiagnosisDataError(f"{path}: column 'iddx_full' line {_line_of(i)} (isic_id {meta[ID_COLUMN][i]}): "
                                 f"no diagnosis (iddx_full and iddx_1..5 empty; {len(empty)} such row(s))")
    if "iddx_1" in meta.columns:
        first = meta["iddx_1"].fillna("").astype(str).str.strip().to_numpy()
        top = np.array([p.split("::")[0].strip() for p in out], dtype=object)
        bad = np.flatnonzero((first != "") & (first != top))
        if len(bad):
            i = bad[0]
            raise DiagnosisDataError(
                f"{path}: column 'iddx_1' line {_line_of(i)} (isic_id {meta[ID_COLUMN][i]}): {first[i]!r} "
                f"disagrees with the first level of iddx_full {out[i]!r}")
    return out


def _read_csv_strings(path: Path, required: list[str] | None) -> pl.DataFrame:
    """All columns as strings; `required` (None: all) must exist and be filled on every line."""
    if not path.is_file():
        raise DiagnosisDataError(f"{path}: file not found")
    try:
        raw = pl.read_csv(path, infer_schema=False, null_values=[""])
    except pl.exceptions.PolarsError as err:
        raise DiagnosisDataError(f"{path}: not a readable CSV ({err})") from err
    required = raw.columns if required is None else required
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise DiagnosisDataError(f"{path}: missing required column(s) {missing}; has {raw.columns}")
    for col in required:
        empty = raw.get_column(col).is_null().arg_true()
        if len(empty):
            raise DiagnosisDataError(f"{path}: column '{col}' is empty at line {_line_of(empty[0])}")
    return raw


def _check_unique(raw: pl.DataFrame, col: str, path: Path) -> None:
    dup = raw.get_column(col).is_duplicated().arg_true().to_list()
    if dup:
        value = raw[col][dup[0]]
        lines = [_line_of(i) for i in dup if raw[col][i] == value]
        raise DiagnosisDataError(f"{path}: column '{col}' has duplicate value '{value}' at lines {lines}")


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


def _image_folders(root: Path) -> list[Path]:
    """HAM10000_images_part_1/2 (or any subfolders holding images), else `root` itself."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    with_images = [d for d in subdirs if any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())]
    return with_images or [root]


def _check_files_cover(table: pd.DataFrame, images: FolderImages, labels_file: Path, column: str) -> None:
    missing = np.flatnonzero(~table[ID_COLUMN].isin(set(images.files)).to_numpy())
    if len(missing):
        i = missing[0]
        raise DiagnosisDataError(
            f"{labels_file}: column '{column}' line {_line_of(i)}: '{table[ID_COLUMN][i]}' has no image file "
            f"(.jpg/.png) in {images.path} or its image folders ({len(missing)} of {len(table)} have none)")


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


def _finish(table: pd.DataFrame, classes: tuple[str, ...], images: H5Images | FolderImages, layout: str,
            labels_file: Path, group_kind: str) -> DiagnosisData:
    """Add the class index; every class of `classes` must have rows."""
    counts = table[LABEL_COLUMN].value_counts()
    empty = [c for c in classes if counts.get(c, 0) == 0]
    if empty:
        raise DiagnosisDataError(f"{labels_file}: class(es) {empty} have no rows; remove them from the classes "
                                 "(labels.classes in the config) or map some diagnoses to them")
    index = {c: k for k, c in enumerate(classes)}
    table = table.assign(**{CLASS_COLUMN: table[LABEL_COLUMN].map(index).astype(np.int64)})
    table[GROUP_COLUMN] = table[GROUP_COLUMN].astype(str)
    return DiagnosisData(table[TABLE_COLUMNS].reset_index(drop=True), tuple(classes), images, layout,
                         labels_file, group_kind)


# ---- folds --------------------------------------------------------------------------------------------

FOLD_TABLE_COLUMNS = [ID_COLUMN, GROUP_COLUMN, LABEL_COLUMN, "fold"]


def diagnosis_folds(table: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """`isic_id, group, label, fold` for every row: no group in two folds, stratified on the class
    (scikit-learn's StratifiedGroupKFold, which stratifies under shuffle since 1.8), every class in every
    fold (checked)."""
    groups_per_class = table.groupby(LABEL_COLUMN)[GROUP_COLUMN].nunique()
    few = groups_per_class[groups_per_class < n_folds]
    if len(few):
        raise DiagnosisDataError(f"{n_folds} folds need every class in at least {n_folds} groups; "
                                 f"{few.to_dict()} (class: groups) have fewer")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(table), dtype=np.int8)
    for k, (_, val) in enumerate(splitter.split(table, table[LABEL_COLUMN], table[GROUP_COLUMN])):
        fold[val] = k
    folds = table[[ID_COLUMN, GROUP_COLUMN, LABEL_COLUMN]].reset_index(drop=True).assign(fold=fold)
    check_diagnosis_folds(folds, n_folds)
    return folds


def check_diagnosis_folds(folds: pd.DataFrame, n_folds: int) -> None:
    """Raise unless every row is in one of folds 0..K-1, no group is in two folds, every class in every fold."""
    if folds[ID_COLUMN].duplicated().any():
        raise DiagnosisDataError(f"'{folds.loc[folds[ID_COLUMN].duplicated(), ID_COLUMN].iloc[0]}' is in more "
                                 "than one fold row")
    used = sorted(int(f) for f in folds["fold"].unique())
    if used != list(range(n_folds)):
        raise DiagnosisDataError(f"expected folds 0..{n_folds - 1}, found {used}")
    per_group = folds.groupby(GROUP_COLUMN)["fold"].nunique()
    if (per_group > 1).any():
        raise DiagnosisDataError(f"group '{per_group[per_group > 1].index[0]}' is in more than one fold")
    present = pd.crosstab(folds[LABEL_COLUMN], folds["fold"])
    if (present == 0).to_numpy().any():
        cls, fold = next((c, f) for c in present.index for f in present.columns if present.loc[c, f] == 0)
        raise DiagnosisDataError(f"class '{cls}' has no row in fold {fold}; try another fold seed")
