"""train-seg: the masks folder, the training that beats a trivial mask, the artifacts, rerun and refusal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import yaml
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from lesionstack.cli import app
from lesionstack.config import ConfigError, load_config
from lesionstack.data.augment import AugmentConfig
from lesionstack.files import read_json
from lesionstack.models import load_segmenter, predict_masks
from lesionstack.paths import ArtifactPaths
from lesionstack.train.segmenter import (
    MaskDataError,
    SegConfig,
    augment_pair,
    dice_iou,
    find_pairs,
    load_pair,
    split_indices,
    train_segmenter,
)

TINY = {
    "encoder": "mobilenetv3_small_050",  # learns these ellipses in a few steps; resnets need 3x more
    "decoder_channels": [32, 16, 16, 8, 8],
    "image_size": 32,
    "epochs": 6,
    "batch_size": 6,
    "lr": 0.003,
    "val_fraction": 0.25,
    "load_workers": 2,
    "augment": {"rotate_deg": 30.0, "scale": [0.9, 1.1], "brightness": 0.1},
}


def draw_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Image.Image]:
    """A dark ellipse (the lesion) on noisy skin, and its mask."""
    mask = Image.new("L", (size, size), 0)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    rx, ry = rng.uniform(0.15, 0.3, 2) * size
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    inside = np.asarray(mask) > 0
    skin = np.array([200, 160, 140]) + rng.normal(0, 8, 3)
    image = skin + rng.normal(0, 10, (size, size, 3))
    image[inside] = np.array([110, 70, 50]) + rng.normal(0, 15, 3) + rng.normal(0, 10, (inside.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_masks_folder(root: Path, n: int = 20, size: int = 40, seed: int = 0) -> Path:
    """ISIC 2018 Task 1 layout: X.jpg + X_segmentation.png side by side."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = draw_pair(rng, size)
        (root / f"ISIC_{i:07d}.jpg").write_bytes(simplejpeg.encode_jpeg(image, quality=90, colorspace="RGB"))
        mask.save(root / f"ISIC_{i:07d}_segmentation.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """One tiny training through the CLI, shared by the tests that inspect its output."""
    base = tmp_path_factory.mktemp("seg")
    folder = make_masks_folder(base / "masks", n=24)
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = base / "artifacts"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only spins, worse on a busy machine
    try:
        result = CliRunner().invoke(
            app, ["train-seg", str(folder), "--artifacts", str(out), "--config", str(config), "--no-progress"]
        )
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "held-out Dice" in result.output
    yield folder, config, out


def test_training_beats_trivial_masks_and_writes_artifacts(trained: tuple[Path, Path, Path]) -> None:
    folder, _, out = trained
    files = ArtifactPaths(out).segmenter
    for path in (files.weights, files.metrics, files.config, files.done):
        assert path.is_file(), path
    metrics = read_json(files.metrics)
    assert metrics["encoder"] == "mobilenetv3_small_050"
    assert (metrics["n_train"], metrics["n_val"]) == (18, 6)
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, 7))
    assert set(metrics["epochs"][0]) >= {"epoch", "train_loss", "val_dice", "val_iou"}
    assert metrics["dice"] == max(e["val_dice"] for e in metrics["epochs"])

    # the trivial baseline: predict the whole crop as lesion
    pairs = find_pairs(folder)
    _, val_idx = split_indices(len(pairs), TINY["val_fraction"], seed=0)
    truth = [np.asarray(Image.open(pairs[i][2]).resize((32, 32))) > 127 for i in val_idx]
    truth_t = torch.from_numpy(np.stack(truth))[:, None]
    trivial_dice, _ = dice_iou(torch.ones_like(truth_t), truth_t)
    assert metrics["dice"] > float(trivial_dice.mean()) + 0.3
    assert metrics["dice"] > 0.75 and metrics["iou"] > 0.6

    # the saved best weights reproduce the reported held-out Dice
    seg = load_segmenter(files.weights)
    images = [np.asarray(Image.open(pairs[i][1]).resize((32, 32), Image.BILINEAR)) for i in val_idx]
    pred = torch.from_numpy(predict_masks(seg, np.stack(images)) > 0.5)[:, None]
    dice, _ = dice_iou(pred, truth_t)
    assert float(dice.mean()) == pytest.approx(metrics["dice"], abs=0.05)


def test_rerun_skips_and_other_config_is_refused(trained: tuple[Path, Path, Path]) -> None:
    folder, config, out = trained
    files = ArtifactPaths(out).segmenter
    stamp = files.weights.stat().st_mtime_ns
    cfg = load_config(SegConfig, config)
    assert train_segmenter(folder, out, cfg, progress=False) == read_json(files.metrics)
    assert files.weights.stat().st_mtime_ns == stamp  # not retrained
    runtime_only = load_config(SegConfig, config, cpu_threads=2, load_workers=1)  # same segmenter
    assert train_segmenter(folder, out, runtime_only, progress=False)["dice"] == read_json(files.metrics)["dice"]
    with pytest.raises(ConfigError, match="epochs"):
        train_segmenter(folder, out, load_config(SegConfig, config, epochs=7), progress=False)


def test_same_config_on_other_masks_is_refused(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, config, out = trained
    other = make_masks_folder(tmp_path / "other", n=24, seed=1)
    with pytest.raises(ConfigError, match="masks"):
        train_segmenter(other, out, load_config(SegConfig, config), progress=False)


def test_missing_mask_names_the_image(tmp_path: Path) -> None:
    folder = make_masks_folder(tmp_path / "m", n=3, size=24)
    (folder / "ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(MaskDataError, match="ISIC_0000001.jpg"):
        train_segmenter(folder, tmp_path / "out", load_config(SegConfig, None, **TINY), progress=False)
    assert not (tmp_path / "out" / "segmenter" / "DONE").exists()


def test_mask_without_image_is_named(tmp_path: Path) -> None:
    folder = make_masks_folder(tmp_path / "m", n=3, size=24)
    (folder / "ISIC_0000002.jpg").unlink()
    with pytest.raises(MaskDataError, match="ISIC_0000002_segmentation.png"):
        find_pairs(folder)


def test_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    folder = make_masks_folder(tmp_path / "m", n=3, size=24)
    Image.new("L", (20, 24)).save(folder / "ISIC_0000000_segmentation.png")
    with pytest.raises(MaskDataError, match=r"ISIC_0000000_segmentation.png: mask is 20x24 .* 24x24"):
        train_segmenter(folder, tmp_path / "out", load_config(SegConfig, None, **TINY), progress=False)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    folder = make_masks_folder(tmp_path / "m", n=1, size=24)
    image = folder / "ISIC_0000000.jpg"
    data = bytearray(image.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = (16384).to_bytes(2, "big") * 2  # 16,384 x 16,384: 268 megapixels
    image.write_bytes(bytes(data))
    with pytest.raises(MaskDataError, match=r"ISIC_0000000.jpg: 16384x16384 px is above .* bomb"):
        load_pair(image, folder / "ISIC_0000000_segmentation.png", 32)


def test_real_isic2018_layout_pairs_across_folders(tmp_path: Path) -> None:
    make_masks_folder(tmp_path / "ISIC2018_Task1-2_Training_Input", n=4, size=24)
    truth = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    truth.mkdir()
    for mask in sorted((tmp_path / "ISIC2018_Task1-2_Training_Input").glob("*_segmentation.png")):
        mask.rename(truth / mask.name)
    (tmp_path / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    pairs = find_pairs(tmp_path)
    assert [name for name, _, _ in pairs] == [f"ISIC_{i:07d}" for i in range(4)]
    assert all(m.parent == truth and i.stem == n for n, i, m in pairs)


def test_split_is_seeded_and_disjoint() -> None:
    train, val = split_indices(20, 0.2, seed=3)
    assert len(val) == 4 and not set(train) & set(val) and len(train) + len(val) == 20
    again = split_indices(20, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    with pytest.raises(MaskDataError):
        split_indices(1, 0.2, seed=0)


def test_augmentation_moves_image_and_mask_together() -> None:
    rng = np.random.default_rng(1)
    _, mask = draw_pair(rng, 32)
    m = torch.from_numpy(np.asarray(mask) > 0).to(torch.uint8)[None, None].repeat(4, 1, 1, 1)
    images = (m * 255).repeat(1, 3, 1, 1)  # the image is the mask, so they must stay equal
    cfg = AugmentConfig(rotate_deg=180, brightness=0, contrast=0, saturation=0, channel_gain=0)
    x, target = augment_pair(images, m, cfg, torch.Generator().manual_seed(0))
    red = x[:, :1] * 0.229 + 0.485  # undo the ImageNet normalisation of the red channel
    assert torch.allclose(red, target, atol=1e-4)
    assert not torch.equal(target, m.float())  # the geometry did change


def test_dice_iou_values() -> None:
    pred = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    truth = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    pred[0, :, :2], truth[0, :, :2] = True, True  # perfect
    pred[1, :, :2], truth[1, :, 1:3] = True, True  # half overlap: dice 0.5, iou 1/3
    dice, iou = dice_iou(pred, truth)  # image 2: both empty -> 1
    assert dice.tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert iou.tolist() == pytest.approx([1.0, 1 / 3, 1.0])
