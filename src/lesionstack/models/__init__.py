"""Networks: the U-Net lesion segmenter, the timm classifier, and the gated model that joins them.

    from lesionstack.models import ModelConfig, build_model, param_groups
    model = build_model(ModelConfig(classifier="efficientnet_b0", gate="train"))
    logits, mask = model.forward_with_mask(x)   # x: (B, 3, H, W) ImageNet-normalised

Importing this package does not import timm; building a model does (offline, local weights only).
"""

from lesionstack.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lesionstack.models.classifier import build_classifier
from lesionstack.models.ensemble import SeedEnsemble, ensemble_members
from lesionstack.models.factory import ModelConfig, build_model, check_model_names, param_groups, with_segmenter
from lesionstack.models.gated import GATES, GatedClassifier
from lesionstack.models.segmenter import (
    DEFAULT_DECODER_CHANNELS,
    UNetSegmenter,
    WeightsError,
    build_segmenter,
    is_segmenter_checkpoint,
    load_segmenter,
    normalize_uint8,
    predict_masks,
    save_segmenter,
)

__all__ = [
    "DEFAULT_DECODER_CHANNELS",
    "GATES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GatedClassifier",
    "ModelConfig",
    "SeedEnsemble",
    "UNetSegmenter",
    "WeightsError",
    "build_classifier",
    "build_model",
    "build_segmenter",
    "ensemble_members",
    "is_segmenter_checkpoint",
    "load_segmenter",
    "normalize_uint8",
    "param_groups",
    "predict_masks",
    "save_segmenter",
    "with_segmenter",
    "check_model_names",
]
