"""The diagnosis classifier's config (`DiagnosisConfig`) and its YAML loader.

The stage that trains with it is `lesionstack.train.diagnosis`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from lesionstack.config import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Range,
    check_fields,
    load_config,
    runtime,
)
from lesionstack.data.augment import AugmentConfig
from lesionstack.data.diagnosis import LabelMap
from lesionstack.models import ModelConfig, check_model_names, with_segmenter
from lesionstack.train.cnn_config import AMP

log = logging.getLogger(__name__)

@dataclass
class DiagnosisConfig:
    """Everything that defines one diagnosis run (defaults: a real-data run on a GPU)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(gate="none"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    labels: LabelMap = field(default_factory=LabelMap)  # ISIC 2024 iddx -> classes
    layout: Literal["auto", "isic2024", "ham10000", "task3"] = "auto"
    implicit_class: str | None = None  # Task 3 rows with no class column set (ISIC 2017: "nevus")
    n_folds: Annotated[int, Range(ge=2)] = 5
    fold_seed: int = 42
    image_size: PositiveInt = 128
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = runtime(256)
    epochs: PositiveInt = 10
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 1e-2
    warmup_epochs: NonNegativeFloat = 1.0
    min_lr_ratio: Probability = 0.01
    # weights: inverse-frequency class weights; sampler: balanced draws; none
    balance: Literal["weights", "sampler", "none"] = "weights"
    epoch_size: PositiveInt | None = None  # images drawn per epoch; None: as many as the fold's training rows
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
    patience: NonNegativeInt = 3  # validations without a better balanced accuracy before stopping (keep: best)
    # last: the final epoch; best: the epoch of best balanced accuracy on the scored fold (optimistic)
    keep: Literal["last", "best"] = "last"
    tta_hflip: bool = True  # OOF probabilities: mean logits of the image and its mirror
    seed: int = 42
    num_workers: NonNegativeInt = runtime(2)
    cpu_threads: NonNegativeInt = runtime(0)
    skip_corrupt: bool = False
    device: str = runtime("auto")
    amp: AMP = "auto"
    channels_last: bool = True
    progress: bool = runtime(True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.keep == "best":
            log.warning("diagnosis keep: best picks each fold's epoch on the fold it scores: the OOF figures "
                        "will be optimistic (cv.json says so); keep: last does not")


def load_diagnosis_config(path: str | os.PathLike[str] | None = None,
                          segmenter: str | os.PathLike[str] | None = None, **overrides: Any) -> DiagnosisConfig:
    """Defaults, then the YAML at `path`, then `overrides`; `segmenter` sets model.segmenter_weights."""
    cfg = load_config(DiagnosisConfig, path, **overrides)
    check_model_names(cfg.model, str(path or "diagnosis config"))
    if segmenter is not None:
        if cfg.model.gate == "none":
            raise ConfigError(f"--segmenter {segmenter}: the config's model.gate is 'none' (no segmenter); "
                              "set it to 'train' or 'freeze' to classify behind the segmenter gate")
        if not Path(segmenter).is_file():
            raise FileNotFoundError(f"--segmenter {segmenter}: no such file")
        cfg.model = with_segmenter(cfg.model, segmenter)
    return cfg
