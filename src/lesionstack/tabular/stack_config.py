"""The GBDT stacker's config (`StackConfig`) and the error it raises on inputs it refuses.

The stage that trains with it is `lesionstack.tabular.stack`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from lesionstack.config import (
    Invalid,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Range,
    check_fields,
    runtime,
)
from lesionstack.tabular.gbdt import FAMILIES

MODELS = tuple(FAMILIES)  # lgbm, catboost, xgboost: one entry each in gbdt.FAMILIES
ModelName = Literal[MODELS]  # type: ignore[valid-type]

# Besides the runtime() fields: a key that does not change what a tuning study searched (whether its result
# is used)
TUNE_IGNORE = ("use_tuned",)


class StackError(ValueError):
    """Inputs the stacker refuses: misaligned features, leaky or mismatched CNN scores, unknown models."""


@dataclass
class StackConfig:
    """Everything that decides the stacker's models. Saved beside every fold it made."""

    models: tuple[ModelName, ...] = MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    neg_pos_ratio: NonNegativeFloat = 100.0  # negatives kept per positive, per fold and seed; 0 keeps all
    learning_rate: PositiveFloat = 0.03
    n_rounds: PositiveInt = 300
    max_depth: PositiveInt = 6
    num_leaves: Annotated[int, Range(ge=2)] = 31
    min_child_samples: NonNegativeInt = 20
    subsample: Annotated[float, Range(gt=0, le=1)] = 0.8
    colsample: Annotated[float, Range(gt=0, le=1)] = 0.5
    reg_lambda: NonNegativeFloat = 1.0
    n_jobs: PositiveInt = runtime(2)  # threads per booster
    workers: PositiveInt = runtime(1)  # variants of a fold trained at once (threads: the libraries release the GIL)
    use_cnn: bool = True  # use the CNN features when the feature table has them
    train_tabular: bool = True  # with CNN features, also train the variant without them
    # the tabular variant's seeds (null: `seeds`). It scores only rows whose crop could not be read, so at
    # real scale one seed buys back a quarter of the stacker's time (README "Performance")
    tabular_seeds: tuple[int, ...] | None = None
    blend: Literal["rank_mean", "weights"] = "rank_mean"  # weights: rank-normalised scores, weights tuned on the OOF
    use_tuned: bool = True  # merge artifacts.best_params into the tuned model's params
    params: dict[ModelName, dict[str, Any]] = field(default_factory=dict)  # per model: native extra params
    # image-score handling as the 1st place did (`tabular.image_scores`): cnn_score as z-scores of the logit
    # per CNN fold model; Gaussian noise of cnn_noise x each CNN column's std on the training rows only;
    # the within-patient local outlier factor feature (`tabular.outliers`). Measured: docs/experiments
    cnn_standardise: bool = False
    cnn_noise: Probability = 0.0  # a share of each CNN column's std
    use_lof: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.models:
            raise Invalid("models", "a list of at least one of " + ", ".join(MODELS), [])
        for key in ("seeds", "tabular_seeds"):
            if getattr(self, key) == ():
                raise Invalid(key, "a list of at least one seed" + (" or null" if key == "tabular_seeds" else ""), [])
