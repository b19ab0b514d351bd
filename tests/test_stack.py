"""The GBDT stacker: estimator contract, the stage's artifacts and resume, the no-leakage guards.

Data: the 1,000 real metadata rows with a synthetic target (a tabular cue plus a hidden "image" cue) and,
in place of a trained CNN, a PROXY CNN score: a noisy function of the hidden image cue (test-only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from helpers import REAL_META, TINY_STACK, make_stack_inputs
from lesionstack.config import ConfigError
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.estimator import GBDTStacker, load_models, undersample
from lesionstack.tabular.features import build_features
from lesionstack.tabular.gbdt import find_pickles
from lesionstack.tabular.stack import check_cnn_oof, train_stack
from lesionstack.tabular.stack_config import StackConfig, StackError
from lesionstack.tabular.stack_predict import predict_stack


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, ArtifactPaths, pd.DataFrame, dict]:
    feats, art, cnn = make_stack_inputs(tmp_path_factory.mktemp("stack"))
    cv = train_stack(feats, art.folds, art, StackConfig(**TINY_STACK), cnn_oof=cnn)
    return feats, art, cnn, cv


def test_estimator_contract_and_determinism() -> None:
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=300), "b": rng.normal(size=300), "cat_sex": rng.integers(0, 4, 300)})
    y = (X["a"] + 0.3 * rng.normal(size=300) > 1.2).astype(int).to_numpy()
    for model in ("lgbm", "catboost", "xgboost"):
        est = GBDTStacker(model=model, seeds=(0, 1), n_rounds=15, n_jobs=1, neg_pos_ratio=3)
        assert clone(est).get_params() == est.get_params()
        assert est.fit(X, y) is est and len(est.boosters_) == 2
        p = est.predict_proba(X)
        assert p.shape == (300, 2) and np.allclose(p.sum(1), 1)
        assert np.allclose(p, clone(est).fit(X, y).predict_proba(X))  # fixed seeds: same model
        assert est.categorical_features_ == ["cat_sex"] and np.isclose(est.importance_.sum(), 1)
    idx = undersample(y, 2.0, seed=0)
    assert y[idx].sum() == y.sum() and (y[idx] == 0).sum() == 2 * y.sum()
    with pytest.raises(NotFittedError):
        GBDTStacker().predict_proba(X)


def test_train_stack_writes_every_artifact(trained: tuple) -> None:
    feats, art, cnn, cv = trained
    assert set(cv["models"]) == {"lgbm", "catboost", "xgboost", "blend", "tabular", "cnn"}
    for m in cv["models"].values():
        assert len(m["pauc"]) == 3 and 0 <= m["pauc_mean"] <= 0.2 and {"auc_mean", "pauc_std", "pauc_oof"} <= set(m)
    assert cv["n_rows"] == len(feats) and cv["with_cnn"] and cv["blend"]["method"] == "rank_mean"
    oof = pd.read_parquet(art.oof_stack)
    assert list(oof.columns) == ["isic_id", "fold", "target", "score", "score_lgbm", "score_catboost",
                                 "score_xgboost", "score_tabular", "score_cnn"]
    assert oof["isic_id"].is_unique and len(oof) == len(feats)
    assert np.allclose(oof.set_index("isic_id").loc[cnn["isic_id"], "score_cnn"], cnn["score"])
    names = [sorted(p.name for p in art.stack_fold(k).dir.iterdir()) for k in range(3)]
    assert names[0] == names[1] == names[2] and {"DONE", "config.yaml", "metrics.json", "models.json"} <= set(names[0])
    assert "lgbm_seed0.txt" in names[0] and "tabular_xgboost_seed0.json" in names[0] and not find_pickles(art.root)
    imp = pd.read_csv(art.feature_importance)
    assert np.allclose(imp.groupby(["model", "fold"])["importance"].sum(), 1)
    assert not imp.loc[imp["model"].str.startswith("tabular_"), "feature"].str.startswith("cnn_").any()
    # the tabular cue and the proxy image cue are both needed: the blend must beat each half alone
    assert cv["models"]["blend"]["pauc_oof"] > max(cv["models"]["tabular"]["pauc_oof"], cv["models"]["cnn"]["pauc_oof"])


def test_rerun_skips_finished_folds_refuses_other_config_and_predicts(trained: tuple, caplog) -> None:
    feats, art, cnn, cv = trained
    before = art.stack_fold(0).done.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        again = train_stack(feats, art.folds, art, StackConfig(**TINY_STACK), cnn_oof=cnn)
    assert again["models"] == cv["models"] and art.stack_fold(0).done.stat().st_mtime_ns == before
    assert sum("reusing" in m for m in caplog.messages) == 3
    with pytest.raises(ConfigError, match="n_rounds"):
        train_stack(feats, art.folds, art, StackConfig(**{**TINY_STACK, "n_rounds": 21}), cnn_oof=cnn)
    pred = predict_stack(feats.head(40), art, pairing="mean")  # fold pairing: tests/test_pairing.py
    assert list(pred.columns) == ["isic_id", "score"] and len(pred) == 40 and pred["score"].between(0, 1).all()
    with pytest.raises(StackError, match="test features hold none"):
        predict_stack(feats.head(40).drop(columns=[c for c in feats if c.startswith("cnn_")]), art, pairing="mean")


def test_cnn_oof_guards(tmp_path: Path) -> None:
    feats, art, cnn = make_stack_inputs(tmp_path, n=200)
    folds = pd.read_csv(art.folds)
    cfg = StackConfig(**TINY_STACK)
    with pytest.raises(StackError, match=r"1 missing \(e.g. \['ISIC_"):
        train_stack(feats, art.folds, art, cfg, cnn_oof=cnn.iloc[1:])
    with pytest.raises(StackError, match=r"2 repeated"):
        check_cnn_oof(pd.concat([cnn, cnn.head(2)]), folds)
    shifted = cnn.assign(fold=(cnn["fold"] + 1) % 3)
    with pytest.raises(StackError, match=rf"other folds: {len(cnn)} row\(s\)"):
        train_stack(feats, art.folds, art, cfg, cnn_oof=shifted)
    other = cnn.assign(score=cnn["score"][::-1].to_numpy())  # right folds, but not the featurised scores
    with pytest.raises(StackError, match="rebuild the features"):
        train_stack(feats, art.folds, art, cfg, cnn_oof=other)
    with pytest.raises(StackError, match="does not exist"):
        train_stack(feats, art.folds, art, cfg)
    with pytest.raises(StackError, match=r"training rows: 1 missing \(e.g. \[.ISIC_"):
        train_stack(feats.iloc[1:], art.folds, art, cfg, cnn_oof=cnn)
    assert not art.stack_dir.exists()  # every refusal came before any training


def test_finished_folds_are_not_reused_with_other_inputs(trained: tuple) -> None:
    """Same config, other inputs: features without the CNN, or another fold file, must not reuse folds."""
    feats, art, cnn, _ = trained
    tabular_only = feats.drop(columns=[c for c in feats if c.startswith("cnn_")])
    with pytest.raises(ConfigError, match="other inputs .*features changed"):
        train_stack(tabular_only, art.folds, art, StackConfig(**TINY_STACK), cnn_oof=cnn)
    shifted = cnn.assign(score=cnn["score"].to_numpy()[::-1])
    with pytest.raises(ConfigError, match="other inputs .*cnn_scores"):
        train_stack(build_features(pd.read_csv(REAL_META).head(len(feats)), shifted[["isic_id", "score"]]),
                    art.folds, art, StackConfig(**TINY_STACK), cnn_oof=shifted)


def test_parallel_fits_give_the_same_models(trained: tuple, tmp_path: Path, caplog) -> None:
    """`workers` only changes how fast: the same OOF scores as one fit at a time, and a reused fold's
    config check ignores it."""
    feats, art, cnn, cv = trained
    other = ArtifactPaths(tmp_path)
    other.root.mkdir(exist_ok=True)
    pd.read_csv(art.folds).to_csv(other.folds, index=False)
    again = train_stack(feats, other.folds, other, StackConfig(**TINY_STACK, workers=2), cnn_oof=cnn)
    assert again["models"] == cv["models"]
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        train_stack(feats, art.folds, art, StackConfig(**TINY_STACK, workers=2), cnn_oof=cnn)
    assert sum("reusing" in r.getMessage() for r in caplog.records) == 3


def test_tabular_seeds_fit_only_the_fallback_variant_with_fewer_seeds(trained: tuple, tmp_path: Path) -> None:
    feats, art, cnn, cv = trained
    other = ArtifactPaths(tmp_path)
    other.root.mkdir(exist_ok=True)
    pd.read_csv(art.folds).to_csv(other.folds, index=False)
    cfg = StackConfig(**{**TINY_STACK, "models": ["lgbm"], "seeds": (0, 1), "tabular_seeds": (0,)})
    train_stack(feats, other.folds, other, cfg, cnn_oof=cnn)
    fitted = load_models(other.stack_fold(0).dir)
    assert fitted["lgbm"].seeds == (0, 1) and fitted["tabular_lgbm"].seeds == (0,)
    with pytest.raises(ConfigError, match=r"^tabular_seeds: expected a list of at least one seed or null, got \[\]$"):
        StackConfig(tabular_seeds=())
