"""Read and validate the competition's metadata CSVs (`train-metadata.csv`, `test-metadata.csv`).

Errors name the file, the column and the CSV line (line 1 is the header), so a user can open the file at
the right place. Extra columns are kept; training-only columns are optional at prediction time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import polars as pl

from lesionstack.data.schema import (
    ID_COLUMN,
    PATIENT_COLUMN,
    STRING_COLUMNS,
    TARGET_COLUMN,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
)

Kind = Literal["train", "test"]

# image_type is constant ("TBP tile: close-up") and missing from some public copies of the metadata.
OPTIONAL_TEST_COLUMNS = frozenset({"image_type"})


class MetadataError(ValueError):
    """Metadata that does not fit the competition's schema."""


def required_columns(kind: Kind) -> list[str]:
    """Columns a metadata file of this kind must have. A test file needs only its keys: a submission must
    be written whatever else is missing (the absent columns are filled as missing, and said so)."""
    if kind == "test":
        return [ID_COLUMN, PATIENT_COLUMN]
    cols = [c for c in TEST_COLUMNS if c not in OPTIONAL_TEST_COLUMNS]
    cols.insert(1, TARGET_COLUMN)
    return cols


def read_metadata(path: str | os.PathLike[str], kind: Kind = "train") -> pd.DataFrame:
    """Read a metadata CSV, check it against the schema and return typed columns.

    Numeric columns become float64 (NaN where empty), `target` int8, strings stay strings.
    Raises MetadataError naming the file, column and line on: a missing required column, a non-numeric
    value in a numeric column, an empty or duplicate isic_id, an empty patient_id, a target not 0/1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metadata file not found")
    try:
        raw = pl.read_csv(path, infer_schema=False, null_values=[""])  # all strings: we type it ourselves
    except pl.exceptions.PolarsError as err:
        raise MetadataError(f"{path}: not a readable CSV ({err})") from err
    _check_columns(raw, path, kind)
    _check_ids(raw, path)
    absent = [c for c in TEST_COLUMNS if c not in raw.columns and c not in OPTIONAL_TEST_COLUMNS]
    raw = raw.with_columns(pl.lit(None, pl.String).alias(c) for c in absent)
    typed = raw.with_columns(_numeric_casts(raw, path))
    if kind == "train":
        typed = _check_target(typed, path)
    frame = typed.to_pandas()
    frame.attrs["absent_columns"] = absent  # read by tabular.drift.drift_warnings
    return frame


def _check_columns(raw: pl.DataFrame, path: Path, kind: Kind) -> None:
    missing = [c for c in required_columns(kind) if c not in raw.columns]
    if missing:
        hint = " (is this a test file read as training data?)" if missing == [TARGET_COLUMN] else ""
        raise MetadataError(f"{path}: missing required column(s) {missing}{hint}")
    dupes = sorted({c for c in raw.columns if raw.columns.count(c) > 1})
    if dupes:
        raise MetadataError(f"{path}: column(s) {dupes} appear more than once")


def _line_of(index: int) -> int:
    return index + 2  # CSV line: one for the header, one for 1-based counting


def _check_ids(raw: pl.DataFrame, path: Path) -> None:
    for col in (ID_COLUMN, PATIENT_COLUMN):
        empty = raw.select(pl.col(col).is_null().arg_true()).to_series()
        if len(empty):
            raise MetadataError(f"{path}: column '{col}' is empty at line {_line_of(empty[0])}")
    ids = raw.get_column(ID_COLUMN)
    dup_mask = ids.is_duplicated()
    if dup_mask.any():
        rows = dup_mask.arg_true().to_list()
        first = ids[rows[0]]
        lines = [_line_of(i) for i in rows if ids[i] == first]
        raise MetadataError(
            f"{path}: column '{ID_COLUMN}' has duplicate value '{first}' at lines {lines}"
            f" ({int(dup_mask.sum())} duplicated rows in all)"
        )


def _numeric_columns(raw: pl.DataFrame) -> list[str]:
    known = set(TRAIN_COLUMNS)
    return [c for c in raw.columns if c in known and c not in STRING_COLUMNS]


def _numeric_casts(raw: pl.DataFrame, path: Path) -> list[pl.Expr]:
    casts = []
    for col in _numeric_columns(raw):
        parsed = raw.get_column(col).str.strip_chars().cast(pl.Float64, strict=False)
        bad = (parsed.is_null() & raw.get_column(col).is_not_null()).arg_true()
        if len(bad):
            i = bad[0]
            raise MetadataError(
                f"{path}: column '{col}' line {_line_of(i)} (isic_id {raw[ID_COLUMN][i]}): "
                f"value {raw[col][i]!r} is not a number ({len(bad)} such value(s) in this column)"
            )
        casts.append(parsed.alias(col))
    return casts


def _check_target(typed: pl.DataFrame, path: Path) -> pl.DataFrame:
    target = typed.get_column(TARGET_COLUMN)
    bad = (target.is_null() | ~target.is_in([0.0, 1.0])).arg_true()
    if len(bad):
        i = bad[0]
        raise MetadataError(
            f"{path}: column '{TARGET_COLUMN}' line {_line_of(i)} (isic_id {typed[ID_COLUMN][i]}): "
            f"value {target[i]!r} is not 0 or 1"
        )
    return typed.with_columns(pl.col(TARGET_COLUMN).cast(pl.Int8))


def id_mismatch(ids: Iterable[Any], expected: Iterable[Any], examples: int = 3) -> str | None:
    """None when `ids` hold every `expected` id exactly once and nothing else; otherwise what differs, with
    examples, e.g. "2 missing (e.g. ['ISIC_1', 'ISIC_7']), 1 repeated (e.g. ['ISIC_3'])". The one check
    behind every "each row exactly once" contract (OOF scores, feature tables, the submission)."""
    have, want = pd.Series(list(ids)).astype(str), pd.Series(list(expected)).astype(str)
    found = {"missing": want[~want.isin(have)], "repeated": have[have.duplicated()].unique(),
             "unexpected": have[~have.isin(want)]}
    parts = [f"{len(v)} {k} (e.g. {list(v)[:examples]})" for k, v in found.items() if len(v)]
    return ", ".join(parts) or None


def check_images_cover(metadata: pd.DataFrame, image_ids: set[str] | frozenset[str], metadata_path: str
                       | os.PathLike[str], images_path: str | os.PathLike[str]) -> None:
    """Every metadata row must have an image; name the first that does not."""
    ids = metadata[ID_COLUMN].to_numpy()
    missing = [i for i, isic_id in enumerate(ids) if isic_id not in image_ids]
    if missing:
        i = missing[0]
        raise MetadataError(
            f"{metadata_path}: isic_id '{ids[i]}' at line {_line_of(i)} has no image in {images_path} "
            f"({len(missing)} of {len(ids)} ids have none)"
        )
