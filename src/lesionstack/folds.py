"""Patient-grouped, stratified K-fold splits, written once and read everywhere.

No patient may appear in two folds (lesions of one person are correlated, and the hidden test set holds
other people), and the rare positives must be spread evenly, or a fold's pAUC means little. The default
method assigns patients greedily, most positives first, each to the fold with the fewest positives so
far (ties: fewest lesions; a patient without positives goes where lesions are fewest), after a seeded
shuffle; this balances positives by construction. The method the
ISIC 2024 winners used, scikit-learn's StratifiedGroupKFold(shuffle=True), is available as
`method="sklearn"`; its balance is checked, not assumed (before scikit-learn 1.8 its shuffle disabled
the stratification).

`group="attribution"` makes leave-institution-out folds instead: whole institutions are assigned greedily the
same way (most positives first), so each institution's lesions are validated by models that never saw that
institution, as on the hidden test set with its unseen hospitals. Institutions differ in size, so positives
per fold cannot be balanced: such folds are checked for each institution in one fold and both classes in
every fold, and K may not exceed the number of institutions. The fold file then carries the group column
as a fifth column, so every reader can tell the two kinds apart.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lesionstack.config import Range, check_fields
from lesionstack.data.metadata import read_metadata
from lesionstack.data.schema import ID_COLUMN, PATIENT_COLUMN, TARGET_COLUMN
from lesionstack.files import atomic_path
from lesionstack.paths import ArtifactPaths, DataPaths

FOLD_COLUMNS = [ID_COLUMN, PATIENT_COLUMN, TARGET_COLUMN, "fold"]
Method = Literal["greedy", "sklearn"]


class FoldError(ValueError):
    """A fold assignment that breaks one of the split's guarantees, or a fold file that cannot be used."""


@dataclass
class FoldsConfig:
    """The `folds` stage: K, the seed, and the method ("greedy" or "sklearn")."""

    n_folds: Annotated[int, Range(ge=2)] = 5
    seed: int = 42
    method: Method = "greedy"
    group: str = PATIENT_COLUMN  # or e.g. "attribution": leave-institution-out folds

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FoldsResult:
    """What the `folds` stage wrote: the fold file and its per-fold counts."""

    path: Path
    n_patients: int
    lesions: tuple[int, ...]  # per fold
    positives: tuple[int, ...]  # per fold

    @classmethod
    def of(cls, folds: pd.DataFrame, path: Path) -> FoldsResult:
        counts = folds.groupby("fold")[TARGET_COLUMN].agg(["size", "sum"])
        return cls(Path(path), int(folds[PATIENT_COLUMN].nunique()), tuple(int(n) for n in counts["size"]),
                   tuple(int(n) for n in counts["sum"]))

    def __str__(self) -> str:
        return f"{sum(self.lesions)} lesions, {self.n_patients} patients, positives per fold {list(self.positives)}"


def assign_folds(metadata: pd.DataFrame, n_folds: int = 5, seed: int = 42,
                 method: Method = "greedy", group: str = PATIENT_COLUMN) -> pd.DataFrame:
    """Return `isic_id, patient_id, target, fold` for every row of `metadata` (same order); with a `group`
    other than patient_id, that column too (every group in one fold)."""
    if group != PATIENT_COLUMN:
        return _assign_group_folds(metadata, n_folds, seed, method, group)
    if metadata[PATIENT_COLUMN].nunique() < n_folds:
        raise FoldError(f"{n_folds} folds need at least {n_folds} patients; "
                        f"got {metadata[PATIENT_COLUMN].nunique()}")
    frame = metadata[[ID_COLUMN, PATIENT_COLUMN, TARGET_COLUMN]].reset_index(drop=True).copy()
    frame[TARGET_COLUMN] = frame[TARGET_COLUMN].astype(np.int8)
    if method == "greedy":
        fold_of_patient = _greedy_patient_folds(frame, n_folds, seed)
        frame["fold"] = frame[PATIENT_COLUMN].map(fold_of_patient).astype(np.int8)
    elif method == "sklearn":
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold = np.empty(len(frame), dtype=np.int8)
        for k, (_, val) in enumerate(splitter.split(frame, frame[TARGET_COLUMN], frame[PATIENT_COLUMN])):
            fold[val] = k
        frame["fold"] = fold
    else:
        raise FoldError(f"unknown fold method {method!r}; use 'greedy' or 'sklearn'")
    check_folds(frame, n_folds)
    return frame


