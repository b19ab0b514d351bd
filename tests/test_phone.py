"""Phone-quality augmentation and the clean-vs-degraded evaluation of a trained image model."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import train_tiny_student
from lesionstack.config import ConfigError
from lesionstack.data.augment import (
    AugmentConfig,
    PhoneConfig,
    augment_batch,
    degrade_crop,
    gaussian_blur,
    phone_degrade,
)
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.train.robustness import evaluate_phone, phone_copy


def images(n: int = 4, size: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=gen) * 0.2 + 0.6
    x[:, :, 12:36, 12:36] = 0.15  # a dark lesion with sharp edges
    return x


def test_phone_off_or_unchosen_leaves_images_alone() -> None:
    x = images()
    assert torch.equal(phone_degrade(x, PhoneConfig(p=0.0)), x)
    # the batch augmentation never degrades: the training dataset does, on the crop as stored
    on, off = (AugmentConfig(phone=PhoneConfig(p=p)) for p in (1.0, 0.0))
    assert torch.equal(augment_batch(x, on, torch.Generator().manual_seed(4)),
                       augment_batch(x, off, torch.Generator().manual_seed(4)))


def test_tiny_images_blur_without_failing() -> None:
    for side in (1, 2, 3):
        tiny = torch.rand(3, side, side)
        assert gaussian_blur(tiny, 1.2).shape == tiny.shape


def test_phone_degradation_blurs_and_shifts_colour_but_keeps_shape_and_range() -> None:
    x = images()
    y = phone_degrade(x, PhoneConfig(), torch.Generator().manual_seed(1), p=1.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    edge = lambda t: (t[..., :, 1:] - t[..., :, :-1]).abs().mean()  # noqa: E731
    assert edge(y) < edge(x)  # down-up scaling and blur soften the lesion's border
    assert (y - x).abs().mean() > 0.01
    again = phone_degrade(x, PhoneConfig(), torch.Generator().manual_seed(1), p=1.0)
    assert torch.equal(y, again)  # seeded: a resumed epoch repeats it


def test_phone_probability_selects_some_crops() -> None:
    x = images(n=64)
    y = phone_degrade(x, PhoneConfig(p=0.5), torch.Generator().manual_seed(2))
    changed = (y - x).flatten(1).abs().amax(1) > 0
    assert 15 < int(changed.sum()) < 49


def test_gaussian_blur_keeps_flat_images_and_the_mean() -> None:
    flat = torch.full((3, 20, 20), 0.4)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)
    x = images(1)[0]
    assert abs(float(gaussian_blur(x, 1.0).mean() - x.mean())) < 0.01


def test_phone_config_loads_from_yaml_lists() -> None:
    from lesionstack.config import config_from_dict

    cfg = config_from_dict(AugmentConfig, {"phone": {"p": 0.3, "jpeg_quality": [40, 60]}})
    assert cfg.phone.p == 0.3 and cfg.phone.jpeg_quality == (40, 60)
    with pytest.raises(ConfigError):
        config_from_dict(AugmentConfig, {"phone": {"nope": 1}})


def test_phone_copy_is_deterministic_and_reused(tmp_path: Path) -> None:
    crop = (np.random.default_rng(0).random((50, 50, 3)) * 255).astype(np.uint8)
    assert np.array_equal(degrade_crop(crop, PhoneConfig(), (0, 3)), degrade_crop(crop, PhoneConfig(), (0, 3)))
    assert not np.array_equal(degrade_crop(crop, PhoneConfig(), (0, 3)), degrade_crop(crop, PhoneConfig(), (0, 4)))


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root, art, _, _ = train_tiny_student(tmp_path_factory.mktemp("phone"))
    return root, art


def test_evaluate_phone_scores_clean_and_degraded(student: tuple[Path, Path]) -> None:
    root, art = student
    result = evaluate_phone(root, art, model="tiny", progress=False)
    oof = read_json(ArtifactPaths(art).distill_file("tiny", "metrics.json"))
    # the clean half is the student's own OOF evaluation, through the same data path
    assert result["clean"]["oof_pauc"] == pytest.approx(oof["oof_pauc"])
    assert len(result["degraded"]["fold_pauc"]) == 2
    assert read_json(ArtifactPaths(art).robustness_file("tiny.json"))["model"] == "tiny"
    copy = ArtifactPaths(art).robustness_file("phone-train-image.hdf5")
    with h5py.File(copy) as h5, h5py.File(root / "train-image.hdf5") as src:
        assert sorted(h5) == sorted(src)
    before = copy.stat().st_mtime_ns
    phone_copy(root / "train-image.hdf5", sorted(h5py.File(root / "train-image.hdf5")), copy, PhoneConfig())
    assert copy.stat().st_mtime_ns == before  # reused
    with pytest.raises(ConfigError):
        phone_copy(root / "train-image.hdf5", ["x"], copy, dataclasses.replace(PhoneConfig(), p=0.9))


def test_evaluate_phone_scores_a_cnn_whose_fold_configs_carry_a_refused_training_key(
        student: tuple[Path, Path]) -> None:
    """Scoring reads a fold config as prediction does: a CNN trained with `keep: best` (refused for training
    since) still scores; here the student's fold models, copied as the CNN's."""
    import re
    import shutil

    from lesionstack.config import read_config_dict
    from lesionstack.files import write_text

    root, art = student
    paths = ArtifactPaths(art)
    for k in (0, 1):
        src, dst = paths.distill_fold("tiny", k), paths.cnn_fold(k)
        dst.dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.safetensors, dst.safetensors)
        text = re.sub(r"^keep: .*$", "", src.config.read_text(), flags=re.M) + "keep: best\n"
        write_text(dst.config, text)
        assert read_config_dict(dst.config)["keep"] == "best"
        write_text(dst.done, "done\n")
    cnn = evaluate_phone(root, art, model="cnn", progress=False)
    assert cnn["clean"]["oof_pauc"] == pytest.approx(read_json(paths.distill_file("tiny", "metrics.json"))["oof_pauc"])


def crops_file(tmp_path: Path, n: int = 6, side: int | None = None) -> tuple[Path, list[str]]:
    """An HDF5 of n JPEG crops of 96-130 px (the demo's size range) or `side`, ids ISIC_0..n-1."""
    import simplejpeg

    rng = np.random.default_rng(5)
    ids = [f"ISIC_{i}" for i in range(n)]
    path = tmp_path / "crops.hdf5"
    with h5py.File(path, "w") as h5:
        for i, isic_id in enumerate(ids):
            edge = side or 96 + 7 * i
            crop = np.full((edge, edge, 3), 190, np.uint8)
            crop[edge // 4: 3 * edge // 4, edge // 4: 3 * edge // 4] = rng.integers(20, 90, 3)
            h5[isic_id] = np.bytes_(simplejpeg.encode_jpeg(crop, quality=95))
    return path, ids


def test_training_crops_are_degraded_at_their_own_resolution_then_resized(tmp_path: Path) -> None:
    """What `phone-eval` scores (the stored crop degraded, then resized by the model) is what training
    sees; degrading the 32-px input instead blurs a 4x larger share of the lesion."""
    from lesionstack.data.dataset import CropDataset, PhoneCropDataset, resize_square

    path, ids = crops_file(tmp_path)
    phone = PhoneConfig(p=1.0)
    ds = PhoneCropDataset(path, ids, [0.0] * len(ids), 32, phone, seed=7)
    clean = CropDataset(path, ids, None, 32)
    image, label, index, error = ds[(2, 5, 1)]
    assert index == 2 and error is None and image.shape == (3, 32, 32)
    expected = resize_square(degrade_crop(ds.read(2, None), phone, (7, 5, 1, 2)), 32)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    at_input_size = degrade_crop(clean.load(2), phone, (7, 5, 1, 2))
    assert not np.array_equal(expected, at_input_size)
    assert torch.equal(ds[(2, 5, 1)][0], image)  # a resumed epoch repeats it
    assert not torch.equal(ds[(2, 6, 1)][0], image)  # the next epoch draws afresh
    assert torch.equal(ds[2][0], clean[2][0])  # a plain index (EMA's batch-norm refresh, scoring): clean


def test_phone_share_and_epoch_tags_through_a_worker(tmp_path: Path) -> None:
    from lesionstack.data.dataset import BalancedEpochSampler, CropDataset, TaggedDraws, collate_skip, training_crops

    path, ids = crops_file(tmp_path, n=40)
    labels = [1.0] * 10 + [0.0] * 30
    draws = BalancedEpochSampler(labels, neg_per_pos=3, seed=0)
    for plain in (AugmentConfig(phone=PhoneConfig(p=0.0)), AugmentConfig(enabled=False, phone=PhoneConfig(p=1.0))):
        ds, sampler = training_crops(path, ids, labels, 32, plain, draws)
        assert type(ds) is CropDataset and sampler is draws
    ds, sampler = training_crops(path, ids, labels, 32, AugmentConfig(phone=PhoneConfig(p=0.5)), draws)
    assert isinstance(sampler, TaggedDraws)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 40 and {k[1] for k in keys} == {3}
    assert [k[2] for k in keys] == list(range(40))
    loader = torch.utils.data.DataLoader(ds, batch_size=40, sampler=sampler, num_workers=1,
                                         persistent_workers=True, collate_fn=collate_skip)
    batch = next(iter(loader))
    clean = torch.stack([CropDataset(path, ids, None, 32)[int(i)][0] for i in batch.index])
    changed = (batch.images.int() - clean.int()).flatten(1).abs().amax(1) > 0
    assert 10 <= int(changed.sum()) <= 30  # about half of the crops, p = 0.5
    for epoch in (3, 4):  # the persistent worker gets each epoch's tags with the keys
        sampler.set_epoch(epoch)
        batch = next(iter(loader))
        with single_thread():  # as in the worker: torch's resampling rounds differently across thread counts
            assert torch.equal(batch.images, torch.stack([ds[key][0] for key in sampler]))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_a_large_photo_is_shrunk_to_the_crop_sizes_before_it_is_degraded(tmp_path: Path) -> None:
    from lesionstack.data.dataset import PHONE_MAX_SIDE, PhoneCropDataset

    path, ids = crops_file(tmp_path, n=1, side=600)
    ds = PhoneCropDataset(path, ids, [0.0], 32, PhoneConfig(p=1.0), seed=0)
    assert max(ds.stored(0).shape[:2]) == PHONE_MAX_SIDE
    assert ds[(0, 0, 0)][0].shape == (3, 32, 32)
