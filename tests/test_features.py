"""The feature function on real metadata: edge cases, no leakage of training-only columns, same columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import REAL_META, SHARED_DATA
from lesionstack.data import schema
from lesionstack.tabular.features import (
    CATEGORY_VOCAB,
    ENGINEERED,
    FeatureError,
    build_features,
    check_finite,
)

REAL_TEST = SHARED_DATA / "isic2024-public-test" / "test-metadata.csv"


@pytest.fixture(scope="module")
def real(shared_data) -> pd.DataFrame:  # errors (never skips) when the real data fixtures are absent
    return pd.read_csv(REAL_META)


def test_real_metadata_has_all_features_and_no_nan(real: pd.DataFrame) -> None:
    f = build_features(real)
    assert len(f) == len(real) and f["isic_id"].tolist() == real["isic_id"].tolist()
    assert len(ENGINEERED) >= 40 and set(ENGINEERED) <= set(f.columns)
    check_finite(f)
    # the patient z-score of area: mean 0 within each patient with more than one lesion
    z = f["tbp_lv_areaMM2_pnorm"].groupby(real["patient_id"]).mean()
    assert np.allclose(z, 0, atol=1e-4)


def test_train_and_test_get_the_same_columns_and_unseen_category_is_other(real: pd.DataFrame) -> None:
    test = pd.read_csv(REAL_TEST)
    assert "FNQH Cairns" in set(test["attribution"])  # not in the fixed vocabulary
    ft, fr = build_features(test), build_features(real)
    assert list(ft.columns) == list(fr.columns)
    assert (ft.dtypes == fr.dtypes).all()
    other = CATEGORY_VOCAB["attribution"].index("other")
    assert ft.loc[test["attribution"] == "FNQH Cairns", "cat_attribution"].eq(other).all()
    # a row's features do not depend on rows of other patients
    one = build_features(test.iloc[[1]])
    pd.testing.assert_frame_equal(one.reset_index(drop=True), ft.iloc[[1]].reset_index(drop=True))


def test_single_lesion_patient_nan_and_constant_columns(real: pd.DataFrame) -> None:
    df = real.head(60).copy()
    df.loc[0, "patient_id"] = "IP_alone"  # a patient with one lesion
    df["tbp_lv_norm_color"] = 0.0  # constant column (and a zero denominator for ratios)
    df["tbp_lv_radial_color_std_max"] = 0.0
    df.loc[1:5, "tbp_lv_areaMM2"] = np.nan  # NaN in a numeric column
    df.loc[2:8, "age_approx"] = np.nan
    df.loc[3, ["sex", "anatom_site_general"]] = None
    df["tbp_lv_perimeterMM"] = df["tbp_lv_perimeterMM"].astype(float)
    df.loc[9, "tbp_lv_perimeterMM"] = 0.0
    f = build_features(df)
    check_finite(f)
    alone = f.iloc[0]
    assert (alone.filter(like="_pnorm") == 0).all() and (alone.filter(like="_snorm") == 0).all()
    assert (f["tbp_lv_norm_color_pnorm"] == 0).all()
    assert (f["age_approx_missing"] == df["age_approx"].isna()).all()
    assert f.loc[2:8, "age_approx_missing"].eq(1).all()
    assert f.loc[3, "cat_sex"] == 0 and f.loc[3, "cat_anatom_site_general"] == 0


def test_training_only_columns_cannot_reach_the_features(real: pd.DataFrame) -> None:
    df = real.head(200).reset_index(drop=True)
    clean = build_features(df)
    rng = np.random.default_rng(0)
    leaky = df.copy()
    for col in schema.TRAIN_ONLY_COLUMNS:
        # values that would leak the label perfectly if any feature read them
        leaky[col] = rng.integers(0, 2, len(df)) if col != "iddx_full" else "Malignant::Melanoma"
    leaky["target"] = (df.index % 7 == 0).astype(int)
    f = build_features(leaky)
    pd.testing.assert_frame_equal(f, clean)
    assert not set(f.columns) & set(schema.TRAIN_ONLY_COLUMNS)


def test_cnn_score_features(real: pd.DataFrame) -> None:
    df = real.head(100)
    rng = np.random.default_rng(1)
    scores = pd.DataFrame({"isic_id": df["isic_id"][::-1], "score": rng.random(len(df))})  # any row order
    f = build_features(df, scores)
    s = scores.set_index("isic_id").loc[df["isic_id"], "score"].to_numpy()
    assert np.allclose(f["cnn_score"], s, atol=1e-6)
    rank = f["cnn_score_patient_rank"]
    assert rank.between(0, 1).all()
    top = f.loc[f.groupby(df["patient_id"].to_numpy())["cnn_score"].idxmax()]
    assert top["cnn_score_patient_rank"].eq(1.0).all()
    with pytest.raises(FeatureError, match="no finite CNN score"):
        build_features(df, scores.iloc[1:])
    with pytest.raises(FeatureError, match="repeat isic_id"):
        build_features(df, pd.concat([scores, scores.head(2)]))


def test_bad_input_names_column_and_row(real: pd.DataFrame) -> None:
    df = real.head(10).copy()
    df["tbp_lv_x"] = df["tbp_lv_x"].astype(str)
    df.loc[4, "tbp_lv_x"] = "abc"
    with pytest.raises(FeatureError, match=r"'tbp_lv_x' row 4: 'abc'"):
        build_features(df, where="train-metadata.csv")
    with pytest.raises(FeatureError, match="missing column"):
        build_features(real.drop(columns=["tbp_lv_H"]))