def _assign_group_folds(metadata: pd.DataFrame, n_folds: int, seed: int, method: str, group: str) -> pd.DataFrame:
    """Folds that keep every value of `group` (an institution) in one fold, greedy on positives."""
    if method != "greedy":
        raise FoldError(f"--group {group} folds use the greedy method; got method {method!r}")
    if group not in metadata.columns:
        raise FoldError(f"train metadata has no column {group!r} to group folds by")
    missing = metadata[group].isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise FoldError(f"column {group!r} is empty in row {row + 2} (isic_id {metadata[ID_COLUMN].iloc[row]!r}); "
                        "every lesion needs a group to be assigned a fold")
    split = metadata.groupby(PATIENT_COLUMN)[group].nunique()
    if (split > 1).any():
        raise FoldError(f"patient {split[split > 1].index[0]!r} has lesions in more than one {group!r} value, so "
                        "grouping by it would put the patient in two folds")
    n_groups = metadata[group].nunique()
    if n_groups < n_folds:
        raise FoldError(f"{n_folds} folds need at least {n_folds} distinct {group!r} values; the data have "
                        f"{n_groups}: use --n-folds {n_groups} or fewer")
    frame = metadata[[ID_COLUMN, PATIENT_COLUMN, TARGET_COLUMN, group]].reset_index(drop=True).copy()
    frame[TARGET_COLUMN] = frame[TARGET_COLUMN].astype(np.int8)
    frame[group] = frame[group].astype(str)
    fold_of = _greedy_patient_folds(frame.rename(columns={PATIENT_COLUMN: "_p", group: PATIENT_COLUMN}),
                                    n_folds, seed)
    frame["fold"] = frame[group].map(fold_of).astype(np.int8)
    check_folds(frame, n_folds, group=group)
    return frame[[*FOLD_COLUMNS, group]]


def _greedy_patient_folds(frame: pd.DataFrame, n_folds: int, seed: int) -> dict[str, int]:
    """Fold of each value of the patient_id column (a caller may put another grouping there)."""
    per_patient = frame.groupby(PATIENT_COLUMN, sort=True)[TARGET_COLUMN].agg(["sum", "size"])
    rng = np.random.default_rng(seed)
    per_patient = per_patient.iloc[rng.permutation(len(per_patient))]  # seeded tie-breaking
    per_patient = per_patient.sort_values(["sum", "size"], ascending=False, kind="stable")
    positives = np.zeros(n_folds, dtype=np.int64)
    lesions = np.zeros(n_folds, dtype=np.int64)
    fold_of: dict[str, int] = {}
    for patient, n_pos, n_rows in zip(per_patient.index, per_patient["sum"], per_patient["size"]):
        # a patient with positives goes where positives are fewest (then lesions); one without, where
        # lesions are fewest, so negatives fill up the folds evenly after the positives are spread
        k = int(np.lexsort((lesions, positives))[0]) if n_pos else int(np.argmin(lesions))
        fold_of[patient] = k
        positives[k] += n_pos
        lesions[k] += n_rows
    return fold_of


def check_folds(folds: pd.DataFrame, n_folds: int | None = None, group: str | None = None) -> None:
    """Raise FoldError unless: every row in exactly one fold, no patient in two folds, all K folds used,
    every fold holds both classes, and positives per fold within max(1, 10%) of each other. With `group`
    (leave-institution-out folds), each group in one fold replaces the positives' balance."""
    missing = [c for c in FOLD_COLUMNS if c not in folds.columns]
    if missing:
        raise FoldError(f"fold table lacks column(s) {missing}")
    if folds[ID_COLUMN].duplicated().any():
        dup = folds.loc[folds[ID_COLUMN].duplicated(), ID_COLUMN].iloc[0]
        raise FoldError(f"isic_id '{dup}' is in more than one fold row")
    if folds["fold"].isna().any():
        raise FoldError(f"isic_id '{folds.loc[folds['fold'].isna(), ID_COLUMN].iloc[0]}' has no fold")
    k = n_folds or int(folds["fold"].max()) + 1
    used = sorted(int(f) for f in folds["fold"].unique())
    if used != list(range(k)):
        raise FoldError(f"expected folds 0..{k - 1}, found {used}")
    folds_per_patient = folds.groupby(PATIENT_COLUMN)["fold"].nunique()
    if (folds_per_patient > 1).any():
        raise FoldError(f"patient '{folds_per_patient[folds_per_patient > 1].index[0]}' is in more than one fold")
    pos = folds.groupby("fold")[TARGET_COLUMN].sum().reindex(range(k), fill_value=0)
    if group is not None:
        per_group = folds.groupby(group)["fold"].nunique()
        if (per_group > 1).any():
            raise FoldError(f"{group} {per_group[per_group > 1].index[0]!r} is in more than one fold")
    allowed = max(1, int(np.floor(0.10 * pos.max())))
    if group is None and pos.max() - pos.min() > allowed:
        raise FoldError(f"positives per fold are unbalanced: {pos.tolist()} (allowed spread {allowed}); "
                        "try another seed, or the default greedy method")
    size = folds.groupby("fold")[TARGET_COLUMN].size().reindex(range(k), fill_value=0)
    for fold in range(k):  # each fold is a validation set: pAUC (and early stopping) need both classes
        if pos[fold] == 0:
            raise FoldError(f"fold {fold} has no positives (positives per fold {pos.tolist()}): its validation "
                            f"pAUC is undefined and the stacker cannot score it; use "
                            + (f"fewer folds (--n-folds; whole {group} values cannot be split)"
                               if group is not None else f"at most {max(2, int(pos.sum()))} folds (--n-folds)")
                            + " or data with more malignant lesions")
        if pos[fold] == size[fold]:
            raise FoldError(f"fold {fold} holds only positives ({size[fold]} lesions): its validation pAUC is "
                            "undefined; use fewer folds")


