"""Shared fixtures: the real ISIC files under ../shared/data, and small helpers to build bad inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import SHARED_DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


SHARED_FOLDERS = ("isic2024-public-test", "isic2024-real-crops", "isic2024-real-metadata", "isic2024-real-labels",
                  "ham10000")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data fixtures (../shared/data). A test that reads them errors when they are absent: a skipped
    real-format test would pass a run that never read the real formats."""
    missing = [name for name in SHARED_FOLDERS if not (SHARED_DATA / name).is_dir()]
    if missing:
        pytest.fail(f"real data fixtures not found: {', '.join(missing)} under {SHARED_DATA} (set "
                    "LESIONSTACK_SHARED_DATA to the folder that holds them)", pytrace=False)
    return SHARED_DATA


@pytest.fixture(scope="session")
def exported_student(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """A tiny distilled student (tests/helpers.py: 2 folds, OOF scores) exported, fp32 and int8, into
    ARTIFACTS/export, shared by the export and serve tests: (data, artifacts, export folder, export.json)."""
    from helpers import train_tiny_student
    from lesionstack.inference.export import export_student

    root, art, _, _ = train_tiny_student(tmp_path_factory.mktemp("exported_student"))
    report = export_student(root, art, art / "export", name="tiny", fold=0, int8=True, calibration_crops=12)
    return root, art, art / "export", report


@pytest.fixture(scope="session")
def public_test_dir(shared_data: Path) -> Path:
    return shared_data / "isic2024-public-test"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A trained artifacts folder small enough for any test: 2 CNN folds of timm's test_resnet behind the
    segmenter gate, 32-px input, one epoch on 24 synthetic crops (training_data.json: synthetic), with
    oof_cnn.parquet and folds.csv."""
    import shutil

    from helpers import make_cnn_data, tiny_cnn_config
    from lesionstack.provenance import mark_synthetic
    from lesionstack.train.cnn import train_cnn

    data = make_cnn_data(tmp_path_factory.mktemp("bundle_data"))
    mark_synthetic(data, "test crops")  # generated crops: the bundle records it, the page shows its banner
    out = tmp_path_factory.mktemp("bundle") / "artifacts"
    train_cnn(data, data / "folds.csv", tiny_cnn_config(epochs=1, batch_size=8), out)
    shutil.copy2(data / "folds.csv", out / "folds.csv")
    return out
