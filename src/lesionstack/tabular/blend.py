"""Blending the stacker's model families: rank-normalised scores, averaged (rank mean) or weighted by
weights tuned on the OOF (`fit_blend_weights`)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from lesionstack.metrics import pauc
from lesionstack.tabular.stack_config import StackError


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1]: a scale-free score that can be averaged across model families."""
    return rankdata(x) / len(x)


def blend(scores: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
    """Weighted mean of rank-normalised scores (equal weights: the rank mean)."""
    names = sorted(scores)
    w = np.array([1.0 if weights is None else weights.get(n, 0.0) for n in names])
    if w.sum() <= 0:
        raise StackError(f"blend weights {weights} give no weight to any of {names}")
    return sum(wi * rank_normalise(scores[n]) for wi, n in zip(w, names, strict=True)) / w.sum()


def fit_blend_weights(scores: dict[str, np.ndarray], y: np.ndarray, step: float = 0.1) -> dict[str, float]:
    """Weights on a simplex grid (`step`) that maximise OOF pAUC; ties go to the most even weights.

    Tuned on the same OOF it is scored on, so the blend's OOF pAUC is slightly optimistic.
    """
    names = sorted(scores)
    n = round(1 / step)
    grid = [c for c in np.ndindex(*(n + 1,) * len(names)) if sum(c) == n]
    best, best_w = -1.0, None
    for combo in sorted(grid, key=lambda c: np.var(c)):
        w = {name: k / n for name, k in zip(names, combo, strict=True)}
        value = pauc(y, blend(scores, w))
        if value > best + 1e-12:
            best, best_w = value, w
    assert best_w is not None
    return best_w
