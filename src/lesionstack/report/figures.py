"""One function per figure. Each takes plain data and a target path, draws with matplotlib's object API
(a bare `Figure`, no pyplot: nothing global changes, no window can open) and saves a PNG atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from lesionstack.files import atomic_path
from lesionstack.metrics import pauc

COLORS = {"blend": "#1f4e99", "tabular": "#2a9d55", "cnn": "#d1495b",
          "lgbm": "#8d6a9f", "catboost": "#e09f3e", "xgboost": "#4c8a9b"}
MODEL_NAMES = {"blend": "Stacked blend", "tabular": "Tabular only", "cnn": "CNN", "lgbm": "LightGBM",
               "catboost": "CatBoost", "xgboost": "XGBoost"}
FOLD_CMAP = "tab10"
MIN_TPR = 0.8


def new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # headless: a bare Figure renders with Agg on savefig

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig: Any, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return path


def _shade_pauc(ax: Any, fpr: np.ndarray, tpr: np.ndarray, color: str) -> None:
    """Shade the pAUC region: for TPR in [0.8, 1], the area between the curve and FPR = 1."""
    ys = np.linspace(MIN_TPR, 1.0, 200)
    # the curve's smallest FPR reaching each TPR (the ROC as a function of TPR)
    xs = np.interp(ys, tpr, fpr)
    ax.fill_betweenx(ys, xs, 1.0, color=color, alpha=0.18, linewidth=0)


def roc_figure(oof: pd.DataFrame, models: list[tuple[str, str, str]], path: Path, dpi: int = 110) -> Path:
    """ROC panels (one per model: faint per-fold curves behind the pooled OOF curve, pAUC region shaded)
    and a last panel zoomed on TPR >= 0.8 with all models' pooled curves.

    `models` lists (name, label, score column).
    """
    rows, cols = (2, 2) if len(models) == 3 else (1, len(models) + 1)
    fig = new_figure(4.2 * cols, 3.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, label, col) in zip(axes, models):
        _roc_panel(ax, oof, col, label, COLORS.get(name, "#333333"))
    _roc_zoom(axes[len(models)], oof, models)
    return save_png(fig, path, dpi)


def _roc_panel(ax: Any, oof: pd.DataFrame, col: str, label: str, color: str) -> None:
    fold_p = []
    for _, g in oof.groupby("fold"):
        f_fpr, f_tpr, _ = roc_curve(g["target"], g[col])
        ax.plot(f_fpr, f_tpr, color=color, alpha=0.25, linewidth=0.9)
        fold_p.append(pauc(g["target"], g[col]))
    fpr, tpr, _ = roc_curve(oof["target"], oof[col])
    _shade_pauc(ax, fpr, tpr, color)
    pooled = pauc(oof["target"], oof[col])
    ax.plot([], [], color=color, alpha=0.35, label=f"{len(fold_p)} folds: pAUC {np.mean(fold_p):.4f} "
            f"± {np.std(fold_p):.4f}")
    ax.plot(fpr, tpr, color=color, linewidth=2.0, label=f"pooled OOF: pAUC {pooled:.4f}")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=0.8)
    ax.axhline(MIN_TPR, color="#666666", linestyle="--", linewidth=0.8)
    ax.set(title=label, xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8, title="shaded: pAUC region (TPR ≥ 0.8)", title_fontsize=7.5)


def _roc_zoom(ax: Any, oof: pd.DataFrame, models: list[tuple[str, str, str]]) -> None:
    for name, label, col in models:
        fpr, tpr, _ = roc_curve(oof["target"], oof[col])
        ax.plot(fpr, tpr, color=COLORS.get(name, "#333333"), linewidth=1.8,
                label=f"{label}: {pauc(oof['target'], oof[col]):.4f}")
    ax.axhline(MIN_TPR, color="#666666", linestyle="--", linewidth=0.8)
    ax.set(title="Zoom on the pAUC region (pooled OOF)", xlabel="False positive rate",
           ylabel="True positive rate", xlim=(0, 1), ylim=(MIN_TPR - 0.05, 1.005))
    ax.legend(loc="lower right", fontsize=8, title="pAUC (max 0.2)", title_fontsize=8)


def calibration_figure(curves: dict[str, pd.DataFrame], path: Path, dpi: int = 110) -> Path:
    """Reliability diagram on log-log axes (Wilson 95% bars; `curves`: model name -> its bins) above the
    lesions and positives per bin of the first model. Bins with no positive are drawn as open triangles at
    the axis floor (a log axis cannot show 0)."""
    fig = new_figure(6.6, 7.0)
    top, bottom = fig.subplots(2, 1, height_ratios=[2.2, 1])
    floor = 0.5 / max(b["n"].max() for b in curves.values())
    lowest = floor
    for i, (name, bins) in enumerate(curves.items()):
        lowest = min(lowest, _reliability(top, bins, name, floor, with_bars=i == 0))
    top.scatter([], [], marker="v", facecolors="none", edgecolors="#555555", label="bin with no positive")
    top.plot([lowest / 1.5, 1], [lowest / 1.5, 1], color="#999999", linestyle=":", label="perfect calibration")
    top.set(xscale="log", yscale="log", xlabel="Mean predicted score in bin", ylabel="Observed malignant rate",
            ylim=(floor / 1.5, 1.2), title="Calibration (quantile bins, finer at the top)")
    top.legend(fontsize=8, loc="upper left")
    first = next(iter(curves))
    _bin_counts(bottom, curves[first], MODEL_NAMES.get(first, first))
    return save_png(fig, path, dpi)


def _reliability(ax: Any, bins: pd.DataFrame, name: str, floor: float, with_bars: bool) -> float:
    """One model's curve; only the first carries Wilson 95% bars, to keep five curves readable."""
    color = COLORS.get(name, "#333333")
    x = bins["mean_score"].clip(lower=1e-6).to_numpy()
    has = bins["positives"].to_numpy() > 0
    label = MODEL_NAMES.get(name, name) + (" (Wilson 95%)" if with_bars else "")
    if with_bars:
        err = np.vstack([(bins["observed"] - bins["low"]).to_numpy(), (bins["high"] - bins["observed"]).to_numpy()])
        ax.errorbar(x[has], bins["observed"][has], yerr=err[:, has], fmt="o-", color=color, capsize=3,
                    markersize=5, linewidth=2, label=label, zorder=3)
    else:
        ax.plot(x[has], bins["observed"][has], "o-", color=color, markersize=3, linewidth=1.1, alpha=0.75,
                label=label)
    if (~has).any():
        ax.scatter(x[~has], np.full((~has).sum(), floor), marker="v", facecolors="none", edgecolors=color)
    return float(x.min())


