"""Fold-paired test predictions: stack fold k scores the test rows from CNN features built on CNN fold k's
test score; the prediction is the blend of the fold average. Refused when the two halves were trained on
different fold files, or when the test scores hold only the mean of the folds (an older test_cnn).

Data as in test_stack: real metadata, a synthetic target and a PROXY CNN score (test-only, not a model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import REAL_META, TINY_STACK, make_stack_inputs
from lesionstack.errors import classify
from lesionstack.files import read_json, write_json
from lesionstack.paths import ArtifactPaths
from lesionstack.report.shift import shift_table
from lesionstack.tabular.blend import blend
from lesionstack.tabular.estimator import load_models
from lesionstack.tabular.features import build_features
from lesionstack.tabular.pairing import PairingError, fold_cnn_features, paired_features
from lesionstack.tabular.score_shift import compare
from lesionstack.tabular.stack import train_stack
from lesionstack.tabular.stack_config import StackConfig, StackError
from lesionstack.tabular.stack_predict import predict_stack

N_TRAIN, N_TEST = 300, 45


def record_cnn_folds(art: ArtifactPaths, n_folds: int) -> None:
    """What train-cnn records per fold (cnn/fold_k/inputs.json): the fold file's digest, here the stack's."""
    for k in range(n_folds):
        folds = read_json(art.stack_fold(k).inputs)["folds"]
        write_json(art.cnn_fold(k).inputs, {"folds": folds, "train_images": "proxy"})


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArtifactPaths, pd.DataFrame, pd.DataFrame]:
    """A trained stack (3 folds, proxy CNN) and a test set: its metadata and per-fold test scores."""
    feats, art, cnn = make_stack_inputs(tmp_path_factory.mktemp("pairing"), n=N_TRAIN)
    train_stack(feats, art.folds, art, StackConfig(**TINY_STACK), cnn_oof=cnn)
    record_cnn_folds(art, 3)
    meta = pd.read_csv(REAL_META).iloc[N_TRAIN:N_TRAIN + N_TEST].reset_index(drop=True)
    rng = np.random.default_rng(1)
    base = rng.uniform(0.05, 0.95, size=N_TEST)
    # three clearly different fold models: fold k's scores are a distinct monotone warp plus noise
    per_fold = {f"score_fold_{k}": np.clip(base ** (0.5 + k) + 0.05 * rng.normal(size=N_TEST), 0.001, 0.999)
                for k in range(3)}
    scores = pd.DataFrame({"isic_id": meta["isic_id"], **per_fold})
    scores.insert(1, "score", scores[list(per_fold)].mean(axis=1))
    return art, meta, scores


def test_stack_fold_k_scores_with_cnn_fold_ks_features(paired: tuple) -> None:
    art, meta, scores = paired
    test = build_features(meta, scores[["isic_id", "score"]])  # the mean-score features of the test rows
    fold_cnn = fold_cnn_features(meta, scores, "test scores")
    got = predict_stack(test, art, fold_cnn=fold_cnn).set_index("isic_id")["score"]
    # by hand: fold k's models on the test table rebuilt from scratch with fold k's scores, averaged, blended
    models = ("lgbm", "catboost", "xgboost")
    sums = {m: np.zeros(N_TEST) for m in models}
    for k in range(3):
        own = build_features(meta, scores[["isic_id", f"score_fold_{k}"]].rename(columns={f"score_fold_{k}": "score"}))
        pd.testing.assert_frame_equal(paired_features(test, fold_cnn, k, "test"), own)  # swapping = rebuilding
        fitted = load_models(art.stack_fold(k).dir)
        for m in models:
            sums[m] += fitted[m].predict_proba(own)[:, 1] / 3
    expected = pd.Series(blend(sums), index=meta["isic_id"].astype(str))
    np.testing.assert_allclose(got.loc[expected.index], expected, rtol=0, atol=1e-12)
    # ... which is not what every fold scoring the mean-score features gives
    mean = predict_stack(test, art, pairing="mean").set_index("isic_id")["score"]
    assert np.abs(mean.loc[expected.index] - expected).max() > 0.01


def test_unpaired_or_mismatched_folds_are_refused(paired: tuple, tmp_path: Path) -> None:
    import shutil

    art, meta, scores = paired
    test = build_features(meta, scores[["isic_id", "score"]])
    with pytest.raises(StackError, match="pass fold_cnn"):
        predict_stack(test, art)
    with pytest.raises(PairingError, match=r"no per-fold CNN scores \(score_fold_<k> columns\), only their mean"):
        fold_cnn_features(meta, scores[["isic_id", "score"]], "test_cnn.parquet")
    fold_cnn = fold_cnn_features(meta, scores, "test scores")
    with pytest.raises(PairingError, match="no test CNN features for CNN fold 2"):
        predict_stack(test, art, fold_cnn=fold_cnn[fold_cnn["fold"] != 2])
    # the tabular-only variant reads no CNN feature: nothing to pair
    assert len(predict_stack(test, art, variant="tabular")) == N_TEST
    other = ArtifactPaths(tmp_path / "art")
    shutil.copytree(art.root, other.root)
    write_json(other.cnn_fold(1).inputs, {"folds": "0" * 64, "train_images": "proxy"})  # another fold file
    with pytest.raises(PairingError, match=r"stack fold 1 .* and CNN fold 1 .* different fold files") as err:
        predict_stack(test, other, fold_cnn=fold_cnn)
    assert classify(err.value).code == 9  # the command line's stack error, with its hint
    other.cnn_fold(1).inputs.unlink()  # a CNN fold without its record
    with pytest.raises(PairingError, match=r"cnn/fold_1/inputs.json: no fold-file record") as err:
        predict_stack(test, other, fold_cnn=fold_cnn)
    # the hint names commands a user can run, not a keyword no command takes
    assert f"`lesionstack train-cnn DATA --artifacts {other.root} --folds-only 1`" in str(err.value)
    assert f"`lesionstack train-stack --artifacts {other.root}`" in str(err.value) and "pairing=" not in str(err.value)
    other.stack_fold(0).inputs.unlink()  # a stack fold without its record: retrain the stacker alone
    with pytest.raises(PairingError, match=r"stack/fold_0/inputs.json: no fold-file record.* delete "
                                           r".*stack and run `lesionstack train-stack --artifacts "):
        predict_stack(test, other, fold_cnn=fold_cnn)


def test_compare_measures_a_narrower_spread() -> None:
    rng = np.random.default_rng(0)
    single = rng.beta(0.5, 4, size=3000)  # one fold model's scores
    mean = np.mean([rng.beta(0.5, 4, size=3000) for _ in range(5)], axis=0)  # mean of five: narrower
    out = compare(single, {"test_mean": mean, "test_paired": rng.beta(0.5, 4, size=3000)})
    assert out["test_mean"]["ks"] > 0.2 > 0.05 > out["test_paired"]["ks"]
    assert out["test_mean"]["std"] < out["oof"]["std"] and set(out["oof"]["quantiles"]) >= {"q01", "q50", "q99"}
    header, rows = shift_table({"features": {"cnn_score": out}, "stack_fold_probability": out,
                                "stack_final_probability": out})
    assert rows[0][0] == "CNN score (stacker input)" and len(rows) == 3 and len(rows[0]) == len(header) == 6
