"""One object that scores images and tables with a trained artifacts folder.

    p = Predictor.load("demo/artifacts", device="auto", progress=True)   # every fold model, loaded once
    p.score_crops([crop])                      # decoded RGB crops -> mean fold probability, with flip TTA
    p.score_crops_by_fold([crop])              # (B, folds): each fold model's probability (same decode)
    p.score_hdf5("test-image.hdf5")            # DataFrame[isic_id, score]; each crop decoded once
    p.score_hdf5("test-image.hdf5", per_fold=True)  # + score_fold_<k> per fold model (stacker pairing)
    p.score_files(["a.jpg", "b.png"])          # DataFrame[path, probability, error]
    p.predict_table(test_metadata, scores)     # the stacker's fold models -> DataFrame[isic_id, score]
                                               # (stack fold k on CNN fold k's scores: `per_fold` scores)

Each CNN fold's scoring settings (the `model` section, `image_size`, `tta_hflip`, `amp`, `channels_last`)
come from the fold's saved `config.yaml`, read as a plain dict: prediction never imports training code.
Prediction never stops on one crop: an undecodable or unreadable crop gets a NaN score and a warning
naming it, and `predict_table` scores its row with the stacker's tabular-only variant.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionstack.config import config_from_dict, read_config_dict
from lesionstack.data.dataset import CropDataset, Item, resize_square, shard
from lesionstack.data.decode import decode_image
from lesionstack.data.diagnosis import PROB_PREFIX
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import read_json
from lesionstack.folds import read_folds
from lesionstack.models import GatedClassifier, ModelConfig, SeedEnsemble, build_model, ensemble_members
from lesionstack.paths import ArtifactPaths, FoldFiles
from lesionstack.runtime import (
    DistContext,
    RunSettings,
    Runtime,
    gather_rows,
    load_weights,
    make_loader,
    model_logits,
    sigmoid,
)
from lesionstack.tabular.pairing import fold_score_column

log = logging.getLogger(__name__)

# Fold-config keys that must agree across folds: every fold model sees the same decoded batch.
SHARED_KEYS = ("image_size", "amp", "channels_last")


class PredictorError(ValueError):
    """An artifacts folder that cannot be scored with (unfinished folds, inconsistent fold configs)."""


def cnn_folds(artifacts: ArtifactPaths) -> list[int]:
    """The CNN folds of an artifacts root, every one finished: the fold file's folds, else cv.json's
    `n_folds`, else the fold folders under `cnn/` (a bare `train-cnn --out`)."""
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


def seeds_per_fold(fold_config: dict[str, Any]) -> int:
    """How many seed-ensemble members a CNN fold has (its config's `seeds_per_fold`; 1 before the key)."""
    return int(fold_config.get("seeds_per_fold", 1))


def cnn_fold_members(files: FoldFiles) -> list[FoldFiles]:
    """The files of a CNN fold's seed-ensemble members, as many as its saved config names."""
    return files.members(seeds_per_fold(read_config_dict(files.config)))


def cnn_fold_done(files: FoldFiles) -> bool:
    """A CNN fold is finished when it and every seed-ensemble member its config names wrote DONE."""
    return files.done.is_file() and all(m.done.is_file() for m in cnn_fold_members(files))


def load_cnn_fold(files: FoldFiles, fold_config: dict[str, Any]) -> nn.Module:
    """A finished CNN fold as one network on the CPU: its model, or with `seeds_per_fold` > 1 the
    `SeedEnsemble` of its members (each built from its own config and weights)."""
    members = files.members(seeds_per_fold(fold_config))
    missing = [str(m.done) for m in members if not m.done.is_file()]
    if missing:
        raise FileNotFoundError(f"{files.dir}: seed-ensemble member(s) unfinished, no {missing} (run train-cnn)")
    sections = [fold_config["model"]] + [read_config_dict(m.config)["model"] for m in members[1:]]
    models = [load_fold_model(section, m.kept_weights, str(m.config))
              for section, m in zip(sections, members, strict=True)]
    return models[0] if len(models) == 1 else SeedEnsemble(models).eval()


def load_fold_model(model_section: dict[str, Any], weights: str | os.PathLike[str], where: str,
                    num_classes: int = 1) -> GatedClassifier:
    """A fold's trained network from its config's `model` section and its weights (`.safetensors`, or a
    torch state dict loaded with weights_only), in eval mode, on the CPU.

    No init-weight file is needed: the fold's weights replace them all, and the config records the
    segmenter's decoder widths, so this works where the segmenter or classifier init file is absent."""
    cfg = config_from_dict(ModelConfig, model_section, where=f"{where}: model")
    model = build_model(dataclasses.replace(cfg, classifier_weights=None, segmenter_weights=None),
                        num_classes=num_classes)
    model.load_state_dict(load_weights(weights))
    return model.eval()


def read_image_file(path: str | os.PathLike[str], min_side: int) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, through the same capped decoder as HDF5 crops (`decode_image`:
    JPEG at a reduced scale, PNG and others, EXIF rotation, refused above the pixel limits)."""
    return decode_image(Path(path).read_bytes(), min_side=min_side, where=Path(path).name, path=path)


class _TolerantCrops(CropDataset):
    """CropDataset that also turns an unreadable crop (an I/O error) into a skipped item, not a stop."""

    def __getitem__(self, index: int) -> Item:
        try:
            return super().__getitem__(index)
        except OSError as err:
            return None, float(self.labels[index]), index, f"unreadable ({err})"


@dataclasses.dataclass
class _Fold:
    fold: int
    model: GatedClassifier | SeedEnsemble
    tta: bool
    dihedral: bool = False


class Predictor:
    """The trained CNN fold models and the stacker of one artifacts folder (see the module docstring)."""

    def __init__(self, artifacts: ArtifactPaths, folds: list[_Fold], image_size: int, rt: Runtime) -> None:
        self.artifacts = artifacts
        self._folds = folds
        self.image_size = image_size
        self.rt = rt
        self._cv = read_json(artifacts.cv_json) if artifacts.cv_json.is_file() else None
        self.diagnosis: Any = None  # a DiagnosisPredictor when the bundle has a diagnosis stage

    # ---- loading ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], device: str = "auto", progress: bool = True, *,
             folds: Sequence[int] | None = None, batch_size: int | None = None,
             num_workers: int | None = None, ctx: DistContext = DistContext()) -> Predictor:
        """Load every finished CNN fold model (or `folds`) once, onto `device`; the stacker is read lazily.

        `batch_size` and `num_workers` default to the fold config's `eval_batch_size` and `num_workers`.
        Under `torchrun` (`ctx`), `score_hdf5` scores a shard per rank and every rank gets all scores."""
        art = ArtifactPaths(artifacts_dir)
        todo = list(folds) if folds is not None else (cnn_folds(art) if art.cnn_dir.is_dir() else [])
        configs = {k: read_config_dict(art.cnn_fold(k).config) for k in todo}
        for k, cfg in configs.items():
            for key in ("model", "image_size"):
                if key not in cfg:
                    raise PredictorError(f"{art.cnn_fold(k).config}: no '{key}' key")
        first = next(iter(configs.values()), {})
        _check_folds_agree(art, configs)
        settings = RunSettings.pick(first, progress=progress, skip_corrupt=True, eval_batch_size=batch_size,
                                    num_workers=num_workers)
        rt = Runtime.create(settings, device=device, amp=first.get("amp", "auto"), ctx=ctx)
        loaded = [_Fold(k, rt.place(load_cnn_fold(art.cnn_fold(k), cfg)),
                        bool(cfg.get("tta_hflip", settings.tta_hflip)), bool(cfg.get("tta_dihedral", False)))
                  for k, cfg in configs.items()]
        log.info("predictor: %d CNN fold model(s) from %s on %s", len(loaded), art.root, rt.device)
        predictor = cls(art, loaded, int(first.get("image_size", 0)), rt)
        if art.diagnosis_cv.is_file():  # a diagnosis stage in the bundle: class probabilities too
            from lesionstack.inference.diagnosis import DiagnosisPredictor

            predictor.diagnosis = DiagnosisPredictor.load(art.root, device=device)
        return predictor

    @property
    def folds(self) -> list[int]:
        return [f.fold for f in self._folds]

    @property
    def models(self) -> list[nn.Module]:
        """Every network, seed-ensemble members one by one (Grad-CAM hooks each one's classifier)."""
        return [m for f in self._folds for m in ensemble_members(f.model)]

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def has_stacker(self) -> bool:
        return self._cv is not None

    @property
    def stacker_uses_cnn(self) -> bool:
        return bool(self._cv and self._cv.get("with_cnn"))

    @property
    def has_tabular_variant(self) -> bool:
        """The stacker also trained models without CNN features (scores rows whose crop failed)."""
        return self.stacker_uses_cnn and "tabular" in self._cv.get("models", {})  # type: ignore[union-attr]

    @property
    def has_diagnosis(self) -> bool:
        return self.diagnosis is not None

    @property
    def diagnosis_classes(self) -> tuple[str, ...]:
        return tuple(self.diagnosis.classes) if self.diagnosis is not None else ()

    def diagnose(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(B, K) class probabilities from the bundle's diagnosis stage (`diagnosis_classes` order)."""
        if self.diagnosis is None:
            raise PredictorError(f"{self.artifacts.root}: no diagnosis stage (run `lesionstack train-diagnosis`)")
        return self.diagnosis.predict_proba(crops)

    # ---- crops --------------------------------------------------------------------------------------

    def preprocess(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB crops of any size -> float (B, 3, S, S), resized and ImageNet-normalised
        as in training, on the device. (Crops read from JPEG bytes are first decoded at a reduced DCT
        scale by `score_hdf5`/`score_files`; a crop given here is resized from its full size.)"""
        for i, crop in enumerate(crops):
            if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
                raise ValueError(f"crop {i}: expected an (H, W, 3) uint8 RGB array, got {crop.dtype} {crop.shape}")
        size = self._need_cnn()
        batch = np.stack([resize_square(np.ascontiguousarray(c), size) for c in crops]) if len(crops) else \
            np.zeros((0, size, size, 3), np.uint8)
        return self._ready(torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))))

    def score_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(B,) mean over the fold models of sigmoid(logit), each with its fold's flip TTA."""
        return self.score_crops_by_fold(crops).mean(axis=1)

    def score_crops_by_fold(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(B, n_folds): each fold model's sigmoid(logit) (columns in `folds` order), one decode per crop."""
        parts = [self._score_batch(self.preprocess(chunk)) for chunk in self._chunks(crops)]
        return np.concatenate(parts) if parts else np.empty((0, len(self._folds)))

    @torch.no_grad()
    def masks(self, crops: Sequence[np.ndarray]) -> np.ndarray | None:
        """(B, S, S) float in [0, 1]: the mean soft lesion mask of the folds with a segmenter; None when
        no fold has one (gate "none")."""
        if not any(f.model.segmenter is not None for f in self._folds):
            return None
        parts = []
        for chunk in self._chunks(crops):
            x = self.preprocess(chunk)
            with self.rt.autocast():
                found = [f.model.mask(x).float() for f in self._folds if f.model.segmenter is not None]
            parts.append(torch.stack(found).mean(0)[:, 0].cpu().numpy())
        return np.concatenate(parts) if parts else np.empty((0, self.image_size, self.image_size), np.float32)

    # ---- files --------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_hdf5(self, path: str | os.PathLike[str], ids: Sequence[str] | None = None, *,
                   per_fold: bool = False) -> pd.DataFrame:
        """DataFrame[isic_id, score] for `ids` (default: every crop in the file), in that order. Each crop
        is decoded once (in DataLoader workers) and scored by every fold model; a crop that cannot be
        read or decoded gets NaN and a warning naming it. `per_fold` adds one `score_fold_<k>` column per
        fold model (`score` is their mean): the stacker's fold k is paired with CNN fold k's score."""
        size = self._need_cnn()
        images = H5Images(path)
        ids = list(images.ids) if ids is None else [str(i) for i in ids]
        missing = sorted(set(ids) - set(images.ids))
        if missing:
            raise KeyError(f"{images.path}: no crop for {len(missing)} id(s), e.g. {missing[:3]}")
        dataset = _TolerantCrops(images, ids, None, size)
        mine = shard(range(len(ids)), self.rt.ctx.rank, self.rt.ctx.world_size, pad=False)  # all: one process
        loader = make_loader(dataset, self.rt, sampler=mine, batch_size=self.rt.settings.eval_batch_size)
        found_idx, found_scores = [], []
        for batch in self.rt.bar(loader, f"score {images.path.name}", unit="batch"):
            for index, reason in batch.corrupt:
                log.warning("crop '%s' in %s not scored (NaN): %s", ids[index], images.path, reason)
            if len(batch.index):
                found_idx.append(batch.index.numpy())
                found_scores.append(self._score_batch(self._ready(batch.images)))
        by_fold = np.column_stack([gather_rows(found_idx, [s[:, j] for s in found_scores], len(ids), self.rt.ctx)
                                   for j in range(len(self._folds))])
        table = pd.DataFrame({ID_COLUMN: ids, "score": by_fold.mean(axis=1)})
        if per_fold:
            table = table.assign(**{fold_score_column(k): by_fold[:, j] for j, k in enumerate(self.folds)})
        return table

    def score_files(self, paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
        """DataFrame[path, probability, error] for JPEG/PNG/... files; an unreadable file gets NaN and the
        reason in `error` (None elsewhere)."""
        # a diagnosis-only bundle (e.g. HAM10000) scores class probabilities alone: probability stays NaN
        size = self.diagnosis.image_size if self.has_diagnosis and not self._folds else self._need_cnn()
        paths = [os.fspath(p) for p in paths]
        prob, error = np.full(len(paths), np.nan), [None] * len(paths)
        classes = np.full((len(paths), len(self.diagnosis_classes)), np.nan) if self.has_diagnosis else None
        step = self.rt.settings.eval_batch_size
        for start in self.rt.bar(range(0, len(paths), step), "score files", unit="batch"):
            read: dict[int, np.ndarray] = {}
            for i in range(start, min(start + step, len(paths))):
                try:
                    read[i] = resize_square(read_image_file(paths[i], size), size)
                except (OSError, ValueError) as err:  # CorruptImageError and PIL's errors included
                    error[i] = f"{type(err).__name__}: {err}"
                    log.warning("%s not scored (NaN): %s", paths[i], error[i])
            if read and self._folds:
                prob[list(read)] = self.score_crops(list(read.values()))
            if read and classes is not None:
                classes[list(read)] = self.diagnose(list(read.values()))
        table = pd.DataFrame({"path": paths, "probability": prob, "error": error})
        if classes is not None:  # one prob_<class> column per diagnosis class, before the error column
            for j, name in enumerate(self.diagnosis_classes):
                table.insert(len(table.columns) - 1, PROB_PREFIX + name, classes[:, j])
        return table

    # ---- the stacker --------------------------------------------------------------------------------

    def predict_table(self, metadata: pd.DataFrame, cnn_scores: pd.DataFrame | None = None,
                      where: str = "test metadata") -> pd.DataFrame:
        """DataFrame[isic_id, score] from the stacker's fold models on `metadata` (+ `cnn_scores` when the
        stacker uses CNN features: `score_hdf5(..., per_fold=True)`'s table, the mean `score` and one
        `score_fold_<k>` per CNN fold; stack fold k scores with CNN fold k's, `tabular.pairing`). Rows whose
        CNN score is NaN are scored by the tabular-only variant; without one they get the median CNN
        score, with a warning."""
        from lesionstack.tabular.features import build_features, fill_unscored
        from lesionstack.tabular.pairing import fold_cnn_features, fold_score_columns
        from lesionstack.tabular.stack import predict_stack

        if self._cv is None:
            raise FileNotFoundError(f"{self.artifacts.cv_json}: no trained stacker in {self.artifacts.root} "
                                    "(run train-stack first)")
        if not self.stacker_uses_cnn:
            return predict_stack(build_features(metadata, None, where=where), self.artifacts)
        if cnn_scores is None:
            raise ValueError(f"{self.artifacts.cv_json}: the stacker uses CNN scores; pass cnn_scores")
        columns = ("score", *fold_score_columns(cnn_scores, f"{where}: cnn_scores").values())
        bad = ~np.isfinite(cnn_scores[list(columns)].to_numpy(dtype=np.float64)).all(axis=1)
        if bad.any() and not self.has_tabular_variant:
            log.warning("%s: the stacker has no tabular-only variant (train_tabular off): %d unscored crop(s) "
                        "get the median CNN score", self.artifacts.root, int(bad.sum()))
        # a failed row's own CNN features are never used (tabular-only variant); the median keeps its
        # patient's features defined
        filled = fill_unscored(cnn_scores, where, columns)
        features = build_features(metadata, filled[[ID_COLUMN, "score"]], where=where)
        main = predict_stack(features, self.artifacts, fold_cnn=fold_cnn_features(metadata, filled, where))
        if not bad.any() or not self.has_tabular_variant:
            return main
        tabular = predict_stack(features, self.artifacts, variant="tabular")
        failed = set(cnn_scores.loc[bad, ID_COLUMN].astype(str))
        use_tab = main[ID_COLUMN].isin(failed).to_numpy()
        log.warning("%d row(s) without a CNN score scored by the tabular-only stacker, e.g. %s",
                    int(use_tab.sum()), sorted(failed)[:3])
        return main.assign(score=np.where(use_tab, tabular["score"].to_numpy(), main["score"].to_numpy()))

    # ---- internals ----------------------------------------------------------------------------------

    def _need_cnn(self) -> int:
        if not self._folds:
            raise PredictorError(f"{self.artifacts.cnn_dir}: no trained CNN fold models to score images with")
        return self.image_size

    def _chunks(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        step = self.rt.settings.eval_batch_size
        for start in range(0, len(items), step):
            yield items[start:start + step]

    def _ready(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) on the host -> the normalised float batch on the device."""
        return self.rt.finish(self.rt.prepare(images))

    @torch.no_grad()
    def _score_batch(self, x: torch.Tensor) -> np.ndarray:
        """(B, n_folds): each fold model's sigmoid(logit) of one prepared batch (float64, as the OOF scores)."""
        return np.column_stack([sigmoid(model_logits(f.model, x, self.rt, f.tta, f.dihedral).cpu().numpy()
                                        .astype(np.float64)) for f in self._folds]).reshape(len(x), len(self._folds))


def _check_folds_agree(art: ArtifactPaths, configs: dict[int, dict[str, Any]]) -> None:
    """Every fold model scores the same decoded batch, so they must share image size and precision."""
    items = list(configs.items())
    for k, cfg in items[1:]:
        for key in SHARED_KEYS:
            if cfg.get(key) != items[0][1].get(key):
                raise PredictorError(f"{art.cnn_fold(k).config}: {key} {cfg.get(key)!r} differs from fold "
                                     f"{items[0][0]}'s {items[0][1].get(key)!r}; score such folds separately")
