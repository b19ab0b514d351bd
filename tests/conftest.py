"""Shared fixtures: the real ISIC files under ../shared/data, and small helpers to build bad inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LESIONSTACK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data fixtures (../shared/data); tests that need them skip loudly if they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data fixtures not found at {SHARED_DATA} (set LESIONSTACK_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def exported_student(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """A tiny distilled student (tests/_student.py: 2 folds, OOF scores) exported, fp32 and int8, into
    ARTIFACTS/export, shared by the export and serve tests: (data, artifacts, export folder, export.json)."""
    from _student import train_tiny_student
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
    segmenter gate, 32-px input, one epoch on 24 synthetic crops, with oof_cnn.parquet and folds.csv."""
    import shutil

    from _cnn_data import make_cnn_data
    from lesionstack.models import ModelConfig
    from lesionstack.train.cnn import train_cnn
    from lesionstack.train.cnn_config import CNNConfig

    data = make_cnn_data(tmp_path_factory.mktemp("bundle_data"))
    out = tmp_path_factory.mktemp("bundle") / "artifacts"
    cfg = CNNConfig(model=ModelConfig(classifier="test_resnet", segmenter_encoder="test_resnet", gate="train"),
                    image_size=32, batch_size=8, eval_batch_size=32, epochs=1, lr=1e-3, warmup_epochs=0.5,
                    num_workers=0, cpu_threads=1, progress=False)
    train_cnn(data, data / "folds.csv", cfg, out)
    shutil.copy2(data / "folds.csv", out / "folds.csv")
    return out