def _bin_counts(ax: Any, bins: pd.DataFrame, label: str) -> None:
    pos = np.arange(len(bins))
    ax.bar(pos - 0.2, bins["n"], width=0.4, color="#c9d3e6", label="lesions")
    ax.bar(pos + 0.2, bins["positives"], width=0.4, color=COLORS["cnn"], label="positives")
    for i, (n, k) in enumerate(zip(bins["n"], bins["positives"])):
        ax.annotate(f"{int(k)}/{int(n)}", (i, max(n, 1)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(pos, [f"{v:.2g}" for v in bins["mean_score"]], fontsize=7, rotation=45)
    ax.set(yscale="log", ylim=(0.7, bins["n"].max() * 4), xlabel=f"Bins of {label} (mean predicted score)",
           ylabel="Count (log)")
    ax.legend(fontsize=8, loc="upper right", ncol=2)


def importance_figure(table: pd.DataFrame, path: Path, dpi: int = 110) -> Path:
    """Top features: a bar of the mean over models, one dot per model (index: feature; columns: models and
    'pooled')."""
    table = table.iloc[::-1]  # most important at the top
    fig = new_figure(7.5, 0.26 * len(table) + 1.4)
    ax = fig.subplots()
    ypos = np.arange(len(table))
    ax.barh(ypos, table["pooled"], color="#d9dee8", label="mean over models")
    for model in [c for c in table.columns if c != "pooled"]:
        ax.scatter(table[model], ypos, s=18, color=COLORS.get(model, None), label=model, zorder=3)
    ax.set_yticks(ypos, table.index, fontsize=8)
    ax.set(xlabel="Gain importance (share of the model's total, mean over folds)", ylim=(-0.7, len(table) - 0.3),
           title=f"Top {len(table)} features of the GBDT stackers")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path, dpi)


def training_figure(metrics: dict[int, dict[str, Any]], path: Path, dpi: int = 110,
                    keep: dict[int, str] | None = None) -> Path:
    """Per-fold CNN training curves: train/val loss and validation pAUC per epoch. Validation runs only on
    some epochs (`val_every`): its points are drawn as markers joined over the epochs that have one. The
    kept epoch is marked: a star for `keep: best` (the best validated epoch), a square for `keep: last`."""
    from matplotlib import colormaps

    cmap = colormaps[FOLD_CMAP]
    keep = keep or {}
    fig = new_figure(10.5, 3.8)
    loss_ax, pauc_ax = fig.subplots(1, 2)
    for k, m in sorted(metrics.items()):
        ep = pd.DataFrame(m["epochs"])
        val, kept = validation_points(ep, keep.get(k, "best"), m.get("best_epoch"))
        c = cmap(k % 10)
        loss_ax.plot(ep["epoch"], ep["train_loss"], color=c, label=f"fold {k} train")
        loss_ax.plot(val["epoch"], val["val_loss"], color=c, linestyle="--", marker="o", markersize=4,
                     label=f"fold {k} val")
        pauc_ax.plot(val["epoch"], val["val_pauc"], color=c, marker="o", markersize=4, label=f"fold {k}")
        last = keep.get(k, "best") == "last"
        pauc_ax.scatter(kept["epoch"], kept["val_pauc"], marker="s" if last else "*", s=70 if last else 140,
                        color=c, edgecolors="black", zorder=3)
    loss_ax.set(title="Loss (solid: train; dashed, dots: validation)", xlabel="Epoch", ylabel="Loss")
    pauc_ax.axhline(0.02, color="#999999", linestyle=":", linewidth=0.8, label="chance (0.02)")
    rules = {keep.get(k, "best") for k in metrics}
    mark = ", ".join(text for rule, text in (("best", "★ kept: best epoch"), ("last", "■ kept: last epoch"))
                     if rule in rules)
    pauc_ax.set(title=f"Validation pAUC per fold; {mark}", xlabel="Epoch", ylabel="pAUC (max 0.2)",
                xlim=loss_ax.get_xlim())
    _integer_epochs(loss_ax, pauc_ax)
    loss_ax.legend(fontsize=7, ncol=2)
    pauc_ax.legend(fontsize=7)
    return save_png(fig, path, dpi)


def validation_points(epochs: pd.DataFrame, keep: str, best_epoch: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the validated epochs, the kept one) of one fold's metrics: validation runs every `val_every` epochs,
    the others hold no val_pauc (a line through them would draw nothing); `keep: last` keeps the last
    validated epoch, `keep: best` the best one (`best_epoch`)."""
    val = epochs.dropna(subset=["val_pauc"]) if "val_pauc" in epochs else epochs.iloc[:0]
    return val, (val.tail(1) if keep == "last" else val.loc[val["epoch"] == best_epoch])


def _integer_epochs(*axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def segmenter_figure(metrics: dict[str, Any], path: Path, dpi: int = 110) -> Path:
    """Segmenter training: train loss and validation Dice / IoU per epoch."""
    ep = pd.DataFrame(metrics["epochs"])
    fig = new_figure(9.0, 3.4)
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot(ep["epoch"], ep["train_loss"], color="#333333", marker="o", markersize=3)
    loss_ax.set(title="Segmenter training loss", xlabel="Epoch", ylabel="Loss")
    score_ax.plot(ep["epoch"], ep["val_dice"], marker="o", markersize=3, color=COLORS["blend"], label="Dice")
    score_ax.plot(ep["epoch"], ep["val_iou"], marker="s", markersize=3, color=COLORS["catboost"], label="IoU")
    score_ax.set(title="Validation Dice and IoU", xlabel="Epoch", ylabel="Score", ylim=(0, 1))
    score_ax.legend(fontsize=8, loc="lower right")
    score_ax.grid(alpha=0.3)
    _integer_epochs(loss_ax, score_ax)
    return save_png(fig, path, dpi)


def confusion_figure(matrix: np.ndarray, classes: list[str], path: Path, dpi: int = 110) -> Path:
    """Two panels: the confusion matrix's counts and its row-normalised form (each true class sums to 1,
    so the diagonal is the per-class sensitivity). Rows: true class; columns: predicted class."""
    m = np.asarray(matrix, dtype=float)
    totals = m.sum(1, keepdims=True)
    norm = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    k = len(classes)
    side = max(3.2, 0.55 * k + 1.6)
    fig = new_figure(2 * side + 0.6, side)
    for ax, values, title, fmt in ((fig.add_subplot(1, 2, 1), m, "counts", "{:.0f}"),
                                   (fig.add_subplot(1, 2, 2), norm, "row-normalised (recall)", "{:.2f}")):
        scaled = values / values.max() if values.max() > 0 else values
        ax.imshow(norm if title != "counts" else scaled, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                shade = norm[i, j] if title != "counts" else scaled[i, j]
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shade > 0.6 else "#1d232b")
        ax.set_xticks(range(k), classes, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"Confusion matrix, {title}", fontsize=10)
    return save_png(fig, path, dpi)


def score_histogram(samples: dict[str, np.ndarray], path: Path, dpi: int = 110) -> Path:
    """Overlaid density histograms of score samples on a shared range (one colour each)."""
    fig = new_figure(7.5, 3.4)
    ax = fig.subplots()
    values = np.concatenate([np.asarray(v, dtype=float) for v in samples.values()])
    bins = np.linspace(float(values.min()), float(values.max()) or 1.0, 30)
    for (name, v), color in zip(samples.items(), (COLORS["blend"], COLORS["tabular"], COLORS["cnn"])):
        ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.6, color=color, label=f"{name} "
                f"(n={len(v)})")
    ax.set(xlabel="Score", ylabel="Density", title="Score distributions")
    ax.legend(fontsize=8)
    return save_png(fig, path, dpi)
