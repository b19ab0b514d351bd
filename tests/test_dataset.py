"""The CNN's data path: HDF5 crops -> resized uint8 tensors, the balanced epoch draw, batched augmentation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_cnn_data
from lesionstack.data.augment import AugmentConfig, augment_batch, normalize
from lesionstack.data.dataset import BalancedEpochSampler, CropDataset, check_corrupt, collate_skip, shard
from lesionstack.data.hdf5 import CorruptImageError


def test_crops_of_the_real_public_test_file(public_test_dir: Path) -> None:
    ds = CropDataset(public_test_dir / "test-image.hdf5", ["ISIC_0015657", "ISIC_0015729"], image_size=48)
    batch = collate_skip([ds[0], ds[1]])
    assert batch.images.shape == (2, 3, 48, 48) and batch.images.dtype == torch.uint8
    assert batch.index.tolist() == [0, 1] and not batch.corrupt
    assert 20 < float(batch.images.float().mean()) < 240  # a real skin crop, not a blank image


def test_corrupt_crop_stops_naming_the_id_or_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_cnn_data(tmp_path, n=4, corrupt=("ISIC_0000002",))
    ds = CropDataset(root / "train-image.hdf5", [f"ISIC_{i:07d}" for i in range(4)], image_size=32)
    batch = collate_skip([ds[i] for i in range(4)])
    assert batch.index.tolist() == [0, 1, 3] and [i for i, _ in batch.corrupt] == [2]
    with pytest.raises(CorruptImageError, match="ISIC_0000002"):
        check_corrupt(batch, ds, skip=False)
    with caplog.at_level(logging.WARNING):
        check_corrupt(batch, ds, skip=True)
    assert "ISIC_0000002" in caplog.text


def test_epoch_draw_takes_all_positives_and_fresh_negatives() -> None:
    labels = np.array([1] * 5 + [0] * 95)
    sampler = BalancedEpochSampler(labels, neg_per_pos=3, seed=7)
    draws = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        draw = list(sampler)
        assert len(draw) == len(sampler) == 20 and len(set(draw)) == 20
        assert set(range(5)) <= set(draw)
        draws.append(set(draw) - set(range(5)))
    assert draws[0] != draws[1]  # a fresh draw of negatives each epoch
    sampler.set_epoch(0)
    assert set(sampler) - set(range(5)) == draws[0]  # ...that a resumed epoch repeats


def test_ranks_split_the_same_draw() -> None:
    labels = np.array([1] * 3 + [0] * 40)
    full = BalancedEpochSampler(labels, 2, seed=1).draw().tolist()
    parts = [list(BalancedEpochSampler(labels, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 5
    assert set(parts[0]) | set(parts[1]) == set(full)
    assert shard(list(range(5)), 1, 2, pad=False) == [1, 3]
    assert shard(range(5), 1, 2, pad=False) == range(1, 5, 2)  # a range stays a range (no list of every index)
    assert list(shard(range(5), 1, 2, pad=True)) == [1, 3, 0]


def test_no_positives_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no positives"):
        BalancedEpochSampler(np.zeros(10), 3)


def test_augmentation_is_seeded_bounded_and_exact_when_neutral() -> None:
    x = torch.rand(4, 3, 16, 16)
    cfg = AugmentConfig()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    neutral = AugmentConfig(hflip=0, vflip=0, rotate_deg=0, scale=(1, 1), shift=0, brightness=0, contrast=0,
                            saturation=0, channel_gain=0)
    assert torch.allclose(augment_batch(x, neutral), x, atol=1e-5)
    mirror = AugmentConfig(**{**neutral.__dict__, "hflip": 1.0})
    assert torch.allclose(augment_batch(x, mirror), torch.flip(x, dims=[3]), atol=1e-5)
    assert augment_batch(x, AugmentConfig(enabled=False)) is x


def test_normalize_is_imagenet() -> None:
    grey = torch.full((1, 3, 2, 2), 0.485)
    assert abs(float(normalize(grey)[0, 0, 0, 0])) < 1e-6
