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
def public_test_dir(shared_data: Path) -> Path:
    return shared_data / "isic2024-public-test"
