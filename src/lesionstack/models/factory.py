"""One factory from a config to a network, and the optimiser's parameter groups."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lesionstack.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveInt, Probability, check_fields
from lesionstack.models.classifier import build_classifier
from lesionstack.models.gated import GatedClassifier
from lesionstack.models.segmenter import (
    DEFAULT_DECODER_CHANNELS,
    build_segmenter,
    import_timm,
    segmenter_decoder_channels,
)


@dataclass
class ModelConfig:
    """The network of the CNN stage. Weights come only from local files; the default is random init.

    classifier: any timm model name (resnet50, efficientnet_b0, densenet121, mobilenetv3_small_100,
        edgenext_xx_small...).
    segmenter_encoder: any timm backbone that supports `features_only=True`.
    gate: "train" (segmenter trains at lr * segmenter_lr_scale), "freeze" (segmenter fixed), "none"
        (plain classifier, no segmenter). See `lesionstack.models.gated` for the exact gating.
    classifier_weights: a local timm weights file (.pth/.bin/.safetensors) for the classifier; loaded with
        `pretrained_cfg_overlay=dict(file=...)`; its classifier head is dropped (num_classes=1).
    segmenter_weights: a lesionstack segmenter checkpoint (`model.pt` from train-seg, with its config.yaml
        beside it) or a local timm weights file for the segmenter's encoder. Set it with `with_segmenter`.
    segmenter_decoder_channels: the U-Net decoder's widths; None means the default (or the checkpoint's).
        `with_segmenter` copies a checkpoint's, so a fold model rebuilds without the segmenter file.
    head_init: "timm" keeps timm's init of the output layer; "small" redraws it N(0, 0.01), bias 0, so every
        model starts at logits near 0. timm's TensorFlow-style init of MobileNet/EfficientNet scales the output
        Linear by 1/sqrt(its fan-out), which for one logit is U(-1, 1) over ~1,000 features: at random init
        mobilenetv3_small_100 starts at logits of std ~3 (mobilenetv4_conv_small ~11) and train losses > 1.
    aux_outputs: extra head outputs after the main ones, trained by an auxiliary loss and never scored
        (`forward(x)` drops them); the CNN stage sets it from its `aux_diagnosis` section, so a saved
        fold config rebuilds the head it was trained with.
    """

    classifier: str = "resnet18"
    segmenter_encoder: str = "resnet18"
    gate: Literal["train", "freeze", "none"] = "train"
    segmenter_lr_scale: NonNegativeFloat = 0.1
    classifier_weights: str | None = None
    segmenter_weights: str | None = None
    drop_rate: Probability = 0.0
    drop_path_rate: Probability | None = None
    segmenter_decoder_channels: tuple[PositiveInt, ...] | None = None
    head_init: Literal["timm", "small"] = "timm"
    aux_outputs: NonNegativeInt = 0

    def __post_init__(self) -> None:
        check_fields(self)


def check_model_names(cfg: ModelConfig, where: str, key: str = "model") -> None:
    """Refuse a timm model name that timm does not know (`where`: the config file), before anything trains:
    a typo would otherwise surface in a fold worker as timm's traceback."""
    timm = import_timm()
    names = [("classifier", cfg.classifier)] + ([("segmenter_encoder", cfg.segmenter_encoder)]
                                                if cfg.gate != "none" else [])
    for field_name, name in names:
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ConfigError(f"{where}: {key}.{field_name}: expected a timm model name, got {name!r}{hint}")


def with_segmenter(cfg: ModelConfig, weights: str | os.PathLike[str]) -> ModelConfig:
    """`cfg` initialising its segmenter from `weights`; a train-seg checkpoint also brings its decoder."""
    channels = segmenter_decoder_channels(weights)
    if channels is None or tuple(channels) == DEFAULT_DECODER_CHANNELS:  # None already means the default
        return dataclasses.replace(cfg, segmenter_weights=os.fspath(weights))
    return dataclasses.replace(cfg, segmenter_weights=os.fspath(weights), segmenter_decoder_channels=tuple(channels))


def build_model(cfg: ModelConfig, num_classes: int = 1) -> GatedClassifier:
    """(B, 3, H, W) ImageNet-normalised float -> (B,) logits, or (B, K) with `num_classes` K > 1 (diagnosis);
    `model.forward_with_mask(x)` also gives the mask. The head has `num_classes + cfg.aux_outputs` outputs;
    `model(x, aux=True)` returns all of them."""
    if cfg.gate == "none":
        segmenter = None
        in_chans = 3
    else:
        segmenter = build_segmenter(cfg.segmenter_encoder, cfg.segmenter_weights, cfg.segmenter_decoder_channels)
        in_chans = 4
    classifier = build_classifier(
        cfg.classifier,
        in_chans=in_chans,
        weights=cfg.classifier_weights,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        num_classes=num_classes + cfg.aux_outputs,
    )
    if cfg.head_init == "small":
        small_head(classifier)
    return GatedClassifier(classifier, segmenter, cfg.gate, cfg.segmenter_lr_scale, cfg.aux_outputs)


@torch.no_grad()
def small_head(classifier: nn.Module, std: float = 0.01) -> None:
    """Redraw the timm model's output layer N(0, std), bias 0 (see ModelConfig.head_init)."""
    head = classifier.get_classifier() if hasattr(classifier, "get_classifier") else None
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"model.head_init small: {type(classifier).__name__} has no Linear/Conv output layer "
                         f"(get_classifier() gave {type(head).__name__})")
    nn.init.normal_(head.weight, 0.0, std)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: segmenter parameters at lr * segmenter_lr_scale (none when frozen), the rest at lr.

    Biases and normalisation weights (1-D tensors) get no weight decay. Each group carries a "name" key.
    Works on the bare model or on one wrapped by DistributedDataParallel (`module.` prefix).
    """
    bare = model.module if hasattr(model, "module") else model
    scale = float(getattr(bare, "segmenter_lr_scale", 1.0))
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in bare.named_parameters():
        if not p.requires_grad:
            continue
        part = "segmenter" if name.startswith("segmenter.") else "classifier"
        buckets.setdefault((part, p.ndim > 1), []).append(p)
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        groups.append(
            {
                "name": part if decay else f"{part}_no_decay",
                "params": params,
                "lr": lr * (scale if part == "segmenter" else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    return groups
