"""Multi-class diagnosis labels from the three layouts people have, and lesion- or patient-grouped folds.

    from lesionstack.data.diagnosis_layouts import read_diagnosis
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

from lesionstack.config import Invalid, check_fields
from lesionstack.data.decode import decode_image
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.schema import ID_COLUMN

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
        check_fields(self)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise Invalid("classes", "a list of at least two distinct class names", list(self.classes))
        bad = {k: v for k, v in self.mapping.items() if v != DROP and v not in self.classes}
        if bad:
            raise Invalid("mapping", "", text=f"sends {bad} to classes not in labels.classes "
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


# ---- what the readers share (`data.diagnosis_layouts`) ---------------------------------------------


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
