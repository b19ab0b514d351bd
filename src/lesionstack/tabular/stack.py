"""The GBDT stacker: LightGBM, CatBoost and XGBoost on the tabular features (+ CNN scores), per fold.

`GBDTStacker` is one model family with the scikit-learn contract: per seed it undersamples the negatives
(all positives, `neg_pos_ratio` negatives per positive), trains one booster, and `predict_proba` averages
the seeds. `train_stack` fits every family on every fold of the fold file, twice when CNN scores are in
the features (with them, and the "tabular" variant without them, so that the gain of stacking is on
record), blends the families by rank mean (or by weights tuned on the OOF), and writes per-fold models,
`oof_stack.parquet`, `cv.json` and `stack/feature_importance.csv`. `predict_stack` scores a test feature
table with the saved fold models, blended as in training; with CNN features, stack fold k sees CNN fold
k's test score (`tabular.pairing`).

No leakage between the two halves: CNN scores must be out-of-fold for this very fold file, cover every
training row exactly once, and be the scores the feature table was built from (`check_cnn_oof`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from lesionstack.data.metadata import id_mismatch
from lesionstack.data.schema import ID_COLUMN, PATIENT_COLUMN, TARGET_COLUMN
from lesionstack.files import atomic_path, read_json, write_bytes, write_json, write_text
from lesionstack.folds import folds_digest, read_folds
from lesionstack.metrics import pauc, roc_auc, top_n_sensitivity
from lesionstack.paths import ArtifactPaths, FoldFiles
from lesionstack.resume import Resume, frame_digest, guard
from lesionstack.tabular.features import CAT_PREFIX, CATEGORY_VOCAB, CNN_PREFIX, categorical_columns, has_cnn
from lesionstack.tabular.gbdt import FAMILIES, GBDTFamily
from lesionstack.tabular.image_scores import add_noise, standardise_test, standardise_training
from lesionstack.tabular.outliers import LOF_COLUMN
from lesionstack.tabular.pairing import PAIRINGS, check_fold_pairing, paired_features
from lesionstack.tabular.selection import selection_flags
from lesionstack.tabular.stack_config import RUNTIME_KEYS, TUNE_IGNORE, StackConfig, StackError

log = logging.getLogger(__name__)

TABULAR = "tabular_"  # prefix of the models trained without CNN features


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


# ---- the estimator ---------------------------------------------------------------------------------------


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


def _family(model: str) -> GBDTFamily:
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
        fam = _family(self.model)
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
        if not _family(self.model).categorical_codes or not self.categorical_features_:
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
        frame, predict = self._frame(self._as_trained(X[names])), _family(self.model).predict
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
        fam, folder = _family(self.model), Path(folder)
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
        est, fam = cls(**params), _family(manifest["family"])
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


# ---- blending --------------------------------------------------------------------------------------------


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1]: a scale-free score that can be averaged across model families."""
    return rankdata(x) / len(x)


