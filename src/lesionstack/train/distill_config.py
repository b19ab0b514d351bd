"""The distillation stage's config: the student's training recipe (`DistillConfig`, a `CNNConfig`) plus the
teacher (`TeacherConfig`) and the loss.

The stage that trains with it is `lesionstack.train.distill` (its docstring gives the no-leak rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from lesionstack.config import ConfigError, load_config
from lesionstack.models import ModelConfig
from lesionstack.train.cnn_config import CNNConfig

TEACHER_SOURCES = ("nested", "file", "oof_stack")


@dataclass
class TeacherConfig:
    """Where the soft targets come from (see the module docstring for the no-leak rule)."""

    source: str = "nested"  # nested: the stack refit per student fold | file: `scores` | oof_stack (leaks)
    scores: str | None = None  # source file: parquet/csv with isic_id, student_fold, score
    stack_config: str | None = None  # nested: stack YAML (default: the run's stack/fold_0/config.yaml)
    calibrate: str = "platt"  # platt: logit = a * logit(score) + b fitted on the training labels | none
    allow_leak: bool = False  # accept scores that saw the student's validation fold (to measure the leak)

    def __post_init__(self) -> None:
        if self.source not in TEACHER_SOURCES:
            raise ConfigError(f"teacher.source must be one of {TEACHER_SOURCES}, got {self.source!r}")
        if self.calibrate not in ("platt", "none"):
            raise ConfigError(f"teacher.calibrate must be 'platt' or 'none', got {self.calibrate!r}")
        if self.source == "file" and not self.scores:
            raise ConfigError("teacher.source 'file' needs teacher.scores (a parquet or csv file)")


def _student_model() -> ModelConfig:
    return ModelConfig(classifier="mobilenetv3_small_100", gate="none")


@dataclass
class DistillConfig(CNNConfig):
    """The CNN stage's training recipe (it trains through the same loop) plus the teacher and the loss."""

    model: ModelConfig = field(default_factory=_student_model)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    alpha: float = 0.5  # weight of the hard-label BCE; 1 trains on labels alone
    temperature: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.seeds_per_fold != 1:
            raise ConfigError(f"a student fold is one model: seeds_per_fold must be 1, got {self.seeds_per_fold}")
        if self.model.gate != "none":
            raise ConfigError(f"the student is image-only: model.gate must be 'none', got {self.model.gate!r}")


def load_distill_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> DistillConfig:
    return load_config(DistillConfig, path, **overrides)
