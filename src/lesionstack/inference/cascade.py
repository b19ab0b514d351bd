"""Cascade prediction: every crop scored by the fast fold models, only the top K rescored by the slow ones.

    fast = FoldScorer.load("artifacts_fast"); slow = FoldScorer.load("artifacts_slow")
    table = cascade_hdf5(fast, slow, "test-image.hdf5", ids, CascadeConfig(top_k=70_000))
    # DataFrame[isic_id, score, fast, slow, rescored]: `score` blends fast and slow where rescored

A slow model that cannot score 500,000 crops in the kernel's time limit still scores the crops that matter
most for a ranking metric: the ones the fast model already ranks high (6th place of ISIC 2024 rescored its
top 70,000 test rows this way). `per_patient` takes the top K of each patient instead of the top K
overall (every patient gets its most suspicious lesions looked at twice). Rescored rows get
`(1 - slow_weight) * fast + slow_weight * slow`, the others keep their fast score; with `keep_order` the
rescored rows are lifted to stay above every row that was not rescored (the cascade may reorder only the
top K among themselves), which keeps the fast ranking's lower part intact whatever the slow model's scale.
The cost in pAUC against scoring everything with both, and the time saved, are measured by
benchmarks/bench_cascade.py (docs/performance.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lesionstack.config import ConfigError
from lesionstack.data.schema import ID_COLUMN
from lesionstack.trained.scorer import FoldScorer


@dataclass(frozen=True)
class CascadeConfig:
    """Which crops the slow models rescore, and how their scores are blended in."""

    top_k: int = 70_000  # rows rescored: overall, or per patient with per_patient
    per_patient: bool = False
    slow_weight: float = 0.5  # rescored rows: (1 - w) * fast + w * slow
    keep_order: bool = True  # rescored rows stay above the rest (only the top K is reordered)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"cascade.top_k: expected a count >= 0, got {self.top_k}")
        if not 0.0 <= self.slow_weight <= 1.0:
            raise ConfigError(f"cascade.slow_weight: expected a weight in [0, 1], got {self.slow_weight}")


def pick_top(fast: np.ndarray, cfg: CascadeConfig, patients: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of the rows to rescore: the `top_k` highest fast scores overall, or per patient (ties
    broken by row order). NaN fast scores (unreadable crops) are never picked."""
    fast = np.asarray(fast, dtype=np.float64)
    key = np.where(np.isnan(fast), -np.inf, fast)
    pick = np.zeros(len(fast), dtype=bool)
    if cfg.per_patient:
        if patients is None or len(patients) != len(fast):
            raise ValueError(f"cascade per patient needs one patient id per row ({len(fast)} rows)")
        frame = pd.DataFrame({"patient": np.asarray(patients), "key": -key, "row": np.arange(len(fast))})
        ranked = frame.sort_values(["patient", "key", "row"], kind="stable")
        rank = ranked.groupby("patient", sort=False).cumcount().to_numpy()
        pick[ranked["row"].to_numpy()[rank < cfg.top_k]] = True
    else:
        pick[np.argsort(-key, kind="stable")[:cfg.top_k]] = True
    return pick & np.isfinite(fast)


def blend(fast: np.ndarray, slow: np.ndarray, pick: np.ndarray, cfg: CascadeConfig) -> np.ndarray:
    """The cascade's scores from the fast scores, the slow scores of the picked rows and the pick mask."""
    fast = np.asarray(fast, dtype=np.float64)
    out = fast.copy()
    mixed = (1.0 - cfg.slow_weight) * fast[pick] + cfg.slow_weight * np.asarray(slow, np.float64)[pick]
    if cfg.keep_order and pick.any() and (~pick).any():
        # map the mixed scores into (top of the rest, 1]: the rest keeps its place below every picked row
        floor = np.nanmax(np.where(pick, -np.inf, fast))
        floor = max(floor, 0.0) if np.isfinite(floor) else 0.0
        lo, hi = np.nanmin(mixed), np.nanmax(mixed)
        span = (mixed - lo) / (hi - lo) if hi > lo else np.ones_like(mixed)
        mixed = floor + (1.0 - floor) * (0.5 + 0.5 * span) if floor < 1.0 else np.full_like(mixed, 1.0)
    out[pick] = mixed
    return out


def cascade_hdf5(fast: FoldScorer, slow: FoldScorer, path: str | os.PathLike[str], ids: Sequence[str],
                 cfg: CascadeConfig = CascadeConfig(), patients: Sequence[str] | None = None) -> pd.DataFrame:
    """DataFrame[isic_id, score, fast, slow, rescored] for `ids`: the fast models score every crop, the slow
    ones only the picked rows (`slow` is NaN elsewhere). `attrs['seconds']` holds each stage's time."""
    ids = [str(i) for i in ids]
    start = time.perf_counter()
    fast_scores = fast.score_hdf5(path, ids)["score"].to_numpy()
    mid = time.perf_counter()
    pick = pick_top(fast_scores, cfg, patients)
    slow_scores = np.full(len(ids), np.nan)
    if pick.any():
        slow_scores[pick] = slow.score_hdf5(path, [ids[i] for i in np.flatnonzero(pick)])["score"].to_numpy()
    table = pd.DataFrame({ID_COLUMN: ids, "score": blend(fast_scores, slow_scores, pick, cfg),
                          "fast": fast_scores, "slow": slow_scores, "rescored": pick})
    table.attrs["seconds"] = {"fast": mid - start, "slow": time.perf_counter() - mid}
    return table
