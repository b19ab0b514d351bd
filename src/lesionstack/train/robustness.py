"""Phone-quality robustness: the OOF pAUC of a trained image model (the CNN or a distilled student) on its
validation crops as they are, and on a copy of the same crops degraded like phone photos.

The degraded copy (`phone_copy`) is an HDF5 file in the competition's layout, so every model scores it
through its usual data path, exactly like the clean file. Each crop is degraded once at its own size with a
generator seeded by (seed, crop position), so the copy is the same for every model and every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import simplejpeg
import torch
from torch import nn
from tqdm.auto import tqdm

from lesionstack.config import check_fields, config_to_dict, read_config_dict
from lesionstack.data.augment import PhoneConfig, degrade_crop
from lesionstack.data.dataset import CropDataset
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.schema import ID_COLUMN, TARGET_COLUMN
from lesionstack.files import atomic_path, write_json
from lesionstack.folds import read_folds
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.resume import record_or_check_inputs
from lesionstack.runtime import RunSettings, Runtime, predict_logits
from lesionstack.train.distill import fold_spread
from lesionstack.trained.loaders import load_cnn_fold, load_student

STORE_QUALITY = 95  # the degraded crop is stored near-losslessly; its own JPEG damage happened before


def phone_copy(src: str | os.PathLike[str], ids: Sequence[str], out: str | os.PathLike[str], cfg: PhoneConfig,
               seed: int = 0, progress: bool = True) -> Path:
    """Write the crops `ids` of HDF5 `src`, each degraded, to HDF5 `out` (same ids); reused when it exists
    for the same source, ids, config and seed (recorded in `out`.json)."""
    out = Path(out)
    inputs = {"source": os.fspath(src), "n_ids": len(ids), "phone": config_to_dict(cfg), "seed": seed}
    record = out.with_suffix(".json")
    if out.is_file() and record.is_file():
        record_or_check_inputs(inputs, record)
        return out
    images = H5Images(src)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        for i, isic_id in enumerate(tqdm(ids, desc="phone copy", disable=not progress)):
            crop = degrade_crop(images.read(isic_id), cfg, (seed, i))
            h5[isic_id] = np.bytes_(simplejpeg.encode_jpeg(crop, quality=STORE_QUALITY))
    record.unlink(missing_ok=True)
    record_or_check_inputs(inputs, record)
    return out


def fold_models(art: ArtifactPaths, model: str, folds: Sequence[int]) -> Iterator[tuple[int, nn.Module, dict]]:
    """(fold, network, its config as a dict) for `model`: "cnn" (the gated CNN) or the name of a distilled
    student. A CNN fold's config is read as prediction reads it (its model section, size and scoring keys),
    so a fold trained with since-refused training keys (e.g. keep: best) still scores."""
    for k in folds:
        if model == "cnn":
            files = art.cnn_fold(k)
            cfg = read_config_dict(files.config)
            yield k, load_cnn_fold(files, cfg).eval(), cfg
        else:
            net, student = load_student(art.distill_fold(model, k).dir)
            yield k, net, student


def evaluate_phone(data_dir: str | os.PathLike[str], artifacts: str | os.PathLike[str], model: str = "cnn",
                   phone: PhoneConfig | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """OOF pAUC (and per-fold spread) of `model` on the clean and on the phone-degraded validation crops;
    written to ARTIFACTS/robustness/MODEL.json."""
    data, art = DataPaths(data_dir), ArtifactPaths(artifacts)
    phone = phone or PhoneConfig()
    folds = read_folds(art.folds)
    degraded = phone_copy(data.train_images, folds[ID_COLUMN].tolist(), art.robustness_file("phone-train-image.hdf5"),
                          phone, seed, progress)
    scores: dict[str, list[pd.DataFrame]] = {"clean": [], "degraded": []}
    all_folds = sorted(int(k) for k in folds["fold"].unique())
    for k, net, cfg in fold_models(art, model, all_folds):
        rt = Runtime(RunSettings.pick(cfg, progress=progress), torch.device("cpu"), None)
        net = rt.place(net)  # the memory format the batches come in
        val = folds[folds["fold"] == k]
        for kind, h5 in (("clean", data.train_images), ("degraded", degraded)):
            ds = CropDataset(h5, val[ID_COLUMN], val[TARGET_COLUMN], int(cfg["image_size"]))
            logits = predict_logits(net, ds, rt, desc=f"{model} fold {k} {kind}")
            scores[kind].append(pd.DataFrame({ID_COLUMN: ds.ids, "score": logits}))
    result = {"model": model, "phone": config_to_dict(phone), "seed": seed,
              **{kind: fold_spread(folds, pd.concat(parts)) for kind, parts in scores.items()}}
    write_json(art.robustness_file(f"{model}.json"), result)
    return result


@dataclass(frozen=True)
class Spread:
    """OOF pAUC and the per-fold pAUC's mean and std of one set of scores."""

    oof_pauc: float
    fold_pauc_mean: float
    fold_pauc_std: float

    def __str__(self) -> str:
        return f"OOF pAUC {self.oof_pauc:.4f} (folds {self.fold_pauc_mean:.4f} +- {self.fold_pauc_std:.4f})"


@dataclass(frozen=True)
class PhoneResult:
    """What `phone-eval` measured: the image model on its clean and its phone-degraded validation crops."""

    model: str
    clean: Spread
    degraded: Spread
    path: Path  # ARTIFACTS/robustness/MODEL.json

    def __str__(self) -> str:
        return (f"{self.model} {'clean':8s}: {self.clean}\n{self.model} {'degraded':8s}: {self.degraded}\n"
                f"-> {self.path}")


@dataclass(frozen=True)
class PhoneEvalConfig:
    """The `phone-eval` stage: which image model, and the seeded phone-like degradation of its crops."""

    model: str = "cnn"  # "cnn" or the name of a distilled student (ARTIFACTS/distill/NAME)
    seed: int = 0  # seed of the degraded copy (the same for every model)
    phone: PhoneConfig = field(default_factory=PhoneConfig)

    def __post_init__(self) -> None:
        check_fields(self)


def phone_stage(data: DataPaths, art: ArtifactPaths, cfg: PhoneEvalConfig, *, progress: bool = True) -> PhoneResult:
    """The `phone-eval` stage: see `evaluate_phone`."""
    r = evaluate_phone(data.root, art.root, model=cfg.model, phone=cfg.phone, seed=cfg.seed, progress=progress)
    spreads = {kind: Spread(r[kind]["oof_pauc"], r[kind]["fold_pauc_mean"], r[kind]["fold_pauc_std"])
               for kind in ("clean", "degraded")}
    return PhoneResult(cfg.model, spreads["clean"], spreads["degraded"], art.robustness_file(f"{cfg.model}.json"))
