from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesionstack.data.schema import TRAIN_COLUMNS
from lesionstack.folds import FoldError, assign_folds, check_folds, make_folds_file, read_folds


def _metadata(n_patients=60, seed=0, pos_rate=0.04):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 80, n_patients)  # skewed lesion counts, like the real data
    patients = np.repeat([f"IP_{i:07d}" for i in range(n_patients)], counts)
    target = (rng.random(len(patients)) < pos_rate).astype(int)
    return pd.DataFrame({"isic_id": [f"ISIC_{i:07d}" for i in range(len(patients))],
                         "patient_id": patients, "target": target})


@pytest.mark.parametrize("method", ["greedy", "sklearn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fold_guarantees(method, seed):
    meta = _metadata(seed=seed)
    try:
        folds = assign_folds(meta, n_folds=5, seed=seed, method=method)
    except FoldError as err:  # scikit-learn's splitter is checked, not trusted; greedy must always pass
        assert method == "sklearn" and "unbalanced" in str(err)
        return
    assert folds["isic_id"].tolist() == meta["isic_id"].tolist()  # every row once, same order
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()  # no patient in two folds
    pos = folds.groupby("fold")["target"].sum()
    assert len(pos) == 5 and pos.max() - pos.min() <= max(1, int(0.1 * pos.max()))


def test_greedy_balances_lesions_too():
    folds = assign_folds(_metadata(n_patients=300), n_folds=5)
    sizes = folds.groupby("fold").size()
    assert sizes.max() / sizes.min() < 1.1


def test_check_folds_catches_each_violation():
    folds = assign_folds(_metadata(), n_folds=5)
    bad = folds.copy()
    bad.loc[bad.index[0], "fold"] = (bad.loc[bad.index[0], "fold"] + 1) % 5  # split one patient
    with pytest.raises(FoldError, match="more than one fold"):
        check_folds(bad)
    with pytest.raises(FoldError, match="isic_id .* more than one fold row"):
        check_folds(pd.concat([folds, folds.iloc[:1]]))
    unbalanced = folds.copy()
    unbalanced.loc[unbalanced["fold"] == 0, "target"] = 1
    with pytest.raises(FoldError, match="unbalanced"):
        check_folds(unbalanced)


def test_too_few_patients():
    with pytest.raises(FoldError, match="at least 5 patients"):
        assign_folds(_metadata(n_patients=3), n_folds=5)


def _write_data_dir(tmp_path, meta):
    data = tmp_path / "data"
    data.mkdir()
    full = pd.DataFrame({c: np.nan for c in TRAIN_COLUMNS}, index=meta.index)
    for c in meta.columns:
        full[c] = meta[c]
    full.to_csv(data / "train-metadata.csv", index=False)
    return data


def test_fold_file_written_once(tmp_path):
    data = _write_data_dir(tmp_path, _metadata())
    out = tmp_path / "folds.csv"
    a = make_folds_file(data, out, seed=7)
    first = out.read_bytes()
    make_folds_file(data, out, seed=7)  # same content: kept as is
    assert out.read_bytes() == first
    other = tmp_path / "other.csv"
    make_folds_file(data, other, seed=7)
    assert other.read_bytes() == first  # same seed, same file
    with pytest.raises(FoldError, match="exists with different folds"):
        make_folds_file(data, out, seed=8)
    assert out.read_bytes() == first  # refused: untouched
    make_folds_file(data, out, seed=8, force=True)
    assert out.read_bytes() != first
    back = read_folds(other)
    assert back["isic_id"].tolist() == a["isic_id"].tolist()
    assert (back["fold"].to_numpy() == a["fold"].to_numpy()).all()


def test_read_folds_rejects_broken_file(tmp_path):
    path = tmp_path / "folds.csv"
    rows = {"isic_id": ["a", "b"], "patient_id": ["p", "p"], "target": [0, 1], "fold": [0, 1]}
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(FoldError, match="folds.csv: patient 'p' is in more than one fold"):
        read_folds(path)
    with pytest.raises(FoldError, match="not found"):
        read_folds(tmp_path / "missing.csv")
