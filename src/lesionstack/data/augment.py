"""Batched image augmentation on tensors: one `affine_grid`/`grid_sample` per batch plus colour jitter.

Augmenting the whole batch at once, on the device that trains, keeps the data path cheap: DataLoader
workers only read, decode and resize, and the random geometry and colour of 64 crops cost one grid sample
(a few milliseconds on CPU, nothing on a GPU). The one exception is the phone-photo degradation
(`PhoneConfig`), which must see the crop as stored: the workers apply it (`data.dataset.PhoneCropDataset`).
Random draws come from a CPU `torch.Generator`, so a seed gives the same augmentation on every device, and
a resumed epoch repeats the interrupted one exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from lesionstack.config import (
    Invalid,
    NonNegativeFloat,
    PositiveFloat,
    Probability,
    Range,
    check_fields,
)

Quality = Annotated[int, Range(ge=1, le=100)]  # JPEG quality
SideFraction = Annotated[float, Range(gt=0, le=1)]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PhoneConfig:
    """A phone photo of a lesion instead of a total-body-photography crop: a small sensor's blur and noise,
    auto white balance, a low-resolution capture upscaled, and a messenger app's JPEG. Each crop draws its
    own strength uniformly from every range."""

    p: Probability = 0.0  # training: probability per crop (0: off); `phone_copy` degrades every crop
    downscale: tuple[SideFraction, SideFraction] = (0.25, 0.6)  # captured at this fraction of the side, then upscaled
    jpeg_quality: tuple[Quality, Quality] = (30, 70)
    blur_sigma: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 1.2)  # Gaussian, in pixels of the crop as stored
    noise_std: tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 0.04)  # additive Gaussian, intensities in [0, 1]
    white_balance: Probability = 0.15  # per-channel gain in [1 - w, 1 + w]

    def __post_init__(self) -> None:
        check_fields(self)
        for key in ("downscale", "jpeg_quality", "blur_sigma", "noise_std"):
            low, high = getattr(self, key)
            if low > high:
                raise Invalid(key, "a range [low, high] with low <= high", [low, high])


@dataclass
class AugmentConfig:
    """Per-sample random transforms; set `enabled: false` to train on plain resized crops."""

    enabled: bool = True
    hflip: Probability = 0.5  # probability
    vflip: Probability = 0.5  # probability (a lesion has no "up" on the skin)
    rotate_deg: Annotated[float, Range(ge=0, le=180)] = 180.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[PositiveFloat, PositiveFloat] = (0.85, 1.2)  # zoom factor range (> 1 zooms in)
    shift: Probability = 0.08  # translation, fraction of the image side
    brightness: Probability = 0.2  # multiply by uniform [1 - b, 1 + b]
    contrast: Probability = 0.2  # around the image mean
    saturation: Probability = 0.2  # blend with the grey image
    channel_gain: Probability = 0.05  # per-channel gain: camera white balance
    # phone-photo degradation (off by default), applied by the training dataset at the crop's own resolution
    # (`data.dataset.PhoneCropDataset`), not here to the resized batch
    phone: PhoneConfig = field(default_factory=PhoneConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.scale[0] > self.scale[1]:
            raise Invalid("scale", "a range [low, high] with low <= high", list(self.scale))


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
    return augment_with_masks(images, None, cfg, gen)[0]


def augment_with_masks(images: torch.Tensor, masks: torch.Tensor | None, cfg: AugmentConfig,
                       gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`augment_batch` of the images, and the same flips, rotation, zoom and shift of their (B, 1, H, W) masks
    (colour jitter is the image's alone): a mask made once of the plain crop follows its crop's geometry. The
    images' augmentation, random draws included, is `augment_batch`'s exactly."""
    if not cfg.enabled:
        return images, masks
    theta = affine_matrices(images.shape[0], cfg, gen).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return colour_jitter(images, cfg, gen), masks


def phone_degrade(images: torch.Tensor, cfg: PhoneConfig, gen: torch.Generator | None = None,
                  p: float | None = None) -> torch.Tensor:
    """Degrade each float (B, 3, H, W) image in [0, 1] like a phone photo with probability `p` (default
    `cfg.p`): white balance, blur, capture at a lower resolution with sensor noise, JPEG at that size, then
    upscaling back to (H, W). The JPEG round trip runs on the CPU, one image at a time."""
    n = images.shape[0]
    chosen = torch.rand(n, generator=gen) < (cfg.p if p is None else p)
    out = images.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        out[i] = _phone_one(images[i], cfg, gen)
    return out


def _phone_one(image: torch.Tensor, cfg: PhoneConfig, gen: torch.Generator | None) -> torch.Tensor:
    _, h, w = image.shape
    gain = _uniform(3, 1.0 - cfg.white_balance, 1.0 + cfg.white_balance, gen).view(3, 1, 1)
    x = gaussian_blur((image * gain.to(image)).clamp(0.0, 1.0), float(_uniform(1, *cfg.blur_sigma, gen)))
    frac = float(_uniform(1, *cfg.downscale, gen))
    small = (max(8, round(h * frac)), max(8, round(w * frac)))
    x = F.interpolate(x[None], size=small, mode="area")[0]
    x = x + torch.randn(x.shape, generator=gen).to(x) * float(_uniform(1, *cfg.noise_std, gen))
    quality = int(torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (1,), generator=gen))
    x = jpeg_round_trip(x.clamp(0.0, 1.0), quality)
    return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0.0, 1.0)


def degrade_crop(image: np.ndarray, cfg: PhoneConfig, seed: Sequence[int]) -> np.ndarray:
    """One (H, W, 3) uint8 crop degraded like a phone photo (always), from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    x = to_float(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None])
    y = phone_degrade(x, cfg, gen, p=1.0)[0]
    return np.ascontiguousarray((y.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (3, H, W) image blurred by a separable Gaussian (reflected borders); sigma < 0.1 returns it."""
    if sigma < 0.1:
        return image
    radius = min(max(1, math.ceil(2.5 * sigma)), min(image.shape[1:]) - 1)  # reflection needs radius < side
    if radius < 1:
        return image
    t = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1).expand(3, 1, -1)
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.unsqueeze(2), groups=3)
    return F.conv2d(x, k.unsqueeze(3), groups=3)[0]


def jpeg_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode a (3, H, W) float image in [0, 1] as JPEG at `quality` and decode it again."""
    import simplejpeg  # here, not at the top: prediction imports this module and may run without it

    array = (image.detach().cpu().permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    decoded = simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(np.ascontiguousarray(array), quality=quality))
    return torch.from_numpy(decoded.astype(np.float32) / 255.0).permute(2, 0, 1).to(image)
