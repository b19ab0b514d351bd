"""The diagnosis classifier's config (`DiagnosisConfig`) and its YAML loader.

The stage that trains with it is `lesionstack.train.diagnosis`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesionstack.config import ConfigError, load_config
from lesionstack.data.augment import AugmentConfig
from lesionstack.data.diagnosis import LabelMap
from lesionstack.models import ModelConfig, with_segmenter

log = logging.getLogger(__name__)

BALANCE = ("weights", "sampler", "none")


@dataclass
class DiagnosisConfig:
    """Everything that defines one diagnosis run (defaults: a real-data run on a GPU)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(gate="none"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    labels: LabelMap = field(default_factory=LabelMap)  # ISIC 2024 iddx -> classes
    layout: str = "auto"  # auto | isic2024 | ham10000 | task3
    implicit_class: str | None = None  # Task 3 rows with no class column set (ISIC 2017: "nevus")
    n_folds: int = 5
    fold_seed: int = 42
    image_size: int = 128
    batch_size: int = 64
    eval_batch_size: int = 256
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    balance: str = "weights"  # weights: inverse-frequency class weights; sampler: balanced draws; none
    epoch_size: int | None = None  # images drawn per epoch; None: as many as the fold's training rows
    label_smoothing: float = 0.0
    patience: int = 3  # validations without a better balanced accuracy before stopping (keep: best)
    keep: str = "last"  # last: the final epoch; best: the epoch of best balanced accuracy on the scored fold
    tta_hflip: bool = True  # OOF probabilities: mean logits of the image and its mirror
    seed: int = 42
    num_workers: int = 2
    cpu_threads: int = 0
    skip_corrupt: bool = False
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.balance not in BALANCE:
            raise ConfigError(f"diagnosis balance must be one of {BALANCE}, got {self.balance!r}")
        if self.keep not in ("best", "last"):
            raise ConfigError(f"diagnosis keep must be 'best' or 'last', got {self.keep!r}")
        if self.keep == "best":
            log.warning("diagnosis keep: best picks each fold's epoch on the fold it scores: the OOF figures "
                        "will be optimistic (cv.json says so); keep: last does not")


def load_diagnosis_config(path: str | os.PathLike[str] | None = None,
                          segmenter: str | os.PathLike[str] | None = None, **overrides: Any) -> DiagnosisConfig:
    """Defaults, then the YAML at `path`, then `overrides`; `segmenter` sets model.segmenter_weights."""
    cfg = load_config(DiagnosisConfig, path, **overrides)
    if segmenter is not None:
        if cfg.model.gate == "none":
            raise ConfigError(f"--segmenter {segmenter}: the config's model.gate is 'none' (no segmenter); "
                              "set it to 'train' or 'freeze' to classify behind the segmenter gate")
        if not Path(segmenter).is_file():
            raise FileNotFoundError(f"--segmenter {segmenter}: no such file")
        cfg.model = with_segmenter(cfg.model, segmenter)
    return cfg
