"""Fold-paired test predictions: stack fold k scores the test rows from CNN features built on CNN fold k's
test score, and the test prediction is the average over stack folds.

Why: every training row's CNN score (`oof_cnn.parquet`) comes from ONE fold model, while the mean of the
fold models' test scores has a narrower spread. CNN features built on that mean (the score, score /
patient mean, z-score and rank within the patient) would have another scale at test time than the
stacker learnt from. Paired, each stack fold sees test features of the kind its training rows had: one
CNN fold model's score. `tabular.score_shift` measures both ways against the OOF (quantiles, two-sample KS).

Pairing needs the stacker's folds to be the CNN's (one fold file): CNN fold k must be the model trained
without the rows of stack fold k. `check_fold_pairing` compares the fold-file digests both recorded
(`stack/fold_k/inputs.json`, `cnn/fold_k/inputs.json`) and REFUSES a mismatch or a missing record, rather
than falling back to the mean: a silent fallback is the very scale shift pairing removes. Retrain the
stacker on the CNN's fold file (`train-stack` already refuses CNN OOF scores of other folds). From Python,
`stack_predict.predict_stack(..., pairing="mean")` asks for the mean explicitly, to measure the before state
(`tabular.score_shift`); no command offers it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.features import CNN_PREFIX, cnn_features
from lesionstack.trained.scorer import FOLD_SCORE_PREFIX

PAIRINGS = ("fold", "mean")


class PairingError(ValueError):
    """Test CNN scores that cannot be paired with the stacker's folds (old format, other fold file)."""


def fold_score_columns(scores: pd.DataFrame, where: str) -> dict[int, str]:
    """fold -> column of the per-fold CNN scores in `scores`; refused when there are none (a table of the
    mean score only, as releases before pairing wrote)."""
    found = {int(m.group(1)): c for c in scores.columns if (m := re.fullmatch(rf"{FOLD_SCORE_PREFIX}(\d+)", c))}
    if not found:
        raise PairingError(
            f"{where}: no per-fold CNN scores ({FOLD_SCORE_PREFIX}<k> columns), only their mean; the stacker "
            "pairs stack fold k with CNN fold k's test score. Rescore: `lesionstack train-cnn` (trained folds "
            "are reused; only the scores are rewritten), or Predictor.score_hdf5(..., per_fold=True)")
    return dict(sorted(found.items()))


def fold_cnn_features(metadata: pd.DataFrame, scores: pd.DataFrame, where: str) -> pd.DataFrame:
    """Long table isic_id, fold, cnn_*: the CNN features of every test row built on each CNN fold model's
    score (`scores`: isic_id + `score_fold_<k>` columns, finite; fill unscored rows first)."""
    parts = []
    for fold, column in fold_score_columns(scores, where).items():
        one = scores[[ID_COLUMN, column]].rename(columns={column: "score"})
        feats = cnn_features(metadata, one, where=f"{where} ({column})")
        parts.append(pd.concat([metadata[[ID_COLUMN]].astype(str).reset_index(drop=True),
                                pd.DataFrame({"fold": np.full(len(feats), fold, np.int64)}), feats], axis=1))
    return pd.concat(parts, ignore_index=True)


def paired_features(features: pd.DataFrame, fold_cnn: pd.DataFrame, fold: int, where: str) -> pd.DataFrame:
    """`features` (test, any CNN features) with its `cnn_*` columns replaced by CNN fold `fold`'s."""
    part = fold_cnn[fold_cnn["fold"] == fold].set_index(ID_COLUMN)
    if part.empty:
        raise PairingError(f"{where}: no test CNN features for CNN fold {fold} (folds there: "
                           f"{sorted(fold_cnn['fold'].unique().tolist())}); stack fold {fold} needs them")
    ids = features[ID_COLUMN].astype(str)
    missing = ids[~ids.isin(part.index)]
    if len(missing):
        raise PairingError(f"{where}: CNN fold {fold} scores no row for {len(missing)} test id(s), "
                           f"e.g. {missing.head(3).tolist()}")
    cols = [c for c in features.columns if c.startswith(CNN_PREFIX)]
    swapped = part.loc[ids, cols].reset_index(drop=True)
    return features.assign(**{c: swapped[c].to_numpy() for c in cols})


# ---- the fold files of the two halves ----------------------------------------------------------------


def _recorded_folds(path: Any) -> str | None:
    return read_json(path).get("folds") if path.is_file() else None


def _retrain_hint(artifacts: ArtifactPaths, k: int, stack: bool) -> str:
    """The commands that make the missing record: the stage retrained on this root's fold file (the mean
    CNN score is no fallback a command offers: it is the scale shift pairing removes)."""
    root = artifacts.root
    if stack:
        return (f"Retrain the stacker so it records it: delete {artifacts.stack_dir} and run "
                f"`lesionstack train-stack --artifacts {root}`")
    return (f"Retrain CNN fold {k} so it records it: delete {artifacts.cnn_fold(k).dir} and run `lesionstack "
            f"train-cnn DATA --artifacts {root} --folds-only {k}`, then `lesionstack features DATA --artifacts "
            f"{root}` and, after deleting {artifacts.stack_dir}, `lesionstack train-stack --artifacts {root}`")


def check_fold_pairing(artifacts: ArtifactPaths, n_folds: int) -> None:
    """Refuse pairing unless stack fold k and CNN fold k were made from the same fold file, for every k
    (digests recorded in `stack/fold_k/inputs.json` and `cnn/fold_k/inputs.json`)."""
    for k in range(n_folds):
        stack_file, cnn_file = artifacts.stack_fold(k).inputs, artifacts.cnn_fold(k).inputs
        stack, cnn = _recorded_folds(stack_file), _recorded_folds(cnn_file)
        if stack is None or cnn is None:
            lacking = stack_file if stack is None else cnn_file
            raise PairingError(
                f"{lacking}: no fold-file record, so stack fold {k} cannot be paired with CNN fold {k}'s test "
                f"scores (pairing needs both trained on one fold file). {_retrain_hint(artifacts, k, stack is None)}")
        if stack != cnn:
            raise PairingError(
                f"stack fold {k} ({stack_file}: folds {stack[:12]}...) and CNN fold {k} ({cnn_file}: folds "
                f"{cnn[:12]}...) were trained on different fold files, so CNN fold {k} is not the model that "
                f"never saw stack fold {k}'s rows; retrain the stacker on the CNN's fold file ({artifacts.folds})")
