"""The stacker's estimator: one GBDT family with the scikit-learn contract (`GBDTStacker`), built from a
`StackConfig` by `estimator`, saved and loaded as each library's native model files (`save_models`,
`load_models`; no pickle).

Per seed it undersamples the negatives (all positives, `neg_pos_ratio` negatives per positive), trains one
booster, and `predict_proba` averages the seeds. A new family is one entry in `tabular.gbdt.FAMILIES`; a new
shared knob is a `GBDTStacker` parameter, a `StackConfig` field and a `SHARED_KNOBS` entry.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from lesionstack.files import read_json, write_bytes, write_json
from lesionstack.paths import FoldFiles
from lesionstack.tabular.features import CAT_PREFIX, CATEGORY_VOCAB, categorical_columns
from lesionstack.tabular.gbdt import FAMILIES, GBDTFamily
from lesionstack.tabular.stack_config import StackConfig, StackError


def estimator(cfg: StackConfig, model: str, seeds: tuple[int, ...] | None = None) -> GBDTStacker:
    """The estimator for one model family, with the config's shared and per-model params (`seeds`: other
    seeds than the config's)."""
    return GBDTStacker(
        model=model, seeds=tuple(cfg.seeds if seeds is None else seeds), neg_pos_ratio=cfg.neg_pos_ratio,
        learning_rate=cfg.learning_rate, n_rounds=cfg.n_rounds, max_depth=cfg.max_depth,
        num_leaves=cfg.num_leaves, min_child_samples=cfg.min_child_samples, subsample=cfg.subsample,
        colsample=cfg.colsample, reg_lambda=cfg.reg_lambda, n_jobs=cfg.n_jobs,
        extra_params=dict(cfg.params.get(model, {})),
    )


