"""Auxiliary diagnosis heads for the per-fold malignancy CNN (the 4th-placed ISIC 2024 solution's idea).

With `aux_diagnosis` set in the CNN config, the fold model's head has 1 + K outputs: logit 0 is the
malignancy logit (trained with the BCE as before, and the only one anything scores), logits 1..K a softmax
over the diagnosis classes that `data.diagnosis.LabelMap` maps the metadata's `iddx_*` columns to:

    aux_diagnosis:
      weight: 0.3          # loss = BCE(logit 0, target) + weight * CE(logits 1..K, class)
      labels:              # the diagnosis stage's `labels` section (configs/diagnosis/*.yaml)
        classes: [benign, melanoma, basal cell carcinoma, squamous cell carcinoma]
        mapping: {Benign: benign, ...}

Rows without a class (the mapping says "drop", e.g. Indeterminate, or no entry matches) add nothing to the
auxiliary term: they are ignored, not guessed. The cross-entropy is the mean over the batch's rows that
have a class (0 when none has). train-cnn reads the classes from `train-metadata.csv` into a column of the
fold table (`attach_aux_classes`), and their digest enters each fold's recorded inputs, so a fold trained on
other diagnoses is refused like one trained on other folds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lesionstack.config import ConfigError, NonNegativeFloat, check_fields
from lesionstack.data.diagnosis import DiagnosisDataError, LabelMap, read_iddx_classes
from lesionstack.data.schema import ID_COLUMN
from lesionstack.resume import frame_digest

if TYPE_CHECKING:
    from lesionstack.train.loop import LossFn

log = logging.getLogger(__name__)

NO_CLASS = -1  # a row the auxiliary loss ignores
AUX_COLUMN = "aux_class"  # the fold table's column of diagnosis classes while train-cnn runs


@dataclass
class AuxDiagnosisConfig:
    """The auxiliary diagnosis heads: the loss weight and the iddx -> class mapping."""

    weight: NonNegativeFloat = 0.3
    labels: LabelMap = field(default_factory=LabelMap)

    def __post_init__(self) -> None:
        check_fields(self)


def aux_outputs(cfg: AuxDiagnosisConfig | None) -> int:
    """How many outputs the heads add to the malignancy logit (0 when off)."""
    return 0 if cfg is None else len(cfg.labels.classes)


def attach_aux_classes(folds: pd.DataFrame, metadata: str | os.PathLike[str], cfg: AuxDiagnosisConfig
                       ) -> tuple[pd.DataFrame, dict[str, str]]:
    """The fold table with each row's class in column AUX_COLUMN (so it travels with the row into every
    fold's training rows, inner splits and worker processes included), and the fold-input record of those
    labels (`resume.guard` then refuses a fold trained on other diagnoses)."""
    labels = read_iddx_classes(metadata, cfg.labels)  # isic_id -> class index, NO_CLASS where none
    missing = pd.Index(folds[ID_COLUMN]).difference(labels.index)
    if len(missing):
        raise DiagnosisDataError(f"{metadata}: no row for {len(missing)} lesion(s) of the fold file, e.g. "
                                 f"{list(missing[:3])}; aux_diagnosis needs every lesion's iddx")
    classes = labels.reindex(folds[ID_COLUMN]).to_numpy(dtype=np.int64)
    record = {"aux_labels": frame_digest(pd.DataFrame({ID_COLUMN: folds[ID_COLUMN].to_numpy(), "y": classes}))}
    return folds.assign(**{AUX_COLUMN: classes}), record


def aux_diagnosis_loss(logits: torch.Tensor, classes: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * mean cross-entropy of logits[:, 1:] over the rows with a class (`classes` >= 0), else 0."""
    keep = classes >= 0
    ce = F.cross_entropy(logits[:, 1:], classes.clamp(min=0), reduction="none")
    return weight * (ce * keep).sum() / keep.sum().clamp(min=1)


def with_aux_loss(cfg: AuxDiagnosisConfig | None, train: pd.DataFrame, device: torch.device,
                  base: LossFn | None = None) -> LossFn | None:
    """The fold's loss with the auxiliary term added, or `base` unchanged when `cfg` is None.

    `train`: the fold's training rows in dataset order, with their AUX_COLUMN (`attach_aux_classes`); the
    batch's dataset indices select their classes. `base` (the malignancy loss, default BCE) sees logit 0."""
    if cfg is None:
        return base
    if AUX_COLUMN not in train.columns:
        raise ConfigError(f"aux_diagnosis is set but the training rows have no '{AUX_COLUMN}' column: train-cnn "
                          "reads the classes from train-metadata.csv's iddx columns (attach_aux_classes); "
                          "set aux_diagnosis: null to train without the auxiliary heads")
    classes = train[AUX_COLUMN].to_numpy(dtype=np.int64)
    counts = np.bincount(classes[classes >= 0], minlength=len(cfg.labels.classes))
    log.info("aux_diagnosis: %d of %d training rows have a class %s (weight %g)", int((classes >= 0).sum()),
             len(classes), dict(zip(cfg.labels.classes, counts.tolist())), cfg.weight)
    table = torch.tensor(classes, device=device)

    def loss(logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        main = logits[:, 0]
        malignancy = F.binary_cross_entropy_with_logits(main, y) if base is None else base(main, y, index)
        return malignancy + aux_diagnosis_loss(logits, table[index], cfg.weight)

    return loss
