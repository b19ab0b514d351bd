import numpy as np
import pandas as pd
import pytest

from lesionstack.metrics import (
    PAUC_CONSTANT,
    PAUC_MAX,
    MetricError,
    pauc,
    pauc_mcclish,
    roc_auc,
)


def test_real_labels_both_formulations_agree(shared_data):
    df = pd.read_csv(shared_data / "isic2024-real-labels" / "skinmap-heldout-20k.csv")
    assert len(df) == 20000 and df["target"].sum() == 67
    a = pauc(df["target"], df["prediction"])
    b = pauc_mcclish(df["target"], df["prediction"])
    assert abs(a - b) < 1e-12
    assert PAUC_CONSTANT < a < PAUC_MAX  # a real model: better than chance, not perfect


@pytest.mark.parametrize("seed", range(5))
def test_random_data_with_ties_agree(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(3000) < 0.05).astype(int)
    y[:2] = [0, 1]
    p = np.round(rng.random(3000) + 0.3 * y, 1)  # one decimal: many ties
    assert abs(pauc(y, p) - pauc_mcclish(y, p)) < 1e-12
    for min_tpr in (0.5, 0.9):
        assert abs(pauc(y, p, min_tpr) - pauc_mcclish(y, p, min_tpr)) < 1e-12


def test_perfect_constant_and_inverted():
    y = np.array([0] * 90 + [1] * 10)
    assert pauc(y, y.astype(float)) == pytest.approx(0.2, abs=1e-12)
    assert pauc(y, np.full(100, 0.5)) == pytest.approx(0.02, abs=1e-12)
    assert pauc(y, -y.astype(float)) == pytest.approx(0.0, abs=1e-12)
    assert roc_auc(y, y) == 1.0


def test_pauc_depends_only_on_ranking():
    rng = np.random.default_rng(1)
    y = (rng.random(500) < 0.1).astype(int)
    p = rng.random(500) + 0.5 * y
    assert pauc(y, p) == pytest.approx(pauc(y, np.log(p + 1) * 7 - 3), abs=1e-15)


@pytest.mark.parametrize("y", [np.zeros(10), np.ones(10)])
def test_single_class_is_a_clear_error(y):
    with pytest.raises(MetricError, match="both classes"):
        pauc(y, np.linspace(0, 1, 10))


def test_bad_inputs():
    with pytest.raises(MetricError, match="has 3 values"):
        pauc([0, 1, 0], [0.1, 0.2])
    with pytest.raises(MetricError, match="non-finite"):
        pauc([0, 1], [0.1, np.nan])
    with pytest.raises(MetricError, match="only 0 and 1"):
        pauc([0, 2], [0.1, 0.2])


# ---- top-15 retrieval sensitivity (the secondary prize) ------------------------------------------------


def test_top15_sensitivity_on_a_hand_computed_case():
    from lesionstack.metrics import top_n_sensitivity

    rows = []  # (patient, target, score)
    # A: 20 lesions, 2 cancers: one ranked 1st, one ranked 18th -> 1/2
    rows += [("A", 0, 0.5 - i / 100) for i in range(20)]
    rows[0] = ("A", 1, 0.99)
    rows[17] = ("A", 1, rows[17][2])
    # B: 3 lesions, 1 cancer ranked last: fewer than 15 lesions, so all are retrieved -> 1
    rows += [("B", 0, 0.9), ("B", 0, 0.8), ("B", 1, 0.1)]
    # C: no cancer: left out of the mean (it would pull the mean to 0 or 1 otherwise)
    rows += [("C", 0, 0.9 - i / 100) for i in range(16)]
    # D: 16 lesions, its one cancer scored lowest -> 0
    rows += [("D", 0, 0.9 - i / 100) for i in range(15)] + [("D", 1, 0.01)]
    patient, y, p = map(np.asarray, zip(*rows))
    assert top_n_sensitivity(y, p, patient) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert top_n_sensitivity(y, p, patient, n=18) == pytest.approx((1.0 + 1.0 + 1.0) / 3)
    shuffled = np.random.default_rng(0).permutation(len(y))  # row order does not matter without ties
    assert top_n_sensitivity(y[shuffled], p[shuffled], patient[shuffled]) == pytest.approx(0.5)


def test_top15_sensitivity_matches_the_organisers_pandas_formulation():
    """The scorer of ISIC-Research/Challenge-2024-Metrics: nlargest(15) per patient, target fraction summed,
    divided by the patients with a malignancy; ties included (scores rounded to 2 decimals)."""
    from lesionstack.metrics import top_n_sensitivity

    rng = np.random.default_rng(3)
    n = 3000
    frame = pd.DataFrame({"patient_id": rng.integers(0, 60, n), "target": (rng.random(n) < 0.05).astype(int),
                          "p": np.round(rng.random(n), 2)})
    with_cancer = frame[frame.groupby("patient_id")["target"].transform("sum") > 0].copy()
    with_cancer["fraction"] = with_cancer["target"] / with_cancer.groupby("patient_id")["target"].transform("sum")
    top = with_cancer.groupby("patient_id", group_keys=False).apply(lambda g: g.nlargest(15, "p"))
    want = top["fraction"].sum() / with_cancer["patient_id"].nunique()
    assert top_n_sensitivity(frame["target"], frame["p"], frame["patient_id"]) == pytest.approx(want, abs=1e-12)


def test_top15_sensitivity_rejects_bad_input():
    from lesionstack.metrics import MetricError, top_n_sensitivity

    with pytest.raises(MetricError, match="malignant"):
        top_n_sensitivity([0, 0], [0.1, 0.2], ["a", "b"])
    with pytest.raises(MetricError, match="values"):
        top_n_sensitivity([0, 1], [0.1, 0.2], ["a"])