def undersample(y: np.ndarray, ratio: float, seed: int, stream: str = "") -> np.ndarray:
    """Row indices: every positive and at most `ratio` negatives per positive (sorted; 0 keeps all).

    `stream` (the family's name) gives each family its own draw for the same seed, so that the blend
    of three families sees three samples of the negatives, not one sample three times."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y != 1)
    n_neg = len(neg) if ratio <= 0 else min(len(neg), int(round(ratio * max(len(pos), 1))))
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())] if stream else seed)
    keep = rng.choice(neg, size=n_neg, replace=False)
    return np.sort(np.concatenate([pos, keep]))


SHARED_KNOBS = ("learning_rate", "max_depth", "num_leaves", "min_child_samples", "subsample", "colsample",
                "reg_lambda")


def family_of(model: str) -> GBDTFamily:
    if model not in FAMILIES:
        raise StackError(f"unknown model {model!r}; known: {list(FAMILIES)}")
    return FAMILIES[model]


def _category_size(column: str, values: pd.Series) -> int:
    # fixed category lists, so train and test codes mean the same category
    return len(CATEGORY_VOCAB.get(column.removeprefix(CAT_PREFIX), ())) or int(values.max()) + 1


class GBDTStacker(ClassifierMixin, BaseEstimator):
    """One GBDT family (an entry of `gbdt.FAMILIES`), bagged over seeds with undersampled negatives.

    `cat_*` columns are treated as categorical by every family. Fitted attributes: `boosters_` (one per
    seed, the library's own model objects), `feature_names_in_`, `n_features_in_`, `feature_dtypes_`,
    `categorical_features_`, `category_sizes_`, `classes_`, `importance_` (gain, sums to 1).
    `save`/`load` write and read the boosters in the library's native format plus a JSON manifest.
    """

    def __init__(self, model: str = "lgbm", seeds: tuple[int, ...] = (0,), neg_pos_ratio: float = 100.0,
                 learning_rate: float = 0.03, n_rounds: int = 300, max_depth: int = 6, num_leaves: int = 31,
                 min_child_samples: int = 20, subsample: float = 0.8, colsample: float = 0.5,
                 reg_lambda: float = 1.0, n_jobs: int = 2, extra_params: dict[str, Any] | None = None):
        self.model = model
        self.seeds = seeds
        self.neg_pos_ratio = neg_pos_ratio
        self.learning_rate = learning_rate
        self.n_rounds = n_rounds
        self.max_depth = max_depth
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample = colsample
        self.reg_lambda = reg_lambda
        self.n_jobs = n_jobs
        self.extra_params = extra_params

    def fit(self, X: pd.DataFrame, y: Any) -> GBDTStacker:
        """Train one booster per seed on all positives and a fresh sample of negatives."""
        fam = family_of(self.model)
        y = np.asarray(y).astype(int)
        if len(y) != len(X) or not np.isin(y, (0, 1)).all() or y.min() == y.max():
            raise StackError(f"fit needs {len(X)} labels holding both 0 and 1")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)
        self.feature_dtypes_ = {c: str(t) for c, t in X.dtypes.items()}
        self.categorical_features_ = categorical_columns(list(X.columns))
        self.category_sizes_ = {c: _category_size(c, X[c]) for c in self.categorical_features_}
        self.classes_ = np.array([0, 1])
        frame, shared = self._frame(X), {k: getattr(self, k) for k in SHARED_KNOBS}
        self.boosters_, gains = [], []
        for seed in self.seeds:
            idx = undersample(y, self.neg_pos_ratio, seed, stream=fam.name)
            params = fam.native_params(shared, seed, self.n_jobs, self.extra_params)
            booster, gain = fam.fit(params, frame.iloc[idx], y[idx], self.categorical_features_, self.n_rounds)
            self.boosters_.append(booster)
            gains.append(gain)
        total = np.mean(gains, axis=0)
        self.importance_ = pd.Series(total / max(total.sum(), 1e-12), index=X.columns)
        return self

    def _frame(self, X: pd.DataFrame) -> pd.DataFrame:
        """X as the family takes it: for XGBoost, categorical codes become Categoricals of fixed size."""
        if not family_of(self.model).categorical_codes or not self.categorical_features_:
            return X
        X = X.copy()
        for c, n in self.category_sizes_.items():
            X[c] = pd.Categorical(X[c].astype(int), categories=range(n))
        return X

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """(n, 2) probabilities, the mean over the seeds' boosters."""
        check_is_fitted(self, "boosters_")
        names = list(self.feature_names_in_)
        missing = [c for c in names if c not in X.columns]
        if missing:
            raise StackError(f"features lack {len(missing)} column(s) the model was trained on, e.g. {missing[:5]}")
        frame, predict = self._frame(self._as_trained(X[names])), family_of(self.model).predict
        p = np.mean([predict(b, frame) for b in self.boosters_], axis=0)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Class labels at probability 0.5 (the stacker's outputs are used as scores, not labels)."""
        check_is_fitted(self, "boosters_")
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]

    def _as_trained(self, X: pd.DataFrame) -> pd.DataFrame:
        """X with the training dtypes (a float32 or int table from elsewhere scores like the training one)."""
        differ = {c: t for c, t in self.feature_dtypes_.items() if str(X[c].dtype) != t}
        for c, t in differ.items():
            try:
                X = X.assign(**{c: X[c].astype(t)})
            except (TypeError, ValueError) as e:
                raise StackError(f"feature column {c!r} is {X[c].dtype}, the model was trained on {t}: {e}") from e
        return X

    # ---- native model files + JSON, never a pickle ----

    def save(self, folder: str | os.PathLike[str], name: str) -> dict[str, Any]:
        """Write one native model file per seed as `folder/name_seedS.ext`; return the JSON manifest
        (params, feature columns and dtypes, category vocabularies, files) that `load` needs."""
        check_is_fitted(self, "boosters_")
        fam, folder = family_of(self.model), Path(folder)
        files = [f"{name}_seed{seed}{fam.suffix}" for seed in self.seeds]
        for file, booster in zip(files, self.boosters_, strict=True):
            write_bytes(folder / file, fam.dump(booster))
        return {
            "family": fam.name, "format": fam.format, "library": fam.package, "library_version": fam.version(),
            "params": self.get_params(), "files": files,
            "feature_columns": list(self.feature_names_in_), "feature_dtypes": self.feature_dtypes_,
            "categorical_features": self.categorical_features_, "category_sizes": self.category_sizes_,
            "category_vocab": {c: list(CATEGORY_VOCAB.get(c.removeprefix(CAT_PREFIX), ()))
                               for c in self.categorical_features_},
            "importance": self.importance_.to_dict(),
        }

    @classmethod
    def load(cls, folder: str | os.PathLike[str], manifest: dict[str, Any]) -> GBDTStacker:
        """The fitted estimator that `save` wrote into `folder` with this manifest."""
        params = dict(manifest["params"], seeds=tuple(manifest["params"]["seeds"]))
        est, fam = cls(**params), family_of(manifest["family"])
        missing = [f for f in manifest["files"] if not (Path(folder) / f).is_file()]
        if missing:
            raise StackError(f"{folder}: model file(s) {missing} named in the manifest do not exist")
        est.boosters_ = [fam.load(Path(folder) / f) for f in manifest["files"]]
        est.feature_names_in_ = np.asarray(manifest["feature_columns"], dtype=object)
        est.n_features_in_ = len(est.feature_names_in_)
        est.feature_dtypes_ = dict(manifest["feature_dtypes"])
        est.categorical_features_ = list(manifest["categorical_features"])
        est.category_sizes_ = {c: int(n) for c, n in manifest["category_sizes"].items()}
        est.classes_ = np.array([0, 1])
        est.importance_ = pd.Series(manifest["importance"], dtype=float).reindex(est.feature_names_in_)
        return est


def save_models(fitted: dict[str, GBDTStacker], folder: Path) -> Path:
    """Native model files for every variant of a fold, then `models.json` naming them (written last)."""
    manifest = {"format_version": 1, "variants": {name: est.save(folder, name) for name, est in fitted.items()}}
    return write_json(FoldFiles(folder).models, manifest)


def load_models(folder: Path) -> dict[str, GBDTStacker]:
    """The fitted variants of one stack fold folder, from `models.json` and the native model files."""
    path = FoldFiles(folder).models
    if not path.is_file():
        old = " (it holds a pickle from an older release: retrain the stacker)" if (
            FoldFiles(folder).pickled_models).is_file() else ""
        raise StackError(f"{path}: no stack models{old}")
    manifest = read_json(path)
    try:
        return {name: GBDTStacker.load(folder, m) for name, m in manifest["variants"].items()}
    except (KeyError, TypeError) as e:
        raise StackError(f"{path}: unreadable model manifest, missing {e}") from e
