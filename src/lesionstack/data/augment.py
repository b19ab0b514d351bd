"""Batched image augmentation on tensors: one `affine_grid`/`grid_sample` per batch plus colour jitter.

Augmenting the whole batch at once, on the device that trains, keeps the data path cheap: DataLoader
workers only read, decode and resize, and the random geometry and colour of 64 crops cost one grid sample
(a few milliseconds on CPU, nothing on a GPU). Random draws come from a CPU `torch.Generator`, so a seed
gives the same augmentation on every device, and a resumed epoch repeats the interrupted one exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Per-sample random transforms; set `enabled: false` to train on plain resized crops."""

    enabled: bool = True
    hflip: float = 0.5  # probability
    vflip: float = 0.5  # probability (a lesion has no "up" on the skin)
    rotate_deg: float = 180.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.85, 1.2)  # zoom factor range (> 1 zooms in)
    shift: float = 0.08  # translation, fraction of the image side
    brightness: float = 0.2  # multiply by uniform [1 - b, 1 + b]
    contrast: float = 0.2  # around the image mean
    saturation: float = 0.2  # blend with the grey image
    channel_gain: float = 0.05  # per-channel gain: camera white balance


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [0, 1] (keeps the device)."""
    return images.float().div_(255.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of float images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def affine_matrices(n: int, cfg: AugmentConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input coordinates (the convention of `affine_grid`)."""
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen) * (math.pi / 180.0)
    zoom = _uniform(n, cfg.scale[0], cfg.scale[1], gen)
    shift = _uniform(2 * n, -cfg.shift, cfg.shift, gen).view(n, 2) * 2.0  # grid units span [-1, 1]
    flip_x = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=gen) < cfg.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # zoom in = sample a smaller input area
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    theta[:, :, 2] = shift
    return theta


def colour_jitter(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation and channel-gain jitter of float images in [0, 1]."""
    n = images.shape[0]

    def draw(width: float, size: int = n) -> torch.Tensor:
        return _uniform(size, 1.0 - width, 1.0 + width, gen).to(images.device, images.dtype)

    bright = draw(cfg.brightness).view(n, 1, 1, 1)
    contrast = draw(cfg.contrast).view(n, 1, 1, 1)
    sat = draw(cfg.saturation).view(n, 1, 1, 1)
    gain = draw(cfg.channel_gain, 3 * n).view(n, 3, 1, 1)
    weights = torch.tensor((0.299, 0.587, 0.114), device=images.device, dtype=images.dtype)
    grey = (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    images = grey + (images - grey) * sat
    mean = grey.mean(dim=(2, 3), keepdim=True)
    images = (images - mean) * contrast + mean
    return (images * bright * gain).clamp_(0.0, 1.0)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random flips, rotation, zoom, shift and colour jitter of float (B, 3, H, W) images in [0, 1].

    Borders are filled by reflection, which on a skin crop looks like more skin.
    """
    if not cfg.enabled:
        return images
    theta = affine_matrices(images.shape[0], cfg, gen).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return colour_jitter(images, cfg, gen)
