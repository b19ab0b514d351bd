"""Stage `train-seg`: train the U-Net lesion segmenter on a masks folder (ISIC 2018 Task 1 layout).

Input: a folder holding `X.jpg` images and `X_segmentation.png` masks, in the same folder or in sibling
subfolders (the real ISIC 2018 download has `..._Training_Input/` and `..._Training_GroundTruth/`); other
files (LICENSE, ATTRIBUTION.txt) are ignored. Every image needs its mask and the other way round.

Training: images and masks resized to `image_size` and held in memory as uint8 (2,594 ISIC 2018 images at
256 px are 0.5 GB); a seeded held-out part; the same random flips/rotation/zoom/shift applied to image and
mask (one `grid_sample` per batch, see `lesionstack.data.augment`), colour jitter on the image only;
loss = BCE + dice_weight * soft Dice; AdamW with a per-step cosine schedule. Dice and IoU are per-image
means at threshold 0.5 on the held-out part (an image whose mask and prediction are both empty scores 1).

Output, under `ArtifactPaths(out).segmenter`: model.pt (best held-out Dice), metrics.json, config.yaml,
inputs.json (a digest of the masks), DONE (written last). A rerun with DONE, the same config and the same
masks skips; a different config or other masks are refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lesionstack.config import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    check_fields,
    runtime,
)
from lesionstack.data.augment import AugmentConfig, affine_matrices, colour_jitter, normalize, to_float
from lesionstack.data.dataset import resize_mask, resize_square
from lesionstack.data.decode import MAX_SOURCE_PIXELS
from lesionstack.files import read_json, write_json, write_text
from lesionstack.models.segmenter import DEFAULT_DECODER_CHANNELS, build_segmenter, save_segmenter
from lesionstack.paths import ArtifactPaths, MaskPaths
from lesionstack.resume import Resume, guard
from lesionstack.runtime import adamw

log = logging.getLogger(__name__)

MASK_SUFFIX = "_segmentation.png"
IMAGE_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class SegmenterResult:
    """What `train-seg` made: the weights, and the held-out scores of the kept epoch."""

    weights: Path
    encoder: str
    decoder_channels: tuple[int, ...]
    dice: float
    iou: float
    best_epoch: int
    n_epochs: int
    n_train: int
    n_val: int
    seconds: float

    def __str__(self) -> str:
        return f"Dice {self.dice:.3f}, IoU {self.iou:.3f} on {self.n_val} held-out masks"


class MaskDataError(ValueError):
    """A masks folder that cannot be trained on; the message names the file."""


@dataclass
class SegConfig:
    """Everything that decides the trained segmenter (saved beside it as config.yaml)."""

    encoder: str = "resnet18"
    encoder_weights: str | None = None  # local timm file, or a segmenter model.pt to fine-tune
    decoder_channels: tuple[PositiveInt, ...] = DEFAULT_DECODER_CHANNELS
    image_size: Annotated[int, Range(ge=16)] = 192
    val_fraction: Fraction = 0.2
    max_images: PositiveInt | None = None  # train on the first N pairs (sorted by name); None: all
    epochs: PositiveInt = 30
    batch_size: Annotated[int, Range(ge=2)] = 16
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    dice_weight: NonNegativeFloat = 1.0  # loss = BCE + dice_weight * (1 - soft Dice)
    seed: int = 0
    load_workers: PositiveInt = runtime(4)  # threads decoding the folder once, before training
    cpu_threads: NonNegativeInt | None = runtime(None)  # torch intra-op threads; None or 0: torch's default
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_fields(self)


# ---------------------------------------------------------------------------------------------- data


def find_pairs(masks_dir: str | os.PathLike[str]) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) for every `X.jpg` + `X_segmentation.png` under `masks_dir`, sorted by name."""
    root = Path(masks_dir)
    if not root.is_dir():
        raise MaskDataError(f"masks folder not found: {root}")
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if path.name.lower().endswith(MASK_SUFFIX):
            _put(masks, path.name[: -len(MASK_SUFFIX)], path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            _put(images, path.stem, path)
    for name, path in images.items():
        if name not in masks:
            raise MaskDataError(f"{path}: no mask {name}{MASK_SUFFIX} for this image under {root}")
    for name, path in masks.items():
        if name not in images:
            raise MaskDataError(f"{path}: no image {name}.jpg for this mask under {root}")
    if not images:
        raise MaskDataError(f"{root}: no X.jpg + X{MASK_SUFFIX} pairs found")
    return [(name, images[name], masks[name]) for name in sorted(images)]


def masks_digest(pairs: list[tuple[str, Path, Path]]) -> str:
    """A fingerprint of the training pairs (names and byte sizes: cheap, and any re-export changes them)."""
    text = "\n".join(f"{name},{img.stat().st_size},{mask.stat().st_size}" for name, img, mask in pairs)
    return hashlib.sha256(text.encode()).hexdigest()


def _put(found: dict[str, Path], name: str, path: Path) -> None:
    if name in found:
        raise MaskDataError(f"{path}: same name as {found[name]}; each lesion may appear once")
    found[name] = path


def load_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 RGB image and (size, size) uint8 {0, 1} mask; errors name the file.

    The image's declared size is held to the project's decoding limit (`data.decode.MAX_SOURCE_PIXELS`)
    before anything is decoded, and the mask must match it before its pixels are read: one hostile
    pair cannot take the loader's memory, while ISIC 2018's largest pairs (about 30 megapixels) load."""
    data = image_path.read_bytes()
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError) as err:
        raise MaskDataError(f"{image_path}: cannot decode JPEG: {err}") from err
    if width * height > MAX_SOURCE_PIXELS:
        raise MaskDataError(f"{image_path}: {width}x{height} px is above the {MAX_SOURCE_PIXELS:,}-pixel limit "
                            "for one image (a decompression bomb?); refused")
    try:
        # libjpeg's DCT scaling decodes a large photo straight at close to the size we need
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
    except (ValueError, RuntimeError) as err:
        raise MaskDataError(f"{image_path}: cannot decode JPEG: {err}") from err
    try:
        with Image.open(io.BytesIO(mask_path.read_bytes())) as im:  # lazy: reads the header only
            mask_size = im.size
            mask_img = im.convert("L") if mask_size == (width, height) else None
    except (OSError, Image.DecompressionBombError) as err:
        raise MaskDataError(f"{mask_path}: cannot read mask PNG: {err}") from err
    if mask_size != (width, height):
        raise MaskDataError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                            f"{image_path.name} is {width}x{height}")
    image = resize_square(rgb, size)
    mask = resize_mask(np.asarray(mask_img), size)
    return image, mask.astype(np.uint8)


def load_folder(
    pairs: list[tuple[str, Path, Path]], size: int, workers: int = 4, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs as uint8 tensors: images (N, 3, S, S), masks (N, 1, S, S)."""

    def one(pair: tuple[str, Path, Path]) -> tuple[np.ndarray, np.ndarray]:
        return load_pair(pair[1], pair[2], size)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # simplejpeg and Pillow release the GIL
        loaded = list(tqdm(pool.map(one, pairs), total=len(pairs), desc="load masks", disable=not progress))
    images = torch.from_numpy(np.stack([im for im, _ in loaded])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([m for _, m in loaded]))[:, None]
    return images, masks


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) split; at least one image on each side."""
    if n < 2:
        raise MaskDataError(f"need at least 2 image/mask pairs to hold one out, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# -------------------------------------------------------------------------------------------- training


def augment_pair(
    images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> (normalised float images, float masks in [0, 1]); one geometry for both."""
    x, m = to_float(images), masks.float()
    if cfg.enabled:
        theta = affine_matrices(x.shape[0], cfg, gen)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        m = F.grid_sample(m, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = colour_jitter(x, cfg, gen)
    return normalize(x), m


def seg_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE + dice_weight * (1 - soft Dice), Dice per image then averaged."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return bce + dice_weight * (1.0 - dice.mean())


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of boolean masks (N, 1, H, W); both empty counts as a perfect 1."""
    p, t = pred.flatten(1).float(), target.flatten(1).float()
    inter = (p * t).sum(1)
    total = p.sum(1) + t.sum(1)
    union = total - inter
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return dice, iou


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean per-image Dice and IoU at threshold 0.5."""
    model.eval()
    dices, ious = [], []
    for i in range(0, len(images), batch_size):
        logits = model(normalize(to_float(images[i : i + batch_size])))
        d, j = dice_iou(logits > 0, masks[i : i + batch_size] > 0)
        dices.append(d)
        ious.append(j)
    return float(torch.cat(dices).mean()), float(torch.cat(ious).mean())


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    stop = n - n % batch_size if n > batch_size else n  # drop a ragged last batch (BatchNorm on 1 image)
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def train_segmenter(
    masks_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: SegConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on `masks_dir`, write the artifacts under `ArtifactPaths(out).segmenter`, return metrics."""
    cfg = cfg or SegConfig()
    files = ArtifactPaths(out).segmenter
    if files.done.exists() and not Path(masks_dir).is_dir():
        guard(files, cfg, None, partial=())  # the config is still checked
        log.warning("%s: masks folder %s is gone; reusing the trained segmenter unchecked", files.dir, masks_dir)
        return read_json(files.metrics)
    pairs = find_pairs(masks_dir)[: cfg.max_images]
    inputs = {"masks": masks_digest(pairs), "n_pairs": len(pairs)}
    # no checkpoint: an unfinished segmenter restarts; a finished one is reused only for the same config
    # and masks (the same config on other masks is another segmenter)
    if guard(files, cfg, inputs, partial=()) is Resume.SKIP:
        log.info("%s: segmenter already trained with this config and masks; skipping", files.dir)
        return read_json(files.metrics)
    images, masks = load_folder(pairs, cfg.image_size, cfg.load_workers, progress)
    train_idx, val_idx = split_indices(len(pairs), cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.encoder, cfg.encoder_weights, cfg.decoder_channels)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads or threads)
    try:
        epochs = _fit(model, images, masks, train_idx, val_idx, cfg, files.weights, progress)
    finally:
        torch.set_num_threads(threads)
    best = max(epochs, key=lambda e: e["val_dice"])
    metrics = {
        "dice": best["val_dice"],
        "iou": best["val_iou"],
        "best_epoch": best["epoch"],
        "epochs": epochs,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "encoder": cfg.encoder,
        "image_size": cfg.image_size,
        "seconds": round(sum(e["seconds"] for e in epochs), 1),
    }
    write_json(files.metrics, metrics)
    write_text(files.done, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return metrics


def _fit(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: SegConfig,
    weights_path: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    """The epoch loop; saves the weights whenever held-out Dice improves; returns per-epoch metrics."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    steps = cfg.epochs * len(_batches(len(train_idx), cfg.batch_size, torch.Generator()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    tr_img, tr_mask = images[train_idx], masks[train_idx]
    va_img, va_mask = images[val_idx], masks[val_idx]
    epochs: list[dict[str, Any]] = []
    best = -1.0
    bar = tqdm(range(1, cfg.epochs + 1), desc="train-seg", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        losses = []
        for idx in _batches(len(tr_img), cfg.batch_size, gen):
            x, m = augment_pair(tr_img[idx], tr_mask[idx], cfg.augment, gen)
            loss = seg_loss(model(x), m, cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        dice, iou = evaluate(model, va_img, va_mask, cfg.batch_size * 2)
        if dice > best:
            best = dice
            save_segmenter(model, weights_path)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_dice": dice,
            "val_iou": iou,
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - start, 2),
        }
        epochs.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", dice=f"{dice:.3f}", iou=f"{iou:.3f}")
    return epochs


def segmenter_stage(data: MaskPaths, art: ArtifactPaths, cfg: SegConfig, *, progress: bool = True) -> SegmenterResult:
    """The `train-seg` stage on the masks folder `data`: train (or reuse, see `train_segmenter`) the segmenter
    under `art.segmenter`."""
    m = train_segmenter(data.root, art.root, cfg, progress=progress)
    return SegmenterResult(art.segmenter.weights, cfg.encoder, tuple(cfg.decoder_channels), m["dice"], m["iou"],
                           m["best_epoch"], len(m["epochs"]), m["n_train"], m["n_val"], m["seconds"])
