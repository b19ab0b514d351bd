"""External training images from the ISIC Archive, in the layout `isic-cli image download` writes.

`isic image download --search '...' OUTDIR` (isic-cli 12.x, the archive's own client) writes into OUTDIR:

- one image per record, `<isic_id>.JPG` (`isic_cli/io/http.py`, `download_image`);
- `metadata.csv`: the columns `isic_id, attribution, copyright_license`, then the union of the records'
  acquisition and clinical fields, sorted by name (`isic_cli/cli/utils.py`, `_extract_metadata`);
- `attribution.txt` and `licenses/` (not read here).

The diagnosis fields are those of the archive's schema package `isic-metadata` (6.x,
`isic_metadata/metadata.py`): the hierarchical diagnosis is exposed as `diagnosis_1` .. `diagnosis_5`, whose
first level `diagnosis_1` is one of `Benign`, `Malignant`, `Indeterminate`
(`isic_metadata/diagnosis_hierarchical.py`); `benign_malignant` (`benign`, `malignant`, `indeterminate`,
`indeterminate/benign`, `indeterminate/malignant`, `BenignMalignantEnum`) is still a field and fills rows
without `diagnosis_1`, as in downloads of older records. The flat legacy `diagnosis` column ("nevus",
"melanoma") is not read: its label set is open-ended, and the two columns above carry the same class.

The target is three-class, as the 1st place of ISIC 2024 pretrained on: benign (0), malignant (1),
indeterminate (2). Rows with neither column filled have no class and are left out (counted in the log);
a value outside the schema, a duplicate or empty `isic_id`, or a record without its image stops with a
`DiagnosisDataError` (exit code 18) naming the file, the column and the line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from lesionstack.data.diagnosis import (
    IMAGE_SUFFIXES,
    DiagnosisDataError,
    FolderImages,
    _check_unique,
    _read_csv_strings,
)
from lesionstack.data.schema import ID_COLUMN

log = logging.getLogger(__name__)

ARCHIVE_METADATA = "metadata.csv"
DIAGNOSIS_1 = "diagnosis_1"
BENIGN_MALIGNANT = "benign_malignant"
CLASSES = ("benign", "malignant", "indeterminate")  # class index = position
BENIGN, MALIGNANT, INDETERMINATE = range(3)
# isic-metadata's DiagnosisEnum first level, and BenignMalignantEnum (compared lower-cased, stripped)
DIAGNOSIS_1_CLASSES = {"benign": BENIGN, "malignant": MALIGNANT, "indeterminate": INDETERMINATE}
BENIGN_MALIGNANT_CLASSES = {"benign": BENIGN, "malignant": MALIGNANT, "indeterminate": INDETERMINATE,
                            "indeterminate/benign": INDETERMINATE, "indeterminate/malignant": INDETERMINATE}


@dataclass
class ArchiveData:
    """An archive download: `table` (isic_id, label: class index into CLASSES) and its images."""

    table: pd.DataFrame
    images: FolderImages
    path: Path  # the metadata file

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.table["label"].to_numpy(), minlength=len(CLASSES))
        return {name: int(n) for name, n in zip(CLASSES, found, strict=True)}

    def __str__(self) -> str:
        return f"{self.path.parent}: {len(self.table)} archive images with a class {self.counts()}"


def _line_of(index: int) -> int:
    return index + 2  # CSV line: one for the header, one for 1-based counting


def read_archive(folder: str | os.PathLike[str]) -> ArchiveData:
    """The labelled records of an `isic image download` folder and their images (see the module doc)."""
    root = Path(folder)
    path = root / ARCHIVE_METADATA
    if not root.is_dir():
        raise DiagnosisDataError(f"{root}: no such archive folder (expected the OUTDIR of `isic image download`)")
    raw = _read_strings(path)
    labels = archive_labels(raw, path)
    keep = labels >= 0
    if not keep.any():
        raise DiagnosisDataError(f"{path}: no row has a class in '{DIAGNOSIS_1}' or '{BENIGN_MALIGNANT}'")
    if (~keep).any():
        log.info("%s: %d of %d record(s) have no diagnosis and are left out", path, int((~keep).sum()), len(keep))
    table = pd.DataFrame({ID_COLUMN: raw[ID_COLUMN].to_list(), "label": labels})
    table["line"] = np.arange(len(table)) + 2
    table = table[keep].reset_index(drop=True)
    images = FolderImages.scan([root], root)
    missing = ~table[ID_COLUMN].isin(set(images.files)).to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DiagnosisDataError(
            f"{path}: column '{ID_COLUMN}' line {table['line'][i]}: '{table[ID_COLUMN][i]}' has no image file "
            f"({'/'.join(IMAGE_SUFFIXES)}, any case) in {root} ({int(missing.sum())} of {len(table)} have none)")
    return ArchiveData(table.drop(columns="line"), images, path)


def _read_strings(path: Path) -> pl.DataFrame:
    """All columns as strings; isic_id filled and unique, a diagnosis column present."""
    if not path.is_file():
        raise DiagnosisDataError(f"{path}: archive metadata file not found (isic-cli writes it beside the images)")
    raw = _read_csv_strings(path, [ID_COLUMN])
    if DIAGNOSIS_1 not in raw.columns and BENIGN_MALIGNANT not in raw.columns:
        raise DiagnosisDataError(f"{path}: missing column '{DIAGNOSIS_1}' (or the older '{BENIGN_MALIGNANT}'): "
                           "no diagnosis to train on")
    _check_unique(raw, ID_COLUMN, path)
    return raw


def archive_labels(raw: pl.DataFrame, path: Path) -> np.ndarray:
    """Class index per row (-1: no diagnosis): `diagnosis_1`, else `benign_malignant`; an unknown value in
    either column is a DiagnosisDataError naming the column, line and value."""
    out = np.full(raw.height, -1, dtype=np.int64)
    for col, classes in ((BENIGN_MALIGNANT, BENIGN_MALIGNANT_CLASSES), (DIAGNOSIS_1, DIAGNOSIS_1_CLASSES)):
        if col not in raw.columns:
            continue
        values = raw.get_column(col).str.strip_chars().str.to_lowercase()
        filled = values.is_not_null() & (values != "")
        known = values.is_in(list(classes))
        if len(bad := (filled & ~known).arg_true()):
            i = bad[0]
            raise DiagnosisDataError(
                f"{path}: column '{col}' line {_line_of(i)} (isic_id {raw[ID_COLUMN][i]}): value {raw[col][i]!r} "
                f"is not one of the archive's {sorted(set(classes))} ({len(bad)} such row(s))")
        codes = values.replace_strict(classes, default=-1, return_dtype=pl.Int64).fill_null(-1).to_numpy()
        out = np.where(codes >= 0, codes, out)  # diagnosis_1 (second in the loop) wins where both are filled
    return out
