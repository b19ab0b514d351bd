"""Cascade prediction: which rows the slow models rescore, how the scores blend, and that the slow models
score only those crops."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from lesionstack.config import ConfigError
from lesionstack.inference.cascade import CascadeConfig, blend, cascade_hdf5, pick_top
from lesionstack.trained.scorer import FoldScorer


def test_pick_top_overall_and_per_patient():
    fast = np.array([0.9, 0.1, 0.5, np.nan, 0.7, 0.3])
    patients = ["a", "a", "a", "b", "b", "b"]
    assert pick_top(fast, CascadeConfig(top_k=2)).tolist() == [True, False, False, False, True, False]
    per = pick_top(fast, CascadeConfig(top_k=1, per_patient=True), patients)
    assert per.tolist() == [True, False, False, False, True, False]  # b's NaN crop is never picked
    two = pick_top(fast, CascadeConfig(top_k=2, per_patient=True), patients)
    assert two.tolist() == [True, False, True, False, True, True]
    assert not pick_top(fast, CascadeConfig(top_k=0)).any()
    with pytest.raises(ValueError, match="one patient id per row"):
        pick_top(fast, CascadeConfig(top_k=1, per_patient=True))


def test_blend_mixes_only_the_picked_rows_and_keeps_them_on_top():
    fast = np.array([0.9, 0.1, 0.5, 0.7])
    slow = np.array([0.2, np.nan, np.nan, 0.8])
    pick = np.array([True, False, False, True])
    plain = blend(fast, slow, pick, CascadeConfig(slow_weight=0.5, keep_order=False))
    np.testing.assert_allclose(plain, [0.55, 0.1, 0.5, 0.75])
    kept = blend(fast, slow, pick, CascadeConfig(slow_weight=0.5, keep_order=True))
    assert kept[[1, 2]].tolist() == [0.1, 0.5] and kept[[0, 3]].min() > 0.5  # the rest stays below
    assert kept[3] > kept[0]  # the slow model reordered the top rows
    with pytest.raises(ConfigError, match="slow_weight"):
        CascadeConfig(slow_weight=1.5)


def test_cascade_scores_the_slow_models_on_the_picked_crops_only(tiny_bundle, tmp_path):
    scorer = FoldScorer.load(tiny_bundle, device="cpu", progress=False, num_workers=0)
    rng = np.random.default_rng(0)
    import simplejpeg

    h5 = tmp_path / "crops.hdf5"
    with h5py.File(h5, "w") as f:
        for i in range(12):
            f[f"ISIC_{i:07d}"] = np.bytes_(simplejpeg.encode_jpeg(rng.integers(0, 255, (48, 48, 3), np.uint8)))
    ids = [f"ISIC_{i:07d}" for i in range(12)]
    table = cascade_hdf5(scorer, scorer, h5, ids, CascadeConfig(top_k=4, keep_order=False))
    assert table["rescored"].sum() == 4 and table["slow"].notna().sum() == 4
    top = table.nlargest(4, "fast")
    assert top["rescored"].all()
    np.testing.assert_allclose(table["score"], table["fast"])  # the same model twice: the blend changes nothing
    assert set(table.attrs["seconds"]) == {"fast", "slow"}
