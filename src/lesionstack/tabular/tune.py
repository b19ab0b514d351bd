"""Optuna tuning of one GBDT family of the stacker, on the mean fold pAUC.

The study lives in SQLite at `artifacts.study_db` by default (`storage` takes any RDB URL, so several
processes or machines can share one study), is created with `load_if_exists`, so a killed run resumes
with its finished trials kept. Each trial reports the running mean fold pAUC after every fold and is
pruned by a median pruner when it falls behind. The first trial of a new study is the untuned config,
so the study itself says whether tuning beat the defaults. The best params are written to
`artifacts.best_params`, which `train-stack` merges into its config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from lesionstack.config import PositiveFloat, PositiveInt, check_fields
from lesionstack.data.schema import ID_COLUMN, TARGET_COLUMN
from lesionstack.files import file_lock, read_json, write_json
from lesionstack.folds import read_folds
from lesionstack.metrics import optuna_objective_value, pauc
from lesionstack.paths import ArtifactPaths, TablePaths
from lesionstack.resume import Resume, guard
from lesionstack.tabular.estimator import estimator
from lesionstack.tabular.features import CNN_PREFIX
from lesionstack.tabular.gbdt import family
from lesionstack.tabular.outliers import LOF_COLUMN
from lesionstack.tabular.stack import align_features, tuning_inputs, with_params
from lesionstack.tabular.stack_config import TUNE_IGNORE, ModelName, StackConfig, StackError

log = logging.getLogger(__name__)

DEFAULT_TRIAL = "defaults"  # user attribute marking the trial that ran the untuned config
NOISE = 0.001  # pAUC gains smaller than this are reported as noise (fold std is ~0.02 on the demo data)


@dataclass
class TuneSettings:
    """The `tune` stage: which family, how many trials, where the study lives (`run` tunes when enabled)."""

    enabled: bool = False  # used by `lesionstack run` only; the `tune` command always tunes
    model: ModelName = "lgbm"
    n_trials: PositiveInt | None = 20  # trials for this process; None: until `timeout`
    timeout: PositiveFloat | None = None  # seconds after which no new trial starts
    storage: str | None = None  # an Optuna RDB URL shared by workers; default SQLite at artifacts.study_db
    study_name: str | None = None  # default stack-MODEL
    seed: int = 0  # sampler seed (offset by the trials already stored)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TuneConfig:
    """The `tune` stage's config: the stack config whose features and fixed parameters it tunes, and the
    study's settings (`run` takes them from its `stack` and `tune` sections)."""

    stack: StackConfig = field(default_factory=StackConfig)
    settings: TuneSettings = field(default_factory=TuneSettings)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TuneResult:
    """best_params.json as a typed result; `reused`: an earlier study's, checked by the resume guard."""

    path: Path
    model: str
    params: dict[str, Any]
    best_value: float
    default_value: float | None
    n_trials: int
    reused: bool = False

    @classmethod
    def read(cls, path: Path, reused: bool = False) -> TuneResult:
        best = read_json(path)
        return cls(path, best["model"], best["params"], best["best_value"], best["default_value"],
                   best["n_trials"], reused)

    def __str__(self) -> str:
        text = f"best mean fold pAUC {self.best_value:.4f} after {self.n_trials} trials"
        return f"done before, using {self.path} ({text})" if self.reused else text


def search_space(trial: optuna.Trial, model: str) -> dict[str, Any]:
    """The knobs tuned for one family (shared names, mapped to native ones by `stack.with_params`)."""
    return family(model).search_space(trial)


def default_params(cfg: StackConfig, model: str) -> dict[str, Any]:
    """The config's own values of the searched knobs (the baseline trial)."""
    return {k: getattr(cfg, k) for k in family(model).tuned}


def cv_pauc(features: pd.DataFrame, folds: pd.DataFrame, cfg: StackConfig, model: str,
            trial: optuna.Trial | None = None) -> float:
    """Mean fold pAUC of one family; with a trial, report after each fold and prune when behind."""
    cols = [c for c in features.columns if c != ID_COLUMN and (cfg.use_cnn or not c.startswith(CNN_PREFIX))
            and (cfg.use_lof or c != LOF_COLUMN)]  # as train_stack picks them
    y, fold = folds[TARGET_COLUMN].to_numpy(), folds["fold"].to_numpy()
    scores: list[float] = []
    for k in range(int(fold.max()) + 1):
        tr, va = fold != k, fold == k
        est = estimator(cfg, model).fit(features.loc[tr, cols], y[tr])
        scores.append(pauc(y[va], est.predict_proba(features.loc[va, cols])[:, 1]))
        if trial is not None:
            trial.report(float(np.mean(scores)), step=k)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return optuna_objective_value(scores)


def check_study(features: pd.DataFrame, folds: pd.DataFrame, artifacts: ArtifactPaths,
                cfg: StackConfig) -> Resume:
    """The resume guard of tuning: a study (or its best params) made on other feature values, other folds
    or another stack config is refused, naming what changed; SKIP when best params exist, RESUME when only
    the study does, START (config and inputs recorded) otherwise. `features` aligned to `folds`."""
    return guard(artifacts.tune, cfg, tuning_inputs(features, folds), ignore=TUNE_IGNORE,
                 partial=(artifacts.study_db,), done=artifacts.best_params)


