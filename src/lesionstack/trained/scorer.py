"""The CNN fold models of one artifacts folder, loaded once, scoring crops and HDF5 files.

    s = FoldScorer.load("artifacts", device="auto")   # every finished CNN fold (seed ensembles as one model)
    s.score_crops([crop])                          # decoded RGB crops -> mean fold probability, with flip TTA
    s.score_crops_by_fold([crop])                  # (B, folds): each fold model's probability (same decode)
    s.score_hdf5("test-image.hdf5", per_fold=True) # DataFrame[isic_id, score, score_fold_<k>...]

Training scores the test set through this (`train.cnn`) and so does prediction (`inference.predictor.Predictor`
adds the stacker, the diagnosis stage and image files on top): one code path, so the two agree. Each fold's
scoring settings (the `model` section, `image_size`, `tta_hflip`, `amp`, `channels_last`) come from its saved
`config.yaml`, read as a plain dict. Scoring never stops on one crop: an undecodable or unreadable crop gets a
NaN score and a warning naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionstack.config import read_config_dict
from lesionstack.data.dataset import ScoringCrops, resize_square, shard
from lesionstack.data.hdf5 import list_ids, locate_crops
from lesionstack.data.schema import ID_COLUMN
from lesionstack.models import GatedClassifier, SeedEnsemble, ensemble_members
from lesionstack.paths import ArtifactPaths
from lesionstack.runtime import DistContext, RunSettings, Runtime, gather_rows, make_loader, model_logits, sigmoid
from lesionstack.trained.loaders import cnn_folds, load_cnn_fold

log = logging.getLogger(__name__)

FOLD_SCORE_PREFIX = "score_fold_"  # test_cnn.parquet: one column per CNN fold model, beside the mean `score`

# Fold-config keys that must agree across folds: every fold model sees the same decoded batch.
SHARED_KEYS = ("image_size", "amp", "channels_last")


class PredictorError(ValueError):
    """An artifacts folder that cannot be scored with (unfinished folds, inconsistent fold configs)."""


def fold_score_column(fold: int) -> str:
    return f"{FOLD_SCORE_PREFIX}{fold}"


def fold_table(ids: Sequence[str], by_fold: np.ndarray, folds: Sequence[int], per_fold: bool = True) -> pd.DataFrame:
    """DataFrame[isic_id, score(, score_fold_<k>...)] from (n, n_folds) fold-model scores (columns in `folds`
    order): `score` is their mean, as the stacker's test input and `predict` read it."""
    table = pd.DataFrame({ID_COLUMN: list(ids), "score": by_fold.mean(axis=1)})
    if per_fold:
        table = table.assign(**{fold_score_column(k): by_fold[:, j] for j, k in enumerate(folds)})
    return table


@dataclasses.dataclass
class _Fold:
    fold: int
    model: GatedClassifier | SeedEnsemble
    tta: bool
    dihedral: bool = False
    one_mask: bool = False  # the fold trained with gate_masks: cached: one mask per crop for every TTA view



class FoldScorer:
    """The trained CNN fold models of one artifacts folder (see the module docstring)."""

    def __init__(self, artifacts: ArtifactPaths, folds: list[_Fold], image_size: int, rt: Runtime) -> None:
        self.artifacts = artifacts
        self._folds = folds
        self.image_size = image_size
        self.rt = rt

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], device: str = "auto", progress: bool = True, *,
             folds: Sequence[int] | None = None, batch_size: int | None = None,
             num_workers: int | None = None, ctx: DistContext = DistContext()) -> FoldScorer:
        """Load every finished CNN fold model (or `folds`) once, onto `device`.

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
                        bool(cfg.get("tta_hflip", settings.tta_hflip)), bool(cfg.get("tta_dihedral", False)),
                        cfg.get("gate_masks", "online") == "cached")
                  for k, cfg in configs.items()]
        log.info("predictor: %d CNN fold model(s) from %s on %s", len(loaded), art.root, rt.device)
        return cls(art, loaded, int(first.get("image_size", 0)), rt)

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
        ids = list_ids(path).astype(str).tolist() if ids is None else [str(i) for i in ids]
        found_idx, found_scores = [], []
        for index, scores in self.stream_hdf5(path, ids):
            found_idx.append(index)
            found_scores.append(scores)
        by_fold = np.column_stack([gather_rows(found_idx, [s[:, j] for s in found_scores], len(ids), self.rt.ctx)
                                   for j in range(len(self._folds))])
        return fold_table(ids, by_fold, self.folds, per_fold)

    @torch.no_grad()
    def stream_hdf5(self, path: str | os.PathLike[str],
                    ids: Sequence[str] | np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices into `ids`, (B, n_folds) scores) batch by batch, as the crops are decoded and scored
        (this rank's shard under DDP): a caller that writes each batch out holds nothing per crop. A crop
        that cannot be read or decoded is left out, with a warning naming it. `ids` may be a numpy array of
        bytes (`list_ids`): held as one here, with each crop's byte range, and nothing else per crop."""
        size = self._need_cnn()
        crops = locate_crops(path, ids)  # one pass; HDF5's key index closed and released before the fork
        mine = shard(range(len(crops)), self.rt.ctx.rank, self.rt.ctx.world_size, pad=False)  # all: one process
        loader = make_loader(ScoringCrops(crops, size), self.rt, sampler=mine,
                             batch_size=self.rt.settings.eval_batch_size)
        try:
            for batch in self.rt.bar(loader, f"score {crops.path.name}", unit="batch"):
                for index, reason in batch.corrupt:
                    log.warning("crop '%s' in %s not scored (NaN): %s", crops.id(index), crops.path, reason)
                if len(batch.index):
                    yield batch.index.numpy(), self._score_batch(self._ready(batch.images))
        finally:
            crops.close()  # the handles this process opened (num_workers 0), also when the caller stops early

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
        return np.column_stack([sigmoid(model_logits(f.model, x, self.rt, f.tta, f.dihedral, f.one_mask).cpu().numpy()
                                        .astype(np.float64)) for f in self._folds]).reshape(len(x), len(self._folds))


def _check_folds_agree(art: ArtifactPaths, configs: dict[int, dict[str, Any]]) -> None:
    """Every fold model scores the same decoded batch, so they must share image size and precision."""
    items = list(configs.items())
    for k, cfg in items[1:]:
        for key in SHARED_KEYS:
            if cfg.get(key) != items[0][1].get(key):
                raise PredictorError(f"{art.cnn_fold(k).config}: {key} {cfg.get(key)!r} differs from fold "
                                     f"{items[0][0]}'s {items[0][1].get(key)!r}; score such folds separately")
