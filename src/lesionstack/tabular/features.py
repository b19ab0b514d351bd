"""Tabular features: one pure function, the same for training and test metadata.

From the 44 test columns (and, when given, the CNN's scores) to a feature table:

* the ~40 engineered ratios of the public "only tabular" lineage (`ENGINEERED`);
* every numeric feature normalised within the patient and within patient x body site,
  `(x - mean) / (std + 1e-5)`: the "ugly duckling" signal, how a lesion differs from its neighbours;
* lesion counts and area sums per patient and per patient x site;
* `patient_lof`: the local outlier factor of each lesion among its patient's lesions, on the within-patient
  z-scores (`tabular.outliers`; the stacker uses it with `use_lof`);
* categorical columns as integer codes over fixed vocabularies (`CATEGORY_VOCAB`): never fitted on the
  data, so an unseen category at test time maps to "other" and train and test get the same columns;
* with CNN scores: the score, score / patient mean, z-score and rank within the patient (`cnn_*`).

Only `schema.TEST_COLUMNS` are ever read, so training-only columns (target, iddx_*, mel_*, ...) cannot
reach the features whatever the input frame holds.

Missing values: the output holds no NaN and no inf. A ratio with a zero denominator is missing; missing
raw and engineered values become 0 and are flagged by `age_approx_missing` and `n_missing_numeric`
(GBDTs could take NaN natively, but a table without NaN is safe for every consumer and the flags keep
the information). Normalised values are computed on the non-missing values first; a missing value, a
single-lesion patient and a constant column all normalise to 0 (the patient's mean).
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pandas as pd
import polars as pl

from lesionstack.data import schema
from lesionstack.tabular.outliers import lof_feature

log = logging.getLogger(__name__)

EPS = 1e-5
OTHER = "other"
MISSING = "missing"
CAT_PREFIX = "cat_"
CNN_PREFIX = "cnn_"
PATIENT_NORM_SUFFIX = "_pnorm"
SITE_NORM_SUFFIX = "_snorm"

# Categorical columns and their fixed vocabularies: code 0 = missing, 1 = other (unseen), then the values.
CATEGORICAL_SOURCES = (
    "sex", "anatom_site_general", "tbp_tile_type", "tbp_lv_location", "tbp_lv_location_simple",
    "attribution", "copyright_license",
)
COMBINED_SITE = "combined_anatomical_site"  # site x detailed location, as in the public notebooks


def _vocab(values: tuple[str, ...]) -> tuple[str, ...]:
    return (MISSING, OTHER, *values)


CATEGORY_VOCAB: dict[str, tuple[str, ...]] = {
    c: _vocab(schema.CATEGORY_VALUES[c]) for c in CATEGORICAL_SOURCES
} | {
    COMBINED_SITE: _vocab(tuple(
        f"{s}_{loc}" for s, loc in itertools.product(
            schema.CATEGORY_VALUES["anatom_site_general"], schema.CATEGORY_VALUES["tbp_lv_location"]
        )
    ))
}

RAW_NUMERIC: tuple[str, ...] = schema.NUMERIC_TEST_COLUMNS
REQUIRED_COLUMNS: tuple[str, ...] = (
    schema.ID_COLUMN, schema.PATIENT_COLUMN, *RAW_NUMERIC, *CATEGORICAL_SOURCES
)


class FeatureError(ValueError):
    """Input that the feature function cannot use (missing column, non-numeric value, bad CNN scores)."""


def _c(name: str) -> pl.Expr:
    return pl.col(name)


def _div(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    """a / b, missing where b is 0 (never inf)."""
    return pl.when(b != 0).then(a / b).otherwise(None)


def _engineered() -> dict[str, pl.Expr]:
    """The engineered features of the public "only tabular" lineage, as polars expressions."""
    A, Aext, B, Bext = _c("tbp_lv_A"), _c("tbp_lv_Aext"), _c("tbp_lv_B"), _c("tbp_lv_Bext")
    H, Hext, L, Lext = _c("tbp_lv_H"), _c("tbp_lv_Hext"), _c("tbp_lv_L"), _c("tbp_lv_Lext")
    dA, dB, dL = _c("tbp_lv_deltaA"), _c("tbp_lv_deltaB"), _c("tbp_lv_deltaL")
    area, perim, minor = _c("tbp_lv_areaMM2"), _c("tbp_lv_perimeterMM"), _c("tbp_lv_minorAxisMM")
    diam, age = _c("clin_size_long_diam_mm"), _c("age_approx")
    border, color, symm = _c("tbp_lv_norm_border"), _c("tbp_lv_norm_color"), _c("tbp_lv_symm_2axis")
    ecc, cstd = _c("tbp_lv_eccentricity"), _c("tbp_lv_color_std_mean")
    rstd = _c("tbp_lv_radial_color_std_max")
    stdL, stdLExt, apr = _c("tbp_lv_stdL"), _c("tbp_lv_stdLExt"), _c("tbp_lv_area_perim_ratio")
    lbnorm, nevi = _c("tbp_lv_deltaLBnorm"), _c("tbp_lv_nevi_confidence")
    x, y, z = _c("tbp_lv_x"), _c("tbp_lv_y"), _c("tbp_lv_z")
    dist3d = (x**2 + y**2 + z**2).sqrt()
    colour_diff = (dA**2 + dB**2 + dL**2).sqrt()
    border_cx = border + symm
    shape_idx = _div(area, perim**2)
    return {
        "lesion_size_ratio": _div(minor, diam),
        "lesion_shape_index": shape_idx,
        "hue_contrast": (H - Hext).abs(),
        "luminance_contrast": (L - Lext).abs(),
        "lesion_color_difference": colour_diff,
        "border_complexity": border_cx,
        "color_uniformity": cstd / (rstd + EPS),
        "position_distance_3d": dist3d,
        "perimeter_to_area_ratio": _div(perim, area),
        "area_to_perimeter_ratio": _div(area, perim),
        "lesion_visibility_score": lbnorm + color,
        "symmetry_border_consistency": symm * border,
        "consistency_symmetry_border": _div(symm * border, symm + border),
        "color_consistency": _div(stdL, Lext),
        "consistency_color": _div(stdL * Lext, stdL + Lext),
        "size_age_interaction": diam * age,
        "hue_color_std_interaction": H * cstd,
        "lesion_severity_index": (border + color + ecc) / 3,
        "shape_complexity_index": border_cx + shape_idx,
        "normalized_lesion_size": _div(diam, age),
        "mean_hue_difference": (H + Hext) / 2,
        "std_dev_contrast": ((dA**2 + dB**2 + dL**2) / 3).sqrt(),
        "color_shape_composite_index": (cstd + apr + symm) / 3,
        "log_lesion_area": (area + 1).log(),
        "lesion_orientation_3d": pl.arctan2(y, x),
        "overall_color_difference": (dA + dB + dL) / 3,
        "symmetry_perimeter_interaction": symm * perim,
        "comprehensive_lesion_index": (apr + ecc + color + symm) / 4,
        "color_variance_ratio": _div(cstd, stdLExt),
        "border_color_interaction": border * color,
        "border_color_interaction_2": _div(border * color, border + color),
        "size_color_contrast_ratio": _div(diam, lbnorm),
        "age_normalized_nevi_confidence": _div(nevi, age),
        "age_normalized_nevi_confidence_2": (diam**2 + age**2).sqrt(),
        "color_asymmetry_index": rstd * symm,
        "volume_approximation_3d": area * dist3d,
        "color_range": (L - Lext).abs() + (A - Aext).abs() + (B - Bext).abs(),
        "shape_color_consistency": ecc * cstd,
        "border_length_ratio": _div(perim, 2 * math.pi * (area / math.pi).sqrt()),
        "age_size_symmetry_index": age * diam * symm,
        "index_age_size_symmetry": age * area * symm,
    }


ENGINEERED: tuple[str, ...] = tuple(_engineered())
NUMERIC_FEATURES: tuple[str, ...] = RAW_NUMERIC + ENGINEERED


def _check_columns(df: pl.DataFrame, where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise FeatureError(f"{where}: missing column(s) {missing}")
    if df.height == 0:
        raise FeatureError(f"{where}: no rows")
    dups = df.filter(_c(schema.ID_COLUMN).is_duplicated())[schema.ID_COLUMN].unique().sort().head(5)
    if len(dups):
        raise FeatureError(f"{where}: column 'isic_id' repeats values, e.g. {dups.to_list()}")


def _numeric(df: pl.DataFrame, where: str) -> pl.DataFrame:
    """Cast the numeric columns to Float64 (NaN -> null), naming the first value that is not a number."""
    out = []
    for col in RAW_NUMERIC:
        s = df[col]
        cast = s.cast(pl.Float64, strict=False)
        bad = (cast.is_null() & s.is_not_null()).arg_true()
        if len(bad):
            row = int(bad[0])
            raise FeatureError(f"{where}: column {col!r} row {row}: {s[row]!r} is not a number")
        out.append(cast.fill_nan(None))
    return df.with_columns(out)


def _encode_categoricals(df: pl.DataFrame) -> list[pl.Expr]:
    exprs = []
    for col, vocab in CATEGORY_VOCAB.items():
        src = _c(col).cast(pl.String).str.strip_chars()
        if col == COMBINED_SITE:
            src = _c("anatom_site_general").cast(pl.String) + "_" + _c("tbp_lv_location").cast(pl.String)
        mapping = {v: i for i, v in enumerate(vocab) if i > 1}
        code = src.replace_strict(mapping, default=1, return_dtype=pl.Int16)
        exprs.append(
            pl.when(src.is_null() | (src == "")).then(pl.lit(0, pl.Int16)).otherwise(code)
            .alias(f"{CAT_PREFIX}{col}")
        )
    return exprs


def _zscore(col: str, by: list[str]) -> pl.Expr:
    x = _c(col)
    std = x.std().over(by).fill_null(0.0)  # single-value group: std undefined -> 0 -> z = 0
    return ((x - x.mean().over(by)) / (std + EPS)).fill_null(0.0)


def _tabular_frame(df: pl.DataFrame) -> pl.DataFrame:
    site = "_site_key"
    df = df.with_columns(
        _c("anatom_site_general").cast(pl.String).fill_null(MISSING).alias(site),
        **_engineered(),
    )
    keys_p, keys_s = [schema.PATIENT_COLUMN], [schema.PATIENT_COLUMN, site]
    norm = [_zscore(c, keys_p).alias(c + PATIENT_NORM_SUFFIX) for c in NUMERIC_FEATURES]
    norm += [_zscore(c, keys_s).alias(c + SITE_NORM_SUFFIX) for c in NUMERIC_FEATURES]
    area = _c("tbp_lv_areaMM2").fill_null(0.0)
    counts = [
        pl.len().over(keys_p).cast(pl.Float64).alias("patient_lesion_count"),
        pl.len().over(keys_s).cast(pl.Float64).alias("patient_site_lesion_count"),
        area.sum().over(keys_p).alias("patient_area_sum"),
        area.sum().over(keys_s).alias("patient_site_area_sum"),
        (area / (area.sum().over(keys_p) + EPS)).alias("patient_area_share"),
        (area / (area.sum().over(keys_s) + EPS)).alias("patient_site_area_share"),
        _c("age_approx").is_null().cast(pl.Float64).alias("age_approx_missing"),
        pl.sum_horizontal([_c(c).is_null() for c in RAW_NUMERIC]).cast(pl.Float64).alias("n_missing_numeric"),
    ]
    out = df.select(
        _c(schema.ID_COLUMN).cast(pl.String),
        *[_c(c).fill_null(0.0) for c in NUMERIC_FEATURES],
        *norm,
        *counts,
        *_encode_categoricals(df),
    )
    return out


def _cnn_frame(df: pl.DataFrame, scores: pl.DataFrame, where: str) -> pl.DataFrame:
    """CNN score features: the score, score / patient mean, z-score and rank within the patient."""
    for col in (schema.ID_COLUMN, "score"):
        if col not in scores.columns:
            raise FeatureError(f"{where}: CNN scores lack column {col!r}")
    scores = scores.select(_c(schema.ID_COLUMN).cast(pl.String), _c("score").cast(pl.Float64))
    dups = scores.filter(_c(schema.ID_COLUMN).is_duplicated())[schema.ID_COLUMN].unique().sort().head(5)
    if len(dups):
        raise FeatureError(f"{where}: CNN scores repeat isic_id(s), e.g. {dups.to_list()}")
    j = df.select(_c(schema.ID_COLUMN).cast(pl.String), schema.PATIENT_COLUMN).join(
        scores, on=schema.ID_COLUMN, how="left", maintain_order="left"
    )
    bad = j.filter(_c("score").is_null() | ~_c("score").is_finite())
    if bad.height:
        examples = bad[schema.ID_COLUMN].head(5).to_list()
        raise FeatureError(f"{where}: {bad.height} row(s) have no finite CNN score, e.g. {examples}")
    s, p = _c("score"), [schema.PATIENT_COLUMN]
    return j.select(
        s.alias(f"{CNN_PREFIX}score"),
        (s / (s.mean().over(p) + EPS)).alias(f"{CNN_PREFIX}score_over_patient_mean"),
        _zscore("score", p).alias(f"{CNN_PREFIX}score_pnorm"),
        (s.rank("average").over(p) / pl.len().over(p)).alias(f"{CNN_PREFIX}score_patient_rank"),
    )


def build_features(
    metadata: pd.DataFrame | pl.DataFrame,
    cnn_scores: pd.DataFrame | pl.DataFrame | None = None,
    *,
    where: str = "metadata",
) -> pd.DataFrame:
    """The feature table of `metadata` (train or test alike): `isic_id` then the feature columns.

    Reads only `schema.TEST_COLUMNS`; any other column of `metadata` is ignored. `cnn_scores`
    (isic_id, score) must score every row exactly once. Numeric features are float32, categorical codes
    (`cat_*`) int16; the columns and their order depend only on whether CNN scores are given.
    """
    df = _polars(metadata)
    df = df.select([c for c in schema.TEST_COLUMNS if c in df.columns])  # training-only columns never pass
    _check_columns(df, where)
    df = _numeric(df, where).with_columns(_c(schema.PATIENT_COLUMN).cast(pl.String))
    out = _tabular_frame(df)
    out = out.with_columns(lof_feature(out, df.get_column(schema.PATIENT_COLUMN), PATIENT_NORM_SUFFIX))
    if cnn_scores is not None:
        out = pl.concat([out, _cnn_frame(df, _polars(cnn_scores), where)], how="horizontal")
    return _finish(out).to_pandas()


def cnn_features(
    metadata: pd.DataFrame | pl.DataFrame,
    cnn_scores: pd.DataFrame | pl.DataFrame,
    *,
    where: str = "metadata",
) -> pd.DataFrame:
    """The CNN score features alone (`cnn_*` columns, metadata row order): exactly the columns that
    `build_features(metadata, cnn_scores)` adds. Test features paired with one CNN fold's scores
    (`tabular.pairing`) swap these in, so the tabular part is built once."""
    df = _polars(metadata)
    missing = [c for c in (schema.ID_COLUMN, schema.PATIENT_COLUMN) if c not in df.columns]
    if missing:
        raise FeatureError(f"{where}: missing column(s) {missing}")
    df = df.select(_c(schema.ID_COLUMN).cast(pl.String), _c(schema.PATIENT_COLUMN).cast(pl.String))
    return _finish(_cnn_frame(df, _polars(cnn_scores), where)).to_pandas()


def _polars(frame: pd.DataFrame | pl.DataFrame) -> pl.DataFrame:
    return frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)


def _finish(out: pl.DataFrame) -> pl.DataFrame:
    """Float columns as float32 with every NaN/inf as 0 (column by column: a part finishes like the whole)."""
    floats = [c for c, t in out.schema.items() if t.is_float()]
    return out.with_columns(
        pl.when(_c(c).is_finite()).then(_c(c)).otherwise(0.0).cast(pl.Float32) for c in floats
    )


def categorical_columns(columns: list[str]) -> list[str]:
    """The integer-coded categorical columns among `columns`."""
    return [c for c in columns if c.startswith(CAT_PREFIX)]


def has_cnn(features: pd.DataFrame) -> bool:
    return any(c.startswith(CNN_PREFIX) for c in features.columns)


def check_finite(features: pd.DataFrame, where: str = "features") -> None:
    """Raise FeatureError naming the first column and row holding NaN or inf."""
    num = features.select_dtypes("number")
    bad = ~np.isfinite(num.to_numpy(dtype=np.float64))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise FeatureError(f"{where}: column {num.columns[col]!r} row {row} is not finite")


def fill_unscored(scores: pd.DataFrame, where: str, columns: tuple[str, ...] = ("score",)) -> pd.DataFrame:
    """Give test crops the CNN could not score (skipped as corrupt) the median score of each of `columns`
    (the mean score, and each fold model's when paired by fold), and say so.

    A submission must cover every test id; one unreadable crop should not sink it. Training rows are
    never filled: the stacker refuses non-finite OOF scores instead.
    """
    bad = ~np.isfinite(scores[list(columns)].to_numpy(dtype=np.float64)).all(axis=1)
    if not bad.any():
        return scores
    medians = {c: float(np.nanmedian(scores[c])) if (~bad).any() else 0.5 for c in columns}
    ids = scores.loc[bad, schema.ID_COLUMN].tolist()
    log.warning("%s: %d crop(s) could not be scored by the CNN (e.g. %s); they get the median CNN score %.4f",
                where, len(ids), ids[:3], medians[columns[0]])
    return scores.assign(**{c: np.where(bad, m, scores[c]) for c, m in medians.items()})
