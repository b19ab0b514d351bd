"""The whole pipeline's config (`RunConfig`, one section per stage) and its YAML loader.

In YAML each stage section is a mapping, or a path to that stage's own YAML (relative to the run config's
folder, else to the working directory). The pipeline that runs it is `lesionstack.pipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lesionstack.config import ConfigError, config_from_dict
from lesionstack.folds import FoldsConfig
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


STAGE_CONFIGS = {"folds": FoldsConfig, "segmenter": SegConfig, "cnn": CNNConfig, "stack": StackConfig,
                 "tune": TuneSettings, "diagnosis": DiagnosisConfig}


def load_run_config(path: str | os.PathLike[str] | None = None) -> RunConfig:
    """Defaults, overridden by the YAML at `path`; a stage given as a string is read from that YAML file
    (relative to the run config's folder, else to the working directory)."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        base = Path(path).resolve().parent
        for key, value in list(data.items()):
            if key in STAGE_CONFIGS and isinstance(value, str):
                data[key] = _read_stage_yaml(value, base, key, path)
    return config_from_dict(RunConfig, data, where=str(path or "RunConfig"))


def _read_stage_yaml(value: str, base: Path, key: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    for candidate in (base / value, Path(value)):
        if candidate.is_file():
            with open(candidate, encoding="utf-8") as fh:
                return yaml.safe_load(fh) or {}
    raise ConfigError(f"{path}: {key}: no such config file {value!r} (looked in {base} and {Path.cwd()})")
