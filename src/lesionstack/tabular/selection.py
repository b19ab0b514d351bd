"""Whether the reported out-of-fold scores were chosen on the folds they are measured on (cv.json "selection").

Two choices made on the scored folds make the OOF pAUC optimistic: stacker parameters (Optuna's best trial,
or blend weights fitted on the OOF) picked by the same folds' pAUC, and a CNN fold's epoch picked by the
pAUC of the fold it then scores (`keep: best`). cv.json records both, and the summary and report say so
(`report.inputs.selection_caveat` reads them back).
"""

from __future__ import annotations

from lesionstack.config import read_config_dict
from lesionstack.paths import ArtifactPaths


def selection_flags(tuned: bool, with_cnn: bool, artifacts: ArtifactPaths, n_folds: int) -> dict[str, bool]:
    """cv.json's "selection": tuned_on_same_folds, cnn_epoch_selected_on_scored_fold."""
    return {"tuned_on_same_folds": bool(tuned),
            "cnn_epoch_selected_on_scored_fold": with_cnn and cnn_keeps_best(artifacts, n_folds)}


def cnn_keeps_best(artifacts: ArtifactPaths, n_folds: int) -> bool:
    """True when any CNN fold was trained with keep: best (a fold config without the key predates it: best)."""
    for k in range(n_folds):
        config = artifacts.cnn_fold(k).config
        if config.is_file() and read_config_dict(config).get("keep", "best") == "best":
            return True
    return False
