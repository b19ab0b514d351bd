"""What the page shows beside the probability: Grad-CAM on the classifier, the lesion mask outlined on the
photo, and where a score ranks among the training set's out-of-fold scores."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter
from torch import nn

from lesionstack.data.schema import ID_COLUMN
from lesionstack.paths import ArtifactPaths

OUTLINE_RGB = (255, 230, 0)  # yellow: visible on skin and on dark lesions alike
# Grad-CAM is drawn only from a map of at least this many cells a side: a 1 x 1 map (a 32-px input to a
# stride-32 network) upsamples to one colour over the whole photo, which shows nothing about where
MIN_CAM_CELLS = 4


# ---- Grad-CAM -----------------------------------------------------------------------------------------


def classifier_of(model: nn.Module) -> nn.Module:
    """The timm classifier inside a GatedClassifier (or the model itself)."""
    return getattr(model, "classifier", model)


def cam_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classifier's last feature stage (timm's `feature_info[-1]`, e.g. `layer4` of a ResNet, `stages.3`
    of a ConvNeXt): the deepest layer that still has a spatial map. None when timm does not name one."""
    clf = classifier_of(model)
    info = getattr(clf, "feature_info", None)
    if not info:
        return None
    name = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
    try:
        return name, clf.get_submodule(name)
    except AttributeError:
        return None


def layer_description(model: nn.Module) -> str | None:
    found = cam_layer(model)
    if found is None:
        return None
    arch = getattr(classifier_of(model), "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return f"{arch}: classifier.{found[0]} (last feature stage)"


def gradcam(models: list[nn.Module], x: torch.Tensor) -> tuple[np.ndarray | None, str | None]:
    """Grad-CAM of the malignancy logit, averaged over the fold models: ((B, S, S) in [0, 1], None), or
    (None, why there is none): no named feature stage, no spatial map, or a map under 4 x 4 cells.

    Per model: activations A of the CAM layer, weights = spatial mean of d logit / d A, map =
    ReLU(sum_c w_c A_c), upsampled to the input size and scaled to a maximum of 1.
    """
    maps = []
    for model in models:
        found = cam_layer(model)
        if found is None:
            return None, "No Grad-CAM: timm names no last feature stage for this architecture."
        captured: list[torch.Tensor] = []
        handle = found[1].register_forward_hook(lambda _m, _i, out, sink=captured: sink.append(out))
        try:
            with torch.enable_grad():
                logits = model(x.detach().clone().requires_grad_(True))
                acts = captured[-1]
                if acts.ndim != 4:  # token output (a ViT): no spatial map to weight
                    return None, "No Grad-CAM: the last feature stage of this architecture has no spatial map."
                if min(acts.shape[-2:]) < MIN_CAM_CELLS:
                    return None, too_coarse(tuple(acts.shape[-2:]), int(x.shape[-1]))
                grads = torch.autograd.grad(logits.float().sum(), acts)[0]
        finally:
            handle.remove()
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * acts).sum(dim=1, keepdim=True)).detach().float()
        cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        maps.append((cam / peak).cpu().numpy())
    return np.mean(maps, axis=0), None


def too_coarse(cells: tuple[int, ...], size: int) -> str:
    """Why a map of `cells` at `size` px input gives no Grad-CAM, and what input size would."""
    need = -(-size * MIN_CAM_CELLS // min(cells))
    return (f"No Grad-CAM: at this model's {size} px input the classifier's last feature map is "
            f"{cells[0]} x {cells[1]} cell(s), so a heatmap would be one colour over the whole photo; it needs at "
            f"least {MIN_CAM_CELLS} x {MIN_CAM_CELLS} cells (an input of about {need} px or more for this network).")


# ---- pictures -----------------------------------------------------------------------------------------


def display_copy(rgb: np.ndarray, long_side: int = 384) -> Image.Image:
    """The photo scaled to `long_side` px on its long side, for drawing on: a 12-megapixel photo shrinks,
    a 130-px crop grows (so the outline stays thin against the lesion)."""
    img = Image.fromarray(rgb)
    scale = long_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def _resized(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


def outline(photo: Image.Image, mask: np.ndarray, threshold: float = 0.5) -> Image.Image:
    """The photo with the border of `mask > threshold` drawn on it (mask: any size, stretched to the photo)."""
    inside = Image.fromarray(((_resized(mask, photo.size) > threshold) * 255).astype(np.uint8))
    width = max(3, round(max(photo.size) / 160) | 1)  # odd filter size, thicker on bigger pictures
    border = np.asarray(inside.filter(ImageFilter.MaxFilter(width))).astype(bool) & ~np.asarray(
        inside.filter(ImageFilter.MinFilter(3))).astype(bool)
    out = np.array(photo.convert("RGB"))
    out[border] = OUTLINE_RGB
    return Image.fromarray(out)


def heatmap(photo: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The Grad-CAM map in the 'jet' colours over a grey copy of the photo."""
    from matplotlib import colormaps

    values = np.clip(_resized(cam, photo.size), 0, 1)
    colours = colormaps["jet"](values)[..., :3] * 255
    grey = np.asarray(photo.convert("L").convert("RGB")).astype(np.float64)
    return Image.fromarray(((1 - alpha) * grey + alpha * colours).astype(np.uint8))


def jpeg_data_url(img: Image.Image, quality: int = 90) -> str:
    """The picture inline in the JSON answer (JPEG: a tenth of PNG's encoding time for a photo)."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- ranks among the training set ---------------------------------------------------------------------


@dataclass
class Reference:
    """The out-of-fold CNN scores of the training set, split by label: what a new score is ranked against.
    Out-of-fold, so each lesion was scored by a model that never saw it, like an uploaded photo."""

    benign: np.ndarray  # sorted
    malignant: np.ndarray  # sorted

    @classmethod
    def load(cls, artifacts: ArtifactPaths, oof_path: Path | None = None) -> Reference | None:
        """From the run's oof_cnn.parquet, or `oof_path` (a served student ranks against its own OOF scores)."""
        oof_path = oof_path or artifacts.oof_cnn
        if not (oof_path.is_file() and artifacts.folds.is_file()):
            return None
        oof = pd.read_parquet(oof_path, columns=[ID_COLUMN, "score"])
        labels = pd.read_csv(artifacts.folds, usecols=[ID_COLUMN, "target"], dtype={ID_COLUMN: str})
        merged = oof.merge(labels, on=ID_COLUMN).dropna(subset=["score"])
        return cls(np.sort(merged.loc[merged["target"] == 0, "score"].to_numpy()),
                   np.sort(merged.loc[merged["target"] == 1, "score"].to_numpy()))

    def rank(self, score: float) -> dict[str, float | int]:
        """Percent of benign and of malignant training lesions scored lower than `score` (ties half)."""
        def below(values: np.ndarray) -> float:
            if len(values) == 0:
                return float("nan")
            lower = np.searchsorted(values, score, side="left")
            upper = np.searchsorted(values, score, side="right")
            return float(100.0 * (lower + 0.5 * (upper - lower)) / len(values))

        return {"benign_percentile": below(self.benign), "malignant_percentile": below(self.malignant),
                "n_benign": int(len(self.benign)), "n_malignant": int(len(self.malignant))}
