"""Optuna tuning: two worker processes on one SQLite study, a resumed study, best params used by train-stack."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd

from helpers import TINY_STACK, make_stack_inputs
from lesionstack.config import read_config_dict, save_config
from lesionstack.files import atomic_path, read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.stack import train_stack
from lesionstack.tabular.stack_config import StackConfig
from lesionstack.tabular.tune import tune

CFG = {**TINY_STACK, "models": ("lgbm",)}


def _prepare(root: Path) -> tuple[ArtifactPaths, pd.DataFrame]:
    feats, art, cnn = make_stack_inputs(root, n=300)
    feats = feats[[c for c in feats.columns if not c.startswith("cnn_")]]  # tabular only: no CNN file needed
    with atomic_path(art.features_train) as tmp:
        feats.to_parquet(tmp, index=False)
    return art, feats


def _finished(art: ArtifactPaths, name: str = "stack-lgbm") -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{art.study_db}")
    return [t for t in study.trials if t.state.is_finished()]


def test_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    art, _ = _prepare(tmp_path)
    config = save_config(StackConfig(**CFG), tmp_path / "tiny.yaml")
    cmd = [sys.executable, "-m", "lesionstack.cli", "tune", "--artifacts", str(art.root), "--config", str(config),
           "--n-trials", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _finished(art)
    assert len(trials) == 4  # 2 trials from each worker, in one study
    assert sum(bool(t.user_attrs.get("defaults")) for t in trials) == 1  # only one worker queued the defaults
    best = read_json(art.best_params)
    assert best["model"] == "lgbm" and best["default_value"] is not None
    # the verdict a worker prints agrees with best_params.json, which the last worker to finish wrote
    if best["improved"]:
        line = (f"tuning improved the mean fold pAUC of lgbm from {best['default_value']:.4f} (defaults) to "
                f"{best['best_value']:.4f}")
        assert best["best_value"] > best["default_value"]
    else:
        line = f"tuning did not improve on the defaults ({best['default_value']:.4f})"
        assert best["best_value"] == best["default_value"]
    assert any(line in o for o in outputs), (line, outputs)


def test_resumed_study_keeps_trials_and_train_stack_uses_best(tmp_path: Path, caplog) -> None:
    art, feats = _prepare(tmp_path)
    cfg = StackConfig(**CFG)
    first = tune(feats, art.folds, art, cfg, n_trials=2)
    trials = _finished(art)
    assert first["n_trials"] == 2 and trials[0].user_attrs.get("defaults")  # trial 0 ran the untuned config
    assert sorted(trials[0].intermediate_values) == [0, 1, 2]  # the running mean reported after each fold
    again = tune(art.features_train, art.folds, art, cfg, n_trials=1)  # a new "process"
    resumed = _finished(art)
    assert again["n_trials"] == 3 and [t.params for t in resumed[:2]] == [t.params for t in trials]
    assert again["best_value"] >= first["best_value"]
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        cv = train_stack(art.features_train, art.folds, art, cfg)
    assert cv["tuned_params"]["params"] == again["params"] and any("using tuned params" in m for m in caplog.messages)
    saved = read_config_dict(art.stack_fold(0).config)
    assert saved["params"]["lgbm"]["learning_rate"] == again["params"]["learning_rate"]
