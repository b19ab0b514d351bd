"""The crop montage: the highest-scoring positives and negatives and the worst misses, each crop with the
segmenter's predicted lesion outline drawn on it (when segmenter weights exist)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionstack.report.figures import new_figure, save_png

GROUPS = {
    "top_pos": "Highest-scoring positives (cancers found)",
    "top_neg": "Highest-scoring negatives (false alarms)",
    "misses": "Worst misses (positives with the lowest scores)",
}
MASK_COLOR = "#ffd400"


def pick_crops(oof: pd.DataFrame, per_group: int) -> dict[str, pd.DataFrame]:
    """The rows to show, by blend score. Misses come from the positives not already shown as top hits."""
    pos = oof[oof["target"] == 1].sort_values("score", ascending=False)
    neg = oof[oof["target"] == 0].sort_values("score", ascending=False)
    return {
        "top_pos": pos.head(per_group),
        "top_neg": neg.head(per_group),
        "misses": pos.iloc[per_group:].sort_values("score").head(per_group),
    }


CROP_SIDE = 256  # the largest side a montage crop is decoded at (the real crops: 60 to 240 px)


def load_crops(images_path: Path, ids: list[str], notes: list[str]) -> dict[str, np.ndarray]:
    """Decode the crops of `ids` from the training HDF5; unreadable ones are skipped with a note."""
    from lesionstack.data.hdf5 import CorruptImageError, H5Images

    crops: dict[str, np.ndarray] = {}
    with H5Images(images_path) as h5:
        for isic_id in ids:
            if isic_id not in h5:
                notes.append(f"{images_path}: no image {isic_id!r}; left out of the montage.")
                continue
            try:
                # a panel is ~190 px wide: an oversized crop is decoded at a reduced scale, never in full
                crops[isic_id] = h5.read(isic_id, max_side=CROP_SIDE)
            except CorruptImageError as err:
                notes.append(f"Montage: {err}")
    return crops


def predict_lesion_masks(weights: Path, crops: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """Soft masks from the trained segmenter; on any failure a note and no masks (crops shown bare)."""
    if not weights.exists():
        notes.append(f"No segmenter weights at {weights}: crops are shown without a predicted mask.")
        return {}
    if not crops:
        return {}
    try:
        from lesionstack._compat import ensure_timm_importable

        ensure_timm_importable()
        from lesionstack.models import load_segmenter, predict_masks

        model = load_segmenter(weights)
        masks = predict_masks(model, list(crops.values()))
    except Exception as err:  # noqa: BLE001 - the report must render even when the segmenter cannot run
        notes.append(f"Could not predict lesion masks with {weights} ({type(err).__name__}: {err}); "
                     "crops are shown without a mask.")
        return {}
    return dict(zip(crops, masks))


def montage_figure(groups: dict[str, pd.DataFrame], crops: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                   ranks: pd.Series, path: Path, dpi: int = 110, score_name: str = "score") -> Path:
    """One row (a sub-figure with its own heading) per group, one crop per column; each crop's title gives
    its id, its `display_score` column (else `score`) named `score_name`, and its top-% rank among all
    OOF lesions."""
    cols = max(max((len(g) for g in groups.values()), default=1), 1)
    fig = new_figure(1.75 * cols + 0.3, 2.35 * len(groups) + 0.3)
    if masks:
        fig.suptitle("Yellow outline: the segmenter's predicted lesion (probability ≥ 0.5)", fontsize=9)
    for sub, (key, rows) in zip(np.atleast_1d(fig.subfigures(len(groups), 1)), groups.items()):
        sub.suptitle(GROUPS[key], x=0.01, ha="left", fontsize=10, fontweight="bold")
        for c, ax in enumerate(np.atleast_1d(sub.subplots(1, cols))):
            ax.set_axis_off()
            if c < len(rows):
                _crop_panel(ax, rows.iloc[c], crops, masks, ranks, score_name)
            elif c == 0:
                ax.text(0.0, 0.5, "none", fontsize=9, transform=ax.transAxes)
    return save_png(fig, path, dpi)


def _crop_panel(ax: Any, row: pd.Series, crops: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                ranks: pd.Series, score_name: str = "score") -> None:
    isic_id = row["isic_id"]
    value = row["display_score"] if "display_score" in row else row["score"]
    label = f"{isic_id}\n{score_name} {value:.3g} · top {ranks[isic_id]:.1%}"
    if isic_id in masks and float(np.max(masks[isic_id])) < 0.5:
        label += "\nno lesion predicted"
    if isic_id not in crops:
        ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    else:
        ax.imshow(crops[isic_id], interpolation="antialiased")
        if isic_id in masks and np.ptp(masks[isic_id]) > 0:
            ax.contour(masks[isic_id], levels=[0.5], colors=MASK_COLOR, linewidths=1.3)
    ax.set_title(label, fontsize=7)