def blend(scores: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
    """Weighted mean of rank-normalised scores (equal weights: the rank mean)."""
    names = sorted(scores)
    w = np.array([1.0 if weights is None else weights.get(n, 0.0) for n in names])
    if w.sum() <= 0:
        raise StackError(f"blend weights {weights} give no weight to any of {names}")
    return sum(wi * rank_normalise(scores[n]) for wi, n in zip(w, names, strict=True)) / w.sum()


def fit_blend_weights(scores: dict[str, np.ndarray], y: np.ndarray, step: float = 0.1) -> dict[str, float]:
    """Weights on a simplex grid (`step`) that maximise OOF pAUC; ties go to the most even weights.

    Tuned on the same OOF it is scored on, so the blend's OOF pAUC is slightly optimistic.
    """
    names = sorted(scores)
    n = round(1 / step)
    grid = [c for c in np.ndindex(*(n + 1,) * len(names)) if sum(c) == n]
    best, best_w = -1.0, None
    for combo in sorted(grid, key=lambda c: np.var(c)):
        w = {name: k / n for name, k in zip(names, combo, strict=True)}
        value = pauc(y, blend(scores, w))
        if value > best + 1e-12:
            best, best_w = value, w
    assert best_w is not None
    return best_w


# ---- guards ----------------------------------------------------------------------------------------------


def _examples(ids: pd.Series | pd.Index | list[str], n: int = 5) -> list[str]:
    return [str(i) for i in list(ids)[:n]]


def align_features(features: pd.DataFrame, folds: pd.DataFrame, where: str = "features") -> pd.DataFrame:
    """The feature rows in fold-file order; refuse a table that does not hold every training row once."""
    if ID_COLUMN not in features.columns:
        raise StackError(f"{where}: no column {ID_COLUMN!r}")
    ids = features[ID_COLUMN].astype(str)
    if why := id_mismatch(ids, folds[ID_COLUMN]):
        raise StackError(f"{where} does not match the fold file's training rows: {why}")
    return features.set_index(ids).loc[folds[ID_COLUMN]].reset_index(drop=True)


def check_cnn_oof(cnn_oof: pd.DataFrame, folds: pd.DataFrame, where: str = "CNN OOF scores") -> pd.DataFrame:
    """Refuse CNN scores that are not out-of-fold for this fold file; return them in fold-file order.

    Every training row must be scored exactly once, by the model of its own fold.
    """
    need = [c for c in (ID_COLUMN, "fold", "score") if c not in cnn_oof.columns]
    if need:
        raise StackError(f"{where}: missing column(s) {need}")
    ids = cnn_oof[ID_COLUMN].astype(str)
    if why := id_mismatch(ids, folds[ID_COLUMN]):
        raise StackError(f"{where} must score every training row exactly once: {why}")
    oof = cnn_oof.assign(**{ID_COLUMN: ids}).set_index(ID_COLUMN).loc[folds[ID_COLUMN]].reset_index()
    wrong = oof["fold"].to_numpy() != folds["fold"].to_numpy()
    if wrong.any():
        raise StackError(
            f"{where} were made with other folds: {int(wrong.sum())} row(s) carry a fold that differs from "
            f"the fold file (e.g. {_examples(oof.loc[wrong, ID_COLUMN])}); retrain the CNN on this fold file"
        )
    if not np.isfinite(oof["score"].to_numpy(dtype=float)).all():
        bad = oof.loc[~np.isfinite(oof["score"].to_numpy(dtype=float)), ID_COLUMN]
        raise StackError(f"{where}: {len(bad)} non-finite score(s), e.g. {_examples(bad)}")
    return oof


def _check_features_match_oof(features: pd.DataFrame, oof: pd.DataFrame) -> None:
    diff = np.abs(features[f"{CNN_PREFIX}score"].to_numpy(float) - oof["score"].to_numpy(float)) > 1e-4
    if diff.any():
        raise StackError(
            f"the feature table's cnn_score differs from the CNN OOF scores in {int(diff.sum())} row(s) "
            f"(e.g. {_examples(oof.loc[diff, ID_COLUMN])}): rebuild the features from these OOF scores"
        )


# ---- the stage -------------------------------------------------------------------------------------------


def with_params(cfg: StackConfig, model: str, params: dict[str, Any]) -> StackConfig:
    """`cfg` with `params` (shared knob names: learning_rate, max_depth...) set for one model family only."""
    native = {**cfg.params.get(model, {}), **_native(model, params)}
    return dataclasses.replace(cfg, params={**cfg.params, model: native})


def tuning_inputs(features: pd.DataFrame, folds: pd.DataFrame) -> dict[str, str]:
    """What a tuning study and its best params depend on: the feature values (aligned to the fold file)
    and the folds. Recorded in `tune/inputs.json` beside the stack config in `tune/config.yaml`."""
    return {"features": frame_digest(features), "folds": folds_digest(folds)}


def apply_tuned_params(cfg: StackConfig, artifacts: ArtifactPaths,
                       inputs: dict[str, str]) -> tuple[StackConfig, dict | None]:
    """Merge the tuned params (artifacts.best_params) into the config, when present and wanted.

    Refused (ResumeError naming what changed) when the study was run on other features or folds (`inputs`,
    see `tuning_inputs`) or with another stack config: its best params were chosen for those.
    """
    if not cfg.use_tuned or not artifacts.best_params.is_file():
        return cfg, None
    guard(artifacts.tune, cfg, inputs, ignore=TUNE_IGNORE, partial=(), done=artifacts.best_params, write=False)
    tuned = read_json(artifacts.best_params)
    if tuned["model"] not in cfg.models:
        return cfg, None
    return with_params(cfg, tuned["model"], tuned["params"]), {"source": str(artifacts.best_params), **tuned}


def _native(model: str, shared: dict[str, Any]) -> dict[str, Any]:
    """Shared knob names in one family's native parameter names."""
    try:
        return _family(model).rename(shared)
    except KeyError as e:
        raise StackError(e.args[0]) from None


def _variants(with_cnn: bool, cfg: StackConfig) -> dict[str, tuple[str, bool]]:
    """name -> (model family, uses CNN features)."""
    out = {m: (m, with_cnn) for m in cfg.models}
    if with_cnn and cfg.train_tabular:
        out |= {f"{TABULAR}{m}": (m, False) for m in cfg.models}
    return out


def _fit_fold(features: pd.DataFrame, folds: pd.DataFrame, k: int, cfg: StackConfig, with_cnn: bool,
              artifacts: ArtifactPaths) -> pd.DataFrame:
    """Train every variant on the other folds, score fold k, write the fold folder; return fold k's OOF."""
    ff = artifacts.stack_fold(k)
    train, val = folds["fold"].to_numpy() != k, folds["fold"].to_numpy() == k
    y = folds[TARGET_COLUMN].to_numpy()
    oof = pd.DataFrame({ID_COLUMN: folds.loc[val, ID_COLUMN].to_numpy()})
    variants = _variants(with_cnn, cfg)

    def fit_variant(name: str) -> tuple[GBDTStacker, np.ndarray]:
        model, cnn = variants[name]
        cols = [c for c in features.columns if c != ID_COLUMN and (cnn or not c.startswith(CNN_PREFIX))]
        seeds = None if cnn or not with_cnn else cfg.tabular_seeds  # the fallback variant beside CNN features
        noisy = [c for c in cols if c.startswith(CNN_PREFIX)]  # training rows only: fold k is scored clean
        X = add_noise(features.loc[train, cols], noisy, cfg.cnn_noise, [k, zlib.crc32(name.encode())])
        est = estimator(cfg, model, seeds).fit(X, y[train])
        return est, est.predict_proba(features.loc[val, cols])[:, 1]

    # one booster thread each and `workers` fits at once: on a small shared box, OpenMP threads that
    # spin-wait for each other were many times slower than independent single-threaded fits
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        results = dict(zip(variants, pool.map(fit_variant, variants), strict=True))
    fitted, importance, metrics = {}, [], {}
    for name, (est, score) in results.items():
        oof[f"score_{name}"] = score
        metrics[name] = {"pauc": pauc(y[val], score), "auc": roc_auc(y[val], score)}
        fitted[name] = est
        importance.append(pd.DataFrame({"model": name, "fold": k, "feature": est.importance_.index,
                                        "importance": est.importance_.to_numpy()}))
    save_models(fitted, ff.dir)
    with atomic_path(ff.oof) as tmp:
        oof.to_parquet(tmp, index=False)
    with atomic_path(ff.importance) as tmp:
        pd.concat(importance).to_csv(tmp, index=False)
    write_json(ff.metrics, {"fold": k, "n_train": int(train.sum()), "n_val": int(val.sum()),
                            "with_cnn": with_cnn, "models": metrics})
    write_text(ff.done, "done\n")  # last: its presence means the fold finished
    return oof


def _fold_scores(y: np.ndarray, s: np.ndarray, fold: np.ndarray, k: int) -> dict[str, Any]:
    p = [pauc(y[fold == i], s[fold == i]) for i in range(k)]
    a = [roc_auc(y[fold == i], s[fold == i]) for i in range(k)]
    return {"pauc": p, "pauc_mean": float(np.mean(p)), "pauc_std": float(np.std(p)),
            "auc": a, "auc_mean": float(np.mean(a)), "auc_std": float(np.std(a)), "pauc_oof": pauc(y, s)}


def _load_features(features: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    return features.copy() if isinstance(features, pd.DataFrame) else pd.read_parquet(features)


def train_stack(features: str | os.PathLike[str] | pd.DataFrame, folds_path: str | os.PathLike[str],
                artifacts: ArtifactPaths, cfg: StackConfig | None = None,
                cnn_oof: str | os.PathLike[str] | pd.DataFrame | None = None,
                ) -> dict[str, Any]:
    """Train the stacker on every fold; write fold models, oof_stack.parquet, cv.json, importances.

    `cnn_oof` defaults to `artifacts.oof_cnn` when the feature table holds CNN features. A fold whose
    DONE marker exists is reused, and refused if its config or inputs differ (`resume.guard`). Returns the
    cv.json content.
    """
    folds = read_folds(folds_path)
    where = "features" if isinstance(features, pd.DataFrame) else f"feature file {features}"
    feats = align_features(_load_features(features), folds, where=f"{where} (fold file {folds_path})")
    cfg, tuned = apply_tuned_params(cfg or StackConfig(), artifacts, tuning_inputs(feats, folds))
    if tuned:
        log.info("using tuned params for %s from %s: %s", tuned["model"], tuned["source"], tuned["params"])
    with_cnn = cfg.use_cnn and has_cnn(feats)
    oof_cnn = _cnn_oof(feats, folds, artifacts, cnn_oof, with_cnn)
    if not with_cnn:
        feats = feats[[c for c in feats.columns if not c.startswith(CNN_PREFIX)]]
    if not cfg.use_lof:
        feats = feats.drop(columns=[LOF_COLUMN], errors="ignore")
    scales = None
    if cfg.cnn_standardise and with_cnn:
        feats, scales = standardise_training(feats, oof_cnn)
    n_folds = int(folds["fold"].max()) + 1
    inputs = _inputs(feats, folds, with_cnn, oof_cnn)
    parts = []
    for k in tqdm(range(n_folds), desc="stack folds", disable=None):
        ff = artifacts.stack_fold(k)
        # no checkpoint: an unfinished fold restarts; a finished one is reused only for the same config
        # and inputs, and refused otherwise (the message names the changed key)
        if guard(ff, cfg, inputs, ignore=RUNTIME_KEYS, partial=()) is Resume.SKIP:
            log.info("fold %d: finished before, reusing %s", k, ff.dir)
            parts.append(pd.read_parquet(ff.oof))
            continue
        parts.append(_fit_fold(feats, folds, k, cfg, with_cnn, artifacts))
    oof = folds.merge(pd.concat(parts), on=ID_COLUMN, how="left", validate="one_to_one")
    return _summarise(oof, oof_cnn, folds, cfg, with_cnn, tuned, artifacts, n_folds, scales)


def _inputs(feats: pd.DataFrame, folds: pd.DataFrame, with_cnn: bool,
            oof_cnn: pd.DataFrame | None) -> dict[str, Any]:
    """What a stack fold is made from: the feature VALUES it trains on, the folds, the CNN's OOF scores
    (ids, folds, values) and the negative-draw scheme; a finished fold is reused only when all of it is
    unchanged."""
    inputs: dict[str, Any] = {
        "folds": folds_digest(folds),
        "features": frame_digest(feats),
        "with_cnn": with_cnn,
        "negative_draws": "per family and seed",  # folds of releases that drew one sample per seed differ
    }
    if with_cnn and oof_cnn is not None:
        inputs["cnn_scores"] = frame_digest(oof_cnn, [ID_COLUMN, "fold", "score"])
    return inputs


def _cnn_oof(feats: pd.DataFrame, folds: pd.DataFrame, artifacts: ArtifactPaths,
             cnn_oof: str | os.PathLike[str] | pd.DataFrame | None, with_cnn: bool) -> pd.DataFrame | None:
    if cnn_oof is None and artifacts.oof_cnn.is_file():
        cnn_oof = artifacts.oof_cnn  # checked, and its pAUC recorded, even when the models do not use it
    if cnn_oof is None and with_cnn:
        raise StackError(f"the features hold CNN scores but {artifacts.oof_cnn} does not exist to check "
                         "that they are out-of-fold; pass cnn_oof or rebuild features without CNN scores")
    if cnn_oof is None:
        return None
    where = str(cnn_oof) if not isinstance(cnn_oof, pd.DataFrame) else "CNN OOF scores"
    frame = cnn_oof if isinstance(cnn_oof, pd.DataFrame) else pd.read_parquet(cnn_oof)
    oof = check_cnn_oof(frame, folds, where)
    if with_cnn:
        _check_features_match_oof(feats, oof)
    return oof


def _summarise(oof: pd.DataFrame, oof_cnn: pd.DataFrame | None, folds: pd.DataFrame, cfg: StackConfig,
               with_cnn: bool, tuned: dict | None, artifacts: ArtifactPaths, n_folds: int,
               cnn_scales: dict[str, list[float]] | None = None) -> dict[str, Any]:
    y, fold = oof[TARGET_COLUMN].to_numpy(), oof["fold"].to_numpy()
    main = {m: oof[f"score_{m}"].to_numpy() for m in cfg.models}
    weights = fit_blend_weights(main, y) if cfg.blend == "weights" and len(main) > 1 else None
    oof["score"] = blend(main, weights)
    tab_names = [f"{TABULAR}{m}" for m in cfg.models if f"score_{TABULAR}{m}" in oof]
    if tab_names:
        tab = {n: oof[f"score_{n}"].to_numpy() for n in tab_names}
        oof["score_tabular"] = blend(tab, fit_blend_weights(tab, y) if weights else None)
        oof = oof.drop(columns=[f"score_{n}" for n in tab_names])
    elif not with_cnn:
        oof["score_tabular"] = oof["score"]  # no CNN features: the blend is the tabular model
    if oof_cnn is not None:
        oof["score_cnn"] = oof_cnn["score"].to_numpy()
    models = {m: _fold_scores(y, main[m], fold, n_folds) for m in cfg.models}
    models["blend"] = _fold_scores(y, oof["score"].to_numpy(), fold, n_folds)
    if "score_tabular" in oof:  # absent only with CNN features and train_tabular false
        models["tabular"] = _fold_scores(y, oof["score_tabular"].to_numpy(), fold, n_folds)
    if oof_cnn is not None:
        models["cnn"] = _fold_scores(y, oof["score_cnn"].to_numpy(), fold, n_folds)
    patient = oof[PATIENT_COLUMN].to_numpy()  # each patient sits in one fold: one model ranks its lesions
    for name, entry in models.items():
        entry["top15_oof"] = top_n_sensitivity(y, oof["score" if name == "blend" else f"score_{name}"], patient)
    cols = [ID_COLUMN, "fold", TARGET_COLUMN, "score", *[f"score_{m}" for m in cfg.models]]
    oof = oof[cols + [c for c in ("score_tabular", "score_cnn") if c in oof]]
    cv = {"metric": "pauc", "n_folds": n_folds, "n_rows": len(oof), "n_positives": int(y.sum()),
          "models": models, "blend": {"method": cfg.blend, "weights": weights or {m: 1 / len(main) for m in main}},
          "with_cnn": with_cnn, "tuned_params": tuned, "cnn_scales": cnn_scales,
          "selection": selection_flags(tuned is not None or weights is not None, with_cnn, artifacts, n_folds)}
    with atomic_path(artifacts.oof_stack) as tmp:
        oof.to_parquet(tmp, index=False)
    imp = pd.concat(pd.read_csv(artifacts.stack_fold(k).importance) for k in range(n_folds))
    with atomic_path(artifacts.feature_importance) as tmp:
        imp.to_csv(tmp, index=False)
    write_json(artifacts.cv_json, cv)
    return cv


def predict_stack(test_features: str | os.PathLike[str] | pd.DataFrame, artifacts: ArtifactPaths,
                  variant: str = "main", *, fold_cnn: pd.DataFrame | None = None,
                  pairing: str = "fold") -> pd.DataFrame:
    """Score a test feature table with the saved fold models: mean over folds and seeds, then the blend
    of training (cv.json). Returns DataFrame[isic_id, score].

    With CNN features, stack fold k scores the test rows with CNN fold k's features (`fold_cnn`, the long
    table of `pairing.fold_cnn_features`; the fold files are checked, `pairing.check_fold_pairing`), so
    train and test features have one scale. `pairing="mean"` scores every fold on `test_features`' own
    CNN features (the mean of the fold models' scores): only to measure what pairing changes.
    `variant="tabular"` scores with the models trained without CNN features (`tabular_<family>`, trained
    when `train_tabular` is on), rank-mean blended: the score of a row whose crop could not be read."""
    feats = _load_features(test_features)
    per_fold = fold_probabilities(feats, artifacts, variant, fold_cnn=fold_cnn, pairing=pairing)
    return blend_folds(feats, per_fold, artifacts, variant)


def blend_folds(feats: pd.DataFrame, per_fold: dict[str, np.ndarray], artifacts: ArtifactPaths,
                variant: str = "main") -> pd.DataFrame:
    """DataFrame[isic_id, score] from `fold_probabilities`' output: each family's mean over the stack folds,
    then the blend of training (cv.json)."""
    cv = read_json(artifacts.cv_json)
    sums = {m: p.mean(axis=0) for m, p in per_fold.items()}
    # the tabular variant's blend weights are not saved (cv.json keeps the main blend's): rank mean
    weights = cv["blend"]["weights"] if cv["blend"]["method"] == "weights" and variant == "main" else None
    return pd.DataFrame({ID_COLUMN: feats[ID_COLUMN].astype(str).to_numpy(), "score": blend(sums, weights)})


def fold_probabilities(feats: pd.DataFrame, artifacts: ArtifactPaths, variant: str = "main", *,
                       fold_cnn: pd.DataFrame | None = None, pairing: str = "fold") -> dict[str, np.ndarray]:
    """Per blended family: (n_folds, n) probabilities, row k from stack fold k's models (see
    `predict_stack` for `fold_cnn` and `pairing`)."""
    if variant not in ("main", "tabular"):
        raise StackError(f"variant must be 'main' or 'tabular', got {variant!r}")
    if pairing not in PAIRINGS:
        raise StackError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    cv = read_json(artifacts.cv_json)
    if cv["with_cnn"] and not has_cnn(feats):
        raise StackError("the stacker was trained with CNN features, but the test features hold none: "
                         "build them with the CNN's test scores")
    paired = cv["with_cnn"] and variant == "main" and pairing == "fold"
    if paired and fold_cnn is None:
        raise StackError(f"{artifacts.cv_json}: the stacker uses CNN features, so stack fold k scores the test "
                         "rows with CNN fold k's score: pass fold_cnn (tabular.pairing.fold_cnn_features of the "
                         "per-fold test scores), or pairing='mean' to use the mean score for every fold")
    if paired:
        check_fold_pairing(artifacts, cv["n_folds"])
    names = [m if variant == "main" else f"{TABULAR}{m}" for m in cv["blend"]["weights"]]
    out = {m: np.zeros((cv["n_folds"], len(feats))) for m in names}
    for k in range(cv["n_folds"]):
        ff = artifacts.stack_fold(k)
        if not ff.done.is_file():
            raise StackError(f"{ff.dir}: fold {k} of the stacker did not finish; run train-stack first")
        fitted = load_models(ff.dir)
        if missing := [m for m in names if m not in fitted]:
            raise StackError(f"{ff.dir}: no {missing} models (train the stacker with train_tabular on)")
        X = paired_features(feats, fold_cnn, k, "test CNN features") if paired else feats  # type: ignore[arg-type]
        if cv.get("cnn_scales") and has_cnn(X):  # the scale of the CNN model whose score X holds
            X = standardise_test(X, cv["cnn_scales"], k if paired else None)
        for m in names:
            out[m][k] = fitted[m].predict_proba(X)[:, 1]
    return out


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


def format_cv(cv: dict[str, Any]) -> str:
    """cv.json as a few readable lines (mean +- std fold pAUC, OOF pAUC, per model)."""
    lines = [f"{cv['n_rows']} rows, {cv['n_positives']} positives, {cv['n_folds']} folds; "
             f"blend {cv['blend']['method']} {cv['blend']['weights']}"]
    if cv.get("tuned_params"):
        lines.append(f"tuned params for {cv['tuned_params']['model']} from {cv['tuned_params']['source']}")
    for name, m in cv["models"].items():
        lines.append(f"  {name:9s} pAUC {m['pauc_mean']:.4f} +- {m['pauc_std']:.4f} (OOF {m['pauc_oof']:.4f}), "
                     f"AUC {m['auc_mean']:.4f}"
                     + (f", top-15 sensitivity {m['top15_oof']:.3f}" if "top15_oof" in m else ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class StackResult:
    """What `train-stack` wrote: cv.json's scores per model (mean fold pAUC, OOF pAUC)."""

    cv_json: Path
    pauc_mean: dict[str, float]
    pauc_oof: dict[str, float]
    tuned: bool
    text: str  # `format_cv` of cv.json

    def __str__(self) -> str:
        parts = [f"{n} {self.pauc_mean[n]:.4f}" for n in ("cnn", "tabular", "blend") if n in self.pauc_mean]
        return "mean fold pAUC: " + ", ".join(parts)


def stack_stage(art: ArtifactPaths, cfg: StackConfig) -> StackResult:
    """The `train-stack` stage on `art.features_train`, `art.folds` (and `art.oof_cnn`): see `train_stack`."""
    cv = train_stack(art.features_train, art.folds, art, cfg)
    models = cv["models"]
    return StackResult(art.cv_json, {n: m["pauc_mean"] for n, m in models.items()},
                       {n: m["pauc_oof"] for n, m in models.items()}, bool(cv.get("tuned_params")), format_cv(cv))
