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

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack.data.decode import MAX_DECODED_PIXELS, decode_input
from lesionstack.data.diagnosis import PROB_PREFIX
from lesionstack.files import read_json
from lesionstack.inference.diagnosis import DiagnosisPredictor
from lesionstack.inference.stacker import has_tabular_variant, score_table, uses_cnn
from lesionstack.paths import ArtifactPaths
from lesionstack.runtime import DistContext, Runtime
from lesionstack.trained.scorer import FoldScorer, PredictorError, _Fold

__all__ = ["Predictor", "PredictorError", "read_image_file"]

log = logging.getLogger(__name__)


def read_image_file(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """An image file as a model's (size, size, 3) uint8 input, made as HDF5 crops and uploads are
    (`decode_input`: JPEG at a reduced scale, PNG and others, EXIF rotation, refused above the pixel limits)."""
    return decode_input(Path(path).read_bytes(), size, where=Path(path).name, path=path)


class Predictor(FoldScorer):
    """The trained CNN fold models (`FoldScorer`), the stacker and the diagnosis stage of one artifacts folder
    (see the module docstring)."""

    def __init__(self, artifacts: ArtifactPaths, folds: list[_Fold], image_size: int, rt: Runtime) -> None:
        super().__init__(artifacts, folds, image_size, rt)
        self._cv = read_json(artifacts.cv_json) if artifacts.cv_json.is_file() else None
        self.diagnosis: DiagnosisPredictor | None = None  # when the bundle has a diagnosis stage

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], device: str = "auto", progress: bool = True, *,
             folds: Sequence[int] | None = None, batch_size: int | None = None,
             num_workers: int | None = None, ctx: DistContext = DistContext()) -> Predictor:
        """`FoldScorer.load`, plus the diagnosis stage when the bundle has one; the stacker is read lazily."""
        predictor = super().load(artifacts_dir, device, progress, folds=folds, batch_size=batch_size,
                                 num_workers=num_workers, ctx=ctx)
        if predictor.artifacts.diagnosis_cv.is_file():  # a diagnosis stage in the bundle: class probabilities too
            predictor.diagnosis = DiagnosisPredictor.load(predictor.artifacts.root, device=device)
        return predictor  # type: ignore[return-value]

    @property
    def has_stacker(self) -> bool:
        return self._cv is not None

    @property
    def stacker_uses_cnn(self) -> bool:
        return uses_cnn(self._cv)

    @property
    def has_tabular_variant(self) -> bool:
        """The stacker also trained models without CNN features (scores rows whose crop failed)."""
        return has_tabular_variant(self._cv)

    @property
    def has_diagnosis(self) -> bool:
        return self.diagnosis is not None

    @property
    def diagnosis_classes(self) -> tuple[str, ...]:
        return tuple(self.diagnosis.classes) if self.diagnosis is not None else ()

    def diagnosis_input(self, data: bytes, model_input: np.ndarray, where: str = "image",
                        path: str | os.PathLike[str] | None = None,
                        max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
        """The diagnosis model's own input from the image bytes `data`: decoded at the size it was trained at,
        as its training crops were (`decode_input`), never the CNN's input resized once more. `model_input`
        (`decode` of the same bytes) when the sizes agree, or when the bundle has no diagnosis model."""
        size = self.diagnosis.image_size if self.diagnosis is not None else None
        if size is None or model_input.shape[0] == size:
            return model_input
        return decode_input(data, size, max_pixels=max_pixels, where=where, path=path)

    def diagnose(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(B, K) class probabilities from the bundle's diagnosis stage (`diagnosis_classes` order)."""
        if self.diagnosis is None:
            raise PredictorError(f"{self.artifacts.root}: no diagnosis stage (run `lesionstack train-diagnosis`)")
        return self.diagnosis.predict_proba(crops)

    # ---- files ----------------------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        """The side of the images this bundle scores: the CNN's, or a diagnosis-only bundle's."""
        return self.diagnosis.image_size if self.diagnosis is not None and not self._folds else self._need_cnn()

    def decode(self, data: bytes, where: str = "image", path: str | os.PathLike[str] | None = None,
               max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
        """Image bytes -> the (S, S, 3) uint8 input of this bundle's models, made as `predict` (HDF5 crops),
        `score` (files) and `serve` (uploads) all make it (`decode_input`): one file, one probability."""
        return decode_input(data, self.input_size, max_pixels=max_pixels, where=where, path=path)

    def score_files(self, paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
        """DataFrame[path, probability, error] for JPEG/PNG/... files; an unreadable file gets NaN and the
        reason in `error` (None elsewhere)."""
        # a diagnosis-only bundle (e.g. HAM10000) scores class probabilities alone: probability stays NaN;
        # with no model at all this raises here, not once per file
        _ = self.input_size
        paths = [os.fspath(p) for p in paths]
        prob, error = np.full(len(paths), np.nan), [None] * len(paths)
        classes = np.full((len(paths), len(self.diagnosis_classes)), np.nan) if self.has_diagnosis else None
        step = self.rt.settings.eval_batch_size
        for start in self.rt.bar(range(0, len(paths), step), "score files", unit="batch"):
            read: dict[int, np.ndarray] = {}
            own: dict[int, np.ndarray] = {}  # the diagnosis model's input, at its own size
            for i in range(start, min(start + step, len(paths))):
                try:
                    data, name = Path(paths[i]).read_bytes(), Path(paths[i]).name
                    read[i] = self.decode(data, name, paths[i])
                    own[i] = self.diagnosis_input(data, read[i], name, paths[i])
                except (OSError, ValueError) as err:  # CorruptImageError and PIL's errors included
                    read.pop(i, None)
                    error[i] = f"{type(err).__name__}: {err}"
                    log.warning("%s not scored (NaN): %s", paths[i], error[i])
            if read and self._folds:
                prob[list(read)] = self.score_crops(list(read.values()))
            if read and classes is not None:
                classes[list(own)] = self.diagnose(list(own.values()))
        table = pd.DataFrame({"path": paths, "probability": prob, "error": error})
        if classes is not None:  # one prob_<class> column per diagnosis class, before the error column
            for j, name in enumerate(self.diagnosis_classes):
                table.insert(len(table.columns) - 1, PROB_PREFIX + name, classes[:, j])
        return table

    # ---- the stacker --------------------------------------------------------------------------------

    def predict_table(self, metadata: pd.DataFrame, cnn_scores: pd.DataFrame | None = None,
                      where: str = "test metadata") -> pd.DataFrame:
        """DataFrame[isic_id, score] from the stacker's fold models on `metadata` (+ `cnn_scores`:
        `score_hdf5(..., per_fold=True)`'s table): `inference.stacker.score_table`, the one test-scoring path
        of `predict`, `run` and the Kaggle kernel."""
        return score_table(self.artifacts, metadata, cnn_scores, where)
