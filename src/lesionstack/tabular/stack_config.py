"""The GBDT stacker's config (`StackConfig`) and the error it raises on inputs it refuses.

The stage that trains with it is `lesionstack.tabular.stack`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lesionstack.tabular.gbdt import FAMILIES

MODELS = tuple(FAMILIES)  # lgbm, catboost, xgboost: one entry each in gbdt.FAMILIES

# Config keys that change how fast the stacker trains, never what it learns.
RUNTIME_KEYS = ("n_jobs", "workers")
# ... and those that do not change what a tuning study searched: whether its result is used
TUNE_IGNORE = (*RUNTIME_KEYS, "use_tuned")


class StackError(ValueError):
    """Inputs the stacker refuses: misaligned features, leaky or mismatched CNN scores, unknown models."""


@dataclass
class StackConfig:
    """Everything that decides the stacker's models. Saved beside every fold it made."""

    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    neg_pos_ratio: float = 100.0  # negatives kept per positive, per fold and seed; 0 keeps all
    learning_rate: float = 0.03
    n_rounds: int = 300
    max_depth: int = 6
    num_leaves: int = 31
    min_child_samples: int = 20
    subsample: float = 0.8
    colsample: float = 0.5
    reg_lambda: float = 1.0
    n_jobs: int = 2  # threads per booster
    workers: int = 1  # variants of a fold trained at once (threads: the libraries release the GIL)
    use_cnn: bool = True  # use the CNN features when the feature table has them
    train_tabular: bool = True  # with CNN features, also train the variant without them
    # the tabular variant's seeds (null: `seeds`). It scores only rows whose crop could not be read, so at
    # real scale one seed buys back a quarter of the stacker's time (README "Performance")
    tabular_seeds: tuple[int, ...] | None = None
    blend: str = "rank_mean"  # or "weights": rank-normalised scores, weights tuned on the OOF
    use_tuned: bool = True  # merge artifacts.best_params into the tuned model's params
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model: native extra params
    # image-score handling as the 1st place did (`tabular.image_scores`): cnn_score as z-scores of the logit
    # per CNN fold model; Gaussian noise of cnn_noise x each CNN column's std on the training rows only;
    # the within-patient local outlier factor feature (`tabular.outliers`). Measured: docs/experiments
    cnn_standardise: bool = False
    cnn_noise: float = 0.0
    use_lof: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS)) + sorted(set(self.params) - set(MODELS))
        if unknown:
            raise StackError(f"unknown model(s) {unknown}; known: {list(MODELS)}")
        if self.workers < 1 or self.n_jobs < 1:
            raise StackError(f"workers and n_jobs must be at least 1, got {self.workers} and {self.n_jobs}")
        if self.blend not in ("rank_mean", "weights"):
            raise StackError(f"blend must be 'rank_mean' or 'weights', got {self.blend!r}")
        if not self.seeds or (self.tabular_seeds is not None and not self.tabular_seeds):
            raise StackError("seeds and tabular_seeds must name at least one seed")
        if not 0.0 <= self.cnn_noise <= 1.0:
            raise StackError(f"cnn_noise must be in [0, 1] (a share of each CNN column's std), got {self.cnn_noise}")