def _lock(artifacts: ArtifactPaths) -> Path:
    return artifacts.study_db.with_name(artifacts.study_db.name + ".lock")


def open_study(artifacts: ArtifactPaths, study_name: str, storage: str | None = None, seed: int = 0,
               first_trial: dict[str, Any] | None = None) -> optuna.Study:
    """Create or load the study (SQLite at artifacts.study_db unless `storage` names another RDB).

    A new study gets `first_trial` queued. Creation runs under a file lock: two workers starting on a new
    SQLite file otherwise race on Optuna's schema setup (UNIQUE constraint failed: alembic_version) and
    could both queue the first trial.
    """
    artifacts.study_db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(_lock(artifacts)):
        storage = storage or f"sqlite:///{artifacts.study_db}"
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}}
                                         if storage.startswith("sqlite") else {})
        # seed offset by the trials already stored: a resumed run or a second worker does not repeat them
        n_before = 0
        try:
            n_before = len(optuna.load_study(study_name=study_name, storage=rdb).trials)
        except KeyError:
            pass
        study = optuna.create_study(
            study_name=study_name, storage=rdb, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=seed + n_before),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        )
        if first_trial is not None and not study.trials:
            study.enqueue_trial(first_trial, user_attrs={DEFAULT_TRIAL: True})
    return study


def tune(features: str | os.PathLike[str] | pd.DataFrame, folds_path: str | os.PathLike[str],
         artifacts: ArtifactPaths, cfg: StackConfig | None = None, model: str = "lgbm",
         n_trials: int | None = 20, timeout: float | None = None, storage: str | None = None,
         study_name: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) the study, then write artifacts.best_params; returns its content."""
    cfg = cfg or StackConfig()
    if model not in cfg.models:
        raise StackError(f"model {model!r} is not among the config's models {list(cfg.models)}")
    folds = read_folds(folds_path)
    feats = features if isinstance(features, pd.DataFrame) else pd.read_parquet(features)
    feats = align_features(feats, folds)
    with file_lock(_lock(artifacts)):  # workers starting together record the same config and inputs once
        check_study(feats, folds, artifacts, cfg)
    name = study_name or f"stack-{model}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(artifacts, name, storage, seed, first_trial=default_params(cfg, model))

    def objective(trial: optuna.Trial) -> float:
        return cv_pauc(feats, folds, with_params(cfg, model, search_space(trial, model)), model, trial)

    study.optimize(objective, n_trials=n_trials, timeout=timeout, gc_after_trial=True)
    return _save_best(study, model, artifacts)


def _save_best(study: optuna.Study, model: str, artifacts: ArtifactPaths) -> dict[str, Any]:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise StackError(f"study {study.study_name!r} has no finished trial yet; run more trials")
    best = study.best_trial
    baseline = next((t.value for t in done if t.user_attrs.get(DEFAULT_TRIAL)), None)
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    out = {"model": model, "params": best.params, "best_value": best.value, "trial": best.number,
           "default_value": baseline, "improved": baseline is not None and best.value > baseline,
           "study_name": study.study_name, "n_trials": len(study.trials), "trial_states": states}
    write_json(artifacts.best_params, out)
    if baseline is None:
        log.info(f"best mean fold pAUC {best.value:.4f} (trial {best.number}); the default trial has not finished")
    elif out["improved"]:
        gain = best.value - baseline
        noise = " (below 0.001: within fold-to-fold noise, not a real gain)" if gain < NOISE else ""
        log.info(f"tuning improved the mean fold pAUC of {model} from {baseline:.4f} (defaults) to "
            f"{best.value:.4f}, +{gain:.4f}{noise}")
    else:
        log.info(f"tuning did not improve on the defaults ({baseline:.4f}); best params are the defaults'")
    log.info(f"{len(study.trials)} trials {states}; wrote {artifacts.best_params}")
    return out


def tune_stage(data: TablePaths, art: ArtifactPaths, cfg: TuneConfig, *, rerun: bool = True) -> TuneResult:
    """The `tune` stage on the feature table and fold file `data` (`art.tables`). With `rerun` false an
    existing best_params.json is reused (after the resume guard checks features, folds and config); with
    `rerun` (the `tune` command) each call adds `cfg.settings.n_trials` trials to the study."""
    if not rerun and art.best_params.is_file():
        folds = read_folds(data.folds)
        if check_study(align_features(pd.read_parquet(data.features), folds), folds, art, cfg.stack) is Resume.SKIP:
            return TuneResult.read(art.best_params, reused=True)
    s = cfg.settings
    tune(data.features, data.folds, art, cfg.stack, model=s.model, n_trials=s.n_trials, timeout=s.timeout,
         storage=s.storage, study_name=s.study_name, seed=s.seed)
    return TuneResult.read(art.best_params)
