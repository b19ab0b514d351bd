"""Class probabilities from a trained diagnosis stage, for `score` and `serve`.

    from lesionstack.inference.diagnosis import DiagnosisPredictor

    d = DiagnosisPredictor.load("artifacts")        # reads artifacts/diagnosis/: fold configs + safetensors
    d.classes                                       # ("benign", "melanoma", ...) in probability-column order
    d.predict_proba(crops)                          # crops: HxWx3 uint8 RGB arrays -> (B, K) float, rows sum to 1
    d.predict_table(crops, ids)                     # DataFrame[id, prob_<class>..., predicted]

The fold models load once; each batch is resized and normalised exactly as in training (bilinear resize
of the decoded crop to the training size, ImageNet normalisation), and the probabilities are the mean over
the fold models of the softmax, with the flip TTA the run was trained to score with. Only portable files
are read (config.yaml, model.safetensors, cv.json), so the folder can ship in a bundle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionstack.config import read_config_dict
from lesionstack.data.dataset import resize_square
from lesionstack.data.diagnosis import PROB_PREFIX
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.runtime import RunSettings, Runtime, model_logits
from lesionstack.trained.loaders import load_diagnosis_fold


class DiagnosisBundleError(FileNotFoundError):
    """An artifacts folder without a complete diagnosis stage."""


@dataclass
class DiagnosisPredictor:
    """The fold models of one diagnosis run, loaded once (eval mode, on the runtime's device)."""

    classes: tuple[str, ...]
    image_size: int
    models: list[nn.Module]
    rt: Runtime

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @classmethod
    def load(cls, artifacts: str | os.PathLike[str], device: str = "auto") -> DiagnosisPredictor:
        """Every fold of `artifacts/diagnosis/` (all must be DONE); classes from its cv.json."""
        art = ArtifactPaths(Path(artifacts))
        if not art.diagnosis_cv.is_file():
            raise DiagnosisBundleError(f"{art.diagnosis_cv}: not found; run `lesionstack train-diagnosis` first "
                                       "(it is written when every fold is done)")
        classes = tuple(read_json(art.diagnosis_cv)["classes"])
        folds = sorted(p for p in art.diagnosis_dir.glob("fold_*") if p.is_dir())
        undone = [p.name for p in folds if not (p / "DONE").is_file()]
        if not folds or undone:
            raise DiagnosisBundleError(f"{art.diagnosis_dir}: fold(s) {undone or 'none'} not finished")
        # fold configs read as plain dicts: prediction never imports training code
        cfg = read_config_dict(art.diagnosis_fold(0).config)
        rt = Runtime.create(RunSettings.pick(cfg, progress=False), device, cfg.get("amp", "auto"))
        models = []
        for p in folds:
            files = art.diagnosis_fold(int(p.name.split("_")[1]))
            models.append(rt.place(load_diagnosis_fold(files, len(classes))))
        return cls(classes, int(cfg["image_size"]), models, rt)

    def preprocess(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB crops of any size -> (B, 3, S, S) normalised float on the device."""
        arrays = []
        for i, crop in enumerate(crops):
            a = np.asarray(crop)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise ValueError(f"crop {i}: expected an HxWx3 uint8 RGB array, got {a.dtype} {a.shape}")
            arrays.append(resize_square(np.ascontiguousarray(a), self.image_size).transpose(2, 0, 1))
        return self.rt.finish(self.rt.prepare(torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))))

    @torch.no_grad()
    def predict_proba(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(B, K) class probabilities, the mean over fold models of the softmax (rows sum to 1)."""
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)))
        parts = []
        step = self.rt.settings.eval_batch_size
        for start in range(0, len(crops), step):
            x = self.preprocess(crops[start:start + step])
            total = torch.zeros(len(x), len(self.classes), device=self.device)
            for model in self.models:
                total += torch.softmax(model_logits(model, x, self.rt, self.rt.settings.tta_hflip), dim=1)
            parts.append((total / len(self.models)).cpu().numpy())
        return np.concatenate(parts).astype(np.float64)

    def predict_table(self, crops: Sequence[np.ndarray], ids: Sequence[str]) -> pd.DataFrame:
        """id, one `prob_<class>` column per class, and the most probable class."""
        proba = self.predict_proba(crops)
        table = pd.DataFrame(proba, columns=[PROB_PREFIX + c for c in self.classes])
        table.insert(0, "id", list(ids))
        table["predicted"] = np.array(self.classes, dtype=object)[proba.argmax(1)] if len(proba) else []
        return table