def folds_digest(folds: pd.DataFrame) -> str:
    """A fingerprint of the assignment and, when the table has them, its labels (isic_id -> fold, target):
    models trained on one split must not be reused with another, nor with relabelled rows."""
    cols = [ID_COLUMN, "fold", *([TARGET_COLUMN] if TARGET_COLUMN in folds.columns else [])]
    rows = folds[cols].sort_values(ID_COLUMN)
    text = "\n".join(",".join(str(v) for v in row) for row in zip(*(rows[c].astype(str) for c in cols)))
    return hashlib.sha256(text.encode()).hexdigest()


def fold_group(folds: pd.DataFrame) -> str | None:
    """The column a fold file was grouped by beyond patients (its fifth column), or None for patient folds."""
    extra = [c for c in folds.columns if c not in FOLD_COLUMNS]
    return extra[0] if len(extra) == 1 else None


def read_folds(path: str | os.PathLike[str], *, keep_group: bool = False) -> pd.DataFrame:
    """Read and check a fold file (`keep_group`: keep a leave-institution-out file's group column)."""
    path = Path(path)
    if not path.is_file():
        raise FoldError(f"{path}: fold file not found (make it with `lesionstack folds DATA --out {path}`)")
    folds = pd.read_csv(path, dtype={ID_COLUMN: str, PATIENT_COLUMN: str})
    group = fold_group(folds)
    try:
        check_folds(folds, group=group)
    except FoldError as err:
        raise FoldError(f"{path}: {err}") from err
    folds["fold"] = folds["fold"].astype(np.int8)
    folds[TARGET_COLUMN] = folds[TARGET_COLUMN].astype(np.int8)
    return folds[FOLD_COLUMNS + ([group] if keep_group and group else [])]


def make_folds_file(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], n_folds: int = 5,
                    seed: int = 42, method: Method = "greedy", force: bool = False,
                    group: str = PATIENT_COLUMN) -> pd.DataFrame:
    """Write the fold file for a data folder, once.

    An existing file with the same content is kept as it is; one with different content is an error
    unless `force`, because every trained model downstream depends on it.
    """
    out = Path(out)
    metadata = read_metadata(DataPaths(data_dir).train_metadata, kind="train")
    folds = assign_folds(metadata, n_folds=n_folds, seed=seed, method=method, group=group)
    text = folds.to_csv(index=False, lineterminator="\n")
    if out.exists():
        if out.read_text() == text:
            return folds
        if not force:
            raise FoldError(
                f"{out} exists with different folds (other data, seed or K). Models trained on it would be "
                "mixed with new ones; pass --force to replace it on purpose, or choose another --artifacts folder "
                "(or --out file)."
            )
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return folds


def folds_stage(data: DataPaths, art: ArtifactPaths, cfg: FoldsConfig, *, force: bool = False) -> FoldsResult:
    """The `folds` stage: write `art.folds` once (see `make_folds_file`) and say what it holds."""
    folds = make_folds_file(data.root, art.folds, n_folds=cfg.n_folds, seed=cfg.seed,
                            method=cfg.method, force=force, group=cfg.group)  # type: ignore[arg-type]
    return FoldsResult.of(folds, art.folds)
