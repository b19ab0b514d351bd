"""The distillation stage's config: the student's training recipe (`DistillConfig`, a `CNNConfig`) plus the
teacher (`TeacherConfig`) and the loss.

The stage that trains with it is `lesionstack.train.distill` (its docstring gives the no-leak rule).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from lesionstack.config import Invalid, PositiveFloat, Probability, check_fields, load_config, runtime
from lesionstack.models import ModelConfig, check_model_names
from lesionstack.train.cnn_config import CNNConfig


@dataclass
class TeacherConfig:
    """Where the soft targets come from (see the module docstring for the no-leak rule)."""

    # nested: the stack refit per student fold | file: `scores` | oof_stack (leaks)
    source: Literal["nested", "file", "oof_stack"] = "nested"
    scores: str | None = None  # source file: parquet/csv with isic_id, student_fold, score
    stack_config: str | None = None  # nested: stack YAML (default: the run's stack/fold_0/config.yaml)
    # platt: logit = a * logit(score) + b fitted on the training labels | none
    calibrate: Literal["platt", "none"] = "platt"
    allow_leak: bool = False  # accept scores that saw the student's validation fold (to measure the leak)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.source == "file" and not self.scores:
            raise Invalid("scores", "a parquet or csv file with teacher.source: file", self.scores)


def _student_model() -> ModelConfig:
    return ModelConfig(classifier="mobilenetv3_small_100", gate="none")


@dataclass
class DistillConfig(CNNConfig):
    """The CNN stage's training recipe (it trains through the same loop) plus the teacher and the loss."""

    model: ModelConfig = field(default_factory=_student_model)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    alpha: Probability = 0.5  # weight of the hard-label BCE; 1 trains on labels alone
    temperature: PositiveFloat = 2.0
    # the student's folder ARTIFACTS/distill/NAME; null: the config file's stem (`default` without one). Where
    # a student lies never changes what it learns, so a resume ignores it like the runtime keys.
    name: str | None = runtime(None)

    @property
    def student(self) -> str:
        return self.name or "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds_per_fold != 1:
            raise Invalid("seeds_per_fold", "1 (a student fold is one model)", self.seeds_per_fold)
        if self.model.gate != "none":
            raise Invalid("model.gate", "none (the student is image-only)", self.model.gate)


def load_distill_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> DistillConfig:
    cfg = load_config(DistillConfig, path, **overrides)
    check_model_names(cfg.model, str(path or "distill config"))
    return cfg
