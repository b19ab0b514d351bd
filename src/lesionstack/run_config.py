"""The whole pipeline's config (`RunConfig`, one section per stage) and its YAML loader.

In YAML each stage section is a mapping, or a path to that stage's own YAML (relative to the run config's
folder, else to the working directory). The pipeline that runs it is `lesionstack.pipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lesionstack.config import Invalid, check_fields, load_config
from lesionstack.folds import FoldsConfig
from lesionstack.models import check_model_names
from lesionstack.tabular.stack_config import StackConfig
from lesionstack.tabular.tune import TuneSettings
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.train.diagnosis_config import DiagnosisConfig
from lesionstack.train.segmenter import SegConfig


@dataclass
class RunConfig:
    """The whole pipeline. In YAML each stage section is a mapping, or a path to that stage's own YAML."""

    folds: FoldsConfig = field(default_factory=FoldsConfig)
    segmenter: SegConfig = field(default_factory=SegConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    tune: TuneSettings = field(default_factory=TuneSettings)
    masks_dir: str | None = None  # segmenter training masks (ISIC 2018 Task 1 layout); default DATA/masks
    report: bool = True
    diagnosis_stage: bool = False  # also train the multi-class diagnosis stage (iddx classes) before the report
    diagnosis: DiagnosisConfig = field(default_factory=DiagnosisConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        model = self.cnn.model
        if model.gate != "none" and not model.segmenter_weights and self.segmenter.encoder != model.segmenter_encoder:
            # the segmenter `run` trains gates the CNN: caught now, not after training it
            raise Invalid("segmenter.encoder", f"the CNN's model.segmenter_encoder ({model.segmenter_encoder}), "
                          "so the CNN can load the segmenter run trains", self.segmenter.encoder)


def load_run_config(path: str | os.PathLike[str] | None = None) -> RunConfig:
    """Defaults, overridden by the YAML at `path`; a stage given as a string is read from that YAML file
    (relative to the run config's folder, else to the working directory). Every stage's values are checked
    here, before the first stage runs."""
    cfg = load_config(RunConfig, path)
    where = str(path or "RunConfig")
    check_model_names(cfg.cnn.model, where, "cnn.model")
    if cfg.diagnosis_stage:
        check_model_names(cfg.diagnosis.model, where, "diagnosis.model")
    return cfg
