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
from tqdm.auto import tqdm

from lesionstack.data.metadata import id_mismatch
from lesionstack.data.schema import ID_COLUMN, PATIENT_COLUMN, TARGET_COLUMN
from lesionstack.files import atomic_path, read_json, write_json, write_text
from lesionstack.folds import folds_digest, read_folds
from lesionstack.metrics import pauc, roc_auc, top_n_sensitivity
from lesionstack.paths import ArtifactPaths, TablePaths
from lesionstack.resume import Resume, frame_digest, guard
from lesionstack.tabular.blend import blend, fit_blend_weights
from lesionstack.tabular.estimator import GBDTStacker, estimator, family_of, save_models
from lesionstack.tabular.features import CNN_PREFIX, has_cnn
from lesionstack.tabular.image_scores import add_noise, standardise_training
from lesionstack.tabular.outliers import LOF_COLUMN
from lesionstack.tabular.selection import selection_flags
from lesionstack.tabular.stack_config import TUNE_IGNORE, StackConfig, StackError
from lesionstack.tabular.stack_predict import TABULAR, _load_features

log = logging.getLogger(__name__)



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
        return family_of(model).rename(shared)
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
        if guard(ff, cfg, inputs, partial=()) is Resume.SKIP:
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


def stack_stage(data: TablePaths, art: ArtifactPaths, cfg: StackConfig) -> StackResult:
    """The `train-stack` stage on the feature table and fold file `data` (`art.tables`; the CNN's OOF scores
    from `art.oof_cnn`): see `train_stack`."""
    cv = train_stack(data.features, data.folds, art, cfg)
    models = cv["models"]
    return StackResult(art.cv_json, {n: m["pauc_mean"] for n, m in models.items()},
                       {n: m["pauc_oof"] for n, m in models.items()}, bool(cv.get("tuned_params")), format_cv(cv))
