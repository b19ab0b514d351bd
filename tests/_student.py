"""A tiny distilled student for the distill, phone and export tests: timm's test_resnet on 32-px crops of the
CNN tests' 24-lesion, 2-fold data set, taught by a per-student-fold teacher file, 1 epoch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from _cnn_data import make_cnn_data
from lesionstack.folds import read_folds
from lesionstack.models import ModelConfig
from lesionstack.train.distill import distill
from lesionstack.train.distill_config import DistillConfig, TeacherConfig


def tiny_student(**changes: object) -> DistillConfig:
    cfg = DistillConfig(model=ModelConfig(classifier="test_resnet", gate="none"), image_size=32, batch_size=8,
                        eval_batch_size=32, epochs=1, lr=1e-3, warmup_epochs=0.5, num_workers=0, cpu_threads=1,
                        progress=False, teacher=TeacherConfig(source="file", scores="TEACHER"))
    return dataclasses.replace(cfg, **changes)


def teacher_file(root: Path) -> Path:
    """Per-student-fold teacher scores (0.7 for positives, 0.3 for negatives)."""
    folds = read_folds(root / "folds.csv")
    parts = [folds[folds["fold"] != k][["isic_id"]].assign(student_fold=k, score=0.3 + 0.4 * folds["target"])
             for k in sorted(folds["fold"].unique())]
    pd.concat(parts).to_parquet(root / "teacher.parquet")
    return root / "teacher.parquet"


def train_tiny_student(tmp: Path, name: str = "tiny") -> tuple[Path, Path, DistillConfig, dict]:
    """(data folder, artifacts root with folds.csv and source.json, config, summary)."""
    root = make_cnn_data(tmp / "data")
    art = tmp / "art"
    art.mkdir(parents=True, exist_ok=True)
    (art / "folds.csv").write_bytes((root / "folds.csv").read_bytes())
    (art / "source.json").write_text(f'{{"data_dir": "{root}"}}')
    cfg = tiny_student(teacher=TeacherConfig(source="file", scores=str(teacher_file(root))))
    return root, art, cfg, distill(root, art, cfg, name=name)
