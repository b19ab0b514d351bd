"""The GBDT family table: every entry fits, scores, saves to its native format and loads back to the same
predictions, maps its knobs and searches its space; the estimator passes scikit-learn's own checks; no
pickle anywhere in what the stacker writes, and `package` refuses one.

Each test iterates `FAMILIES`, so a new entry is checked without touching this file.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import (
    check_estimators_unfitted,
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from lesionstack.files import write_json
from lesionstack.tabular.estimator import GBDTStacker, load_models, save_models, undersample
from lesionstack.tabular.gbdt import FAMILIES, SEARCH_SPACE, find_pickles, kaggle_wheels
from lesionstack.tabular.stack import with_params
from lesionstack.tabular.stack_config import StackConfig, StackError

FAMILY_NAMES = list(FAMILIES)


def toy(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Numeric, int16-coded categorical (as build_features writes them) and float32 columns."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n).astype(np.float32),
                      "cat_sex": rng.integers(0, 4, n).astype(np.int16),
                      "cat_anatom_site_general": rng.integers(0, 5, n).astype(np.int16)})  # 7 in the vocabulary
    y = (X["a"] + 0.5 * (X["cat_sex"] == 2) + 0.3 * rng.normal(size=n) > 1.0).astype(int).to_numpy()
    return X, y


def small(model: str, **kw) -> GBDTStacker:
    return GBDTStacker(model=model, **{"seeds": (0, 1), "n_rounds": 12, "n_jobs": 1, "neg_pos_ratio": 4,
                                       "max_depth": 3, "num_leaves": 7, "min_child_samples": 5, **kw})


@pytest.fixture(scope="module")
def fitted() -> dict[str, GBDTStacker]:
    X, y = toy()
    return {m: small(m).fit(X, y) for m in FAMILY_NAMES}


@pytest.mark.parametrize("model", FAMILY_NAMES)
def test_native_save_load_gives_the_same_predictions(model: str, fitted: dict, tmp_path: Path) -> None:
    est, (X, _) = fitted[model], toy(150, seed=1)
    manifest = json.loads(json.dumps(est.save(tmp_path, "m")))  # through JSON, as on disk
    again = GBDTStacker.load(tmp_path, manifest)
    assert np.array_equal(again.predict_proba(X), est.predict_proba(X))  # every native format is exact
    assert again.get_params() == est.get_params() and list(again.feature_names_in_) == list(X.columns)
    assert np.allclose(again.importance_, est.importance_)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"m_seed{s}{FAMILIES[model].suffix}" for s in (0, 1)]
    assert not find_pickles(tmp_path)
    assert manifest["library_version"] == FAMILIES[model].version()


def test_native_files_are_what_older_releases_read(fitted: dict, tmp_path: Path) -> None:
    """Cheap stand-ins for loading with older releases: the formats declare their versions, and the text
    and JSON models parse without the library (the `kaggle` environment loads them with old releases)."""
    for model, est in fitted.items():
        est.save(tmp_path, model)
    text = (tmp_path / "lgbm_seed0.txt").read_text()
    assert text.startswith("tree\nversion=v4\n") and "\nTree=0\n" in text  # LightGBM 4.x text model
    doc = json.loads((tmp_path / "xgboost_seed0.json").read_text())
    assert doc["version"][0] >= 2 and doc["learner"]["gradient_booster"]["name"] == "gbtree"
    assert (tmp_path / "catboost_seed0.cbm").read_bytes()[:4] == b"CBM1"


@pytest.mark.parametrize("model", FAMILY_NAMES)
def test_each_family_learns_and_categories_are_fixed(model: str, fitted: dict) -> None:
    est = fitted[model]
    X, y = toy(2000, seed=2)
    p = est.predict_proba(X)
    assert p.shape == (len(X), 2) and np.allclose(p.sum(1), 1) and est.predict(X).shape == (len(X),)
    assert np.corrcoef(p[:, 1], y)[0, 1] > 0.3
    # category sizes come from the fixed vocabularies, not from the data seen
    assert est.category_sizes_ == {"cat_sex": 4, "cat_anatom_site_general": 7}
    # a test table with float codes and float32 columns of other dtypes scores like the training dtypes
    assert np.array_equal(est.predict_proba(X.astype({"cat_sex": float, "a": np.float32})),
                          est.predict_proba(X.astype({"a": np.float32})))


@pytest.mark.parametrize("model", FAMILY_NAMES)
def test_knob_names_and_search_space(model: str) -> None:
    fam = FAMILIES[model]
    assert set(fam.tuned) <= set(fam.native_names) and set(fam.tuned) <= set(SEARCH_SPACE)
    assert list(fam.tuned) == [k for k in SEARCH_SPACE if k in fam.tuned]  # suggestion order is fixed
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = fam.search_space(study.ask())
    assert list(params) == list(fam.tuned)
    native = with_params(StackConfig(models=(model,)), model, params).params[model]
    assert set(native) == {fam.native_names[k] for k in params}
    native_params = fam.native_params(params, seed=3, n_jobs=1)
    assert native_params[fam.seed_param] == 3 and native_params[fam.threads_param] == 1
    with pytest.raises(StackError, match="cannot set"):
        with_params(StackConfig(), model, {"no_such_knob": 1})
    assert any(w.startswith(f"{fam.wheel}==") for w in kaggle_wheels())


@pytest.mark.parametrize("model", FAMILY_NAMES)
def test_every_tuned_knob_changes_predictions(model: str) -> None:
    """A knob Optuna searches must reach the booster (CatBoost's symmetric trees, e.g., ignore min_data_in_leaf)."""
    X, y = toy(600, seed=4)
    base = dict(seeds=(0,), n_rounds=20, n_jobs=1, neg_pos_ratio=0, max_depth=6, num_leaves=31, min_child_samples=20)
    for knob in FAMILIES[model].tuned:
        low, high, _, integer = SEARCH_SPACE[knob]
        a, b = (GBDTStacker(model=model, **{**base, knob: int(v) if integer else v}).fit(X, y).predict_proba(X)
                for v in (low, high))
        assert not np.allclose(a, b), f"{model}: {knob} {low} and {high} give the same predictions"


def test_each_family_draws_its_own_negatives() -> None:
    y = np.r_[np.ones(20), np.zeros(2000)].astype(int)
    draws = {(m, s): tuple(undersample(y, 5.0, s, stream=m)) for m in FAMILY_NAMES for s in (0, 1)}
    assert len(set(draws.values())) == len(draws)  # every family and seed: another sample
    assert all(y[list(d)].sum() == 20 and len(d) == 120 for d in draws.values())  # all positives, 5:1
    assert draws[("lgbm", 0)] == tuple(undersample(y, 5.0, 0, stream="lgbm"))  # reproducible


@pytest.mark.parametrize("model", FAMILY_NAMES)
def test_sklearn_contract(model: str) -> None:
    est = small(model)
    name = type(est).__name__
    check_no_attributes_set_in_init(name, est)
    check_get_params_invariance(name, est)
    check_set_params(name, est)
    check_parameters_default_constructible(name, est)
    check_estimators_unfitted(name, est)
    assert clone(est).get_params() == est.get_params()
    assert est.set_params(n_rounds=5).get_params()["n_rounds"] == 5
    with pytest.raises(NotFittedError):
        est.predict_proba(toy(10)[0])
    with pytest.raises(NotFittedError):
        est.save(".", "x")
    X, y = toy()
    assert est.fit(X, y) is est and all(hasattr(est, a) for a in ("boosters_", "classes_", "n_features_in_"))


def test_fold_models_round_trip_and_refusals(fitted: dict, tmp_path: Path) -> None:
    save_models(fitted, tmp_path)
    loaded = load_models(tmp_path)
    X, _ = toy(50, seed=3)
    assert all(np.array_equal(loaded[m].predict_proba(X), fitted[m].predict_proba(X)) for m in fitted)
    (tmp_path / "lgbm_seed1.txt").unlink()
    with pytest.raises(StackError, match=r"lgbm_seed1.txt"):
        load_models(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "models.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(StackError, match="pickle from an older release"):
        load_models(old)


def test_find_pickles(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "raw.bin").write_bytes(pickle.dumps([1, 2], protocol=2))
    (tmp_path / "named.pkl").write_bytes(b"not even a pickle")
    with zipfile.ZipFile(tmp_path / "weights.pt", "w") as zf:  # torch.save's layout
        zf.writestr("archive/data.pkl", pickle.dumps({}))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("model.json", "{}")
    write_json(tmp_path / "models.json", {"a": 1})
    (tmp_path / "model.txt").write_text("tree\nversion=v4\n")
    assert [p.name for p in find_pickles(tmp_path)] == ["raw.bin", "named.pkl", "weights.pt"]


def test_package_refuses_a_pickled_stacker(tmp_path: Path) -> None:
    from lesionstack.inference.package import package

    art = tmp_path / "art"
    write_json(art / "cv.json", {"with_cnn": False, "n_folds": 1})
    (art / "stack" / "fold_0").mkdir(parents=True)
    (art / "stack" / "fold_0" / "models.pkl").write_bytes(pickle.dumps({"lgbm": 1}))
    with pytest.raises(ValueError, match=r"1 pickle\(s\) would leave the machine.*fold_0/models.pkl"):
        package(art, tmp_path / "out", ship=())
    assert not (tmp_path / "out").exists()
