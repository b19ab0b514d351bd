"""Every way a trained network is read back from an artifacts root, one function per kind.

    load_network(model_section, weights, where)   # one network from a config's `model` section + its weights
    load_cnn_member(files)                        # one seed-ensemble member of a CNN fold
    load_cnn_fold(files, fold_config)             # a CNN fold: its model, or the SeedEnsemble of its members
    load_diagnosis_fold(files, n_classes)         # a diagnosis fold's K-class network
    load_student(fold_dir)                        # a distilled student fold, with its config as a dict

Only portable files are read: each fold's `config.yaml` as a plain dict (so prediction never imports training
code, and a fold trained with since-refused training keys still loads) and its `model.safetensors` (or the
`model.pt` that older releases wrote, read with torch's weights_only loader). Every network comes back in
eval mode, on the CPU; no init-weight file is needed, the fold's weights replace them all.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from lesionstack.config import config_from_dict, read_config_dict
from lesionstack.files import read_json
from lesionstack.folds import read_folds
from lesionstack.models import GatedClassifier, ModelConfig, SeedEnsemble, build_model
from lesionstack.paths import ArtifactPaths, FoldFiles
from lesionstack.runtime import load_weights


def load_network(model_section: dict[str, Any], weights: str | os.PathLike[str], where: str,
                 num_classes: int = 1) -> GatedClassifier:
    """A trained network from its config's `model` section and its weights (`.safetensors`, or a torch
    state dict loaded with weights_only), in eval mode, on the CPU.

    The config records the segmenter's decoder widths, so this works where the segmenter or classifier
    init file is absent."""
    cfg = config_from_dict(ModelConfig, model_section, where=f"{where}: model")
    model = build_model(dataclasses.replace(cfg, classifier_weights=None, segmenter_weights=None),
                        num_classes=num_classes)
    model.load_state_dict(load_weights(weights))
    return model.eval()


# ---- CNN folds and their seed-ensemble members ------------------------------------------------------


def seeds_per_fold(fold_config: dict[str, Any]) -> int:
    """How many seed-ensemble members a CNN fold has (its config's `seeds_per_fold`; 1 before the key)."""
    return int(fold_config.get("seeds_per_fold", 1))


def cnn_fold_members(files: FoldFiles) -> list[FoldFiles]:
    """The files of a CNN fold's seed-ensemble members, as many as its saved config names."""
    return files.members(seeds_per_fold(read_config_dict(files.config)))


def cnn_fold_done(files: FoldFiles) -> bool:
    """A CNN fold is finished when it and every seed-ensemble member its config names wrote DONE."""
    return files.done.is_file() and all(m.done.is_file() for m in cnn_fold_members(files))


def cnn_folds(artifacts: ArtifactPaths) -> list[int]:
    """The CNN folds of an artifacts root, every one finished: the fold file's folds, else cv.json's
    `n_folds`, else the fold folders under `cnn/` (a bare `train-cnn --artifacts`)."""
    if artifacts.folds.is_file():
        expected = sorted(int(k) for k in read_folds(artifacts.folds)["fold"].unique())
    elif artifacts.cv_json.is_file():
        expected = list(range(int(read_json(artifacts.cv_json)["n_folds"])))
    else:
        configs = artifacts.cnn_dir.glob("fold_*/config.yaml")
        expected = sorted(int(p.parent.name.removeprefix("fold_")) for p in configs)
    unfinished = [k for k in expected if not cnn_fold_done(artifacts.cnn_fold(k))]
    if unfinished:
        raise FileNotFoundError(f"{artifacts.cnn_dir}: CNN fold(s) {unfinished} did not finish (run train-cnn)")
    return expected


def load_cnn_member(files: FoldFiles, model_section: dict[str, Any] | None = None) -> GatedClassifier:
    """One seed-ensemble member of a CNN fold (member 0 is the fold folder itself), from its own config
    (or `model_section` when the caller has read it already) and its kept weights."""
    section = model_section if model_section is not None else read_config_dict(files.config)["model"]
    return load_network(section, files.kept_weights, str(files.config))


def load_cnn_fold(files: FoldFiles, fold_config: dict[str, Any] | None = None) -> nn.Module:
    """A finished CNN fold as one network: its model, or with `seeds_per_fold` > 1 the `SeedEnsemble` of
    its members (each built from its own config and weights). `fold_config`: the fold's config.yaml as a
    dict, when already read."""
    fold_config = fold_config if fold_config is not None else read_config_dict(files.config)
    members = files.members(seeds_per_fold(fold_config))
    missing = [str(m.done) for m in members if not m.done.is_file()]
    if missing:
        raise FileNotFoundError(f"{files.dir}: seed-ensemble member(s) unfinished, no {missing} (run train-cnn)")
    models = [load_cnn_member(members[0], fold_config["model"])] + [load_cnn_member(m) for m in members[1:]]
    return models[0] if len(models) == 1 else SeedEnsemble(models).eval()


# ---- diagnosis folds and students -------------------------------------------------------------------


def load_diagnosis_fold(files: FoldFiles, n_classes: int) -> GatedClassifier:
    """A diagnosis fold's kept K-class network, from its config.yaml and model.safetensors."""
    return load_network(read_config_dict(files.config)["model"], files.safetensors, str(files.config), n_classes)


def load_student(fold_dir: str | os.PathLike[str]) -> tuple[GatedClassifier, dict[str, Any]]:
    """A distilled student fold (config.yaml + model.safetensors) and its config as a plain dict."""
    files = FoldFiles(Path(fold_dir))
    cfg = read_config_dict(files.config)
    return load_network(cfg["model"], files.safetensors, str(files.config)), cfg
