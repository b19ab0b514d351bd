"""`lesionstack compare`: paired patient bootstrap of pAUC differences, and the t-test over CV seeds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lesionstack.cli import app
from lesionstack.files import read_json, write_json
from lesionstack.folds import assign_folds
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths
from lesionstack.report.compare import CompareError, compare_runs, format_comparison


def _truth(seed: int, n_patients: int = 150) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 30, n_patients)
    patient = np.repeat(np.arange(n_patients), sizes)
    logit = -3.5 + rng.normal(0, 1.0, n_patients)[patient] + rng.normal(0, 1.2, patient.size)
    target = (rng.random(patient.size) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame({"isic_id": [f"ISIC_{i:07d}" for i in range(patient.size)],
                          "patient_id": [f"IP_{p:06d}" for p in patient], "target": target, "logit": logit})
    return frame.assign(fold=assign_folds(frame, 5, seed=seed)["fold"].to_numpy())


def _run(root: Path, truth: pd.DataFrame, noise: float, seed: int) -> Path:
    """An artifacts root whose scores are the true logit plus `noise`: less noise, a better run."""
    rng = np.random.default_rng(seed)
    paths = ArtifactPaths(root)
    paths.root.mkdir(parents=True)
    truth[["isic_id", "patient_id", "target", "fold"]].to_csv(paths.folds, index=False)
    oof = truth[["isic_id", "fold", "target"]].copy()
    for col, extra in (("score_cnn", 1.0), ("score_tabular", 0.3), ("score", 0.0)):
        oof[col] = truth["logit"] + rng.normal(0, noise + extra, len(truth))
    oof.to_parquet(paths.oof_stack)
    write_json(paths.cv_json, {"n_folds": 5, "models": {}})
    return paths.root


def test_a_run_against_itself_differs_by_exactly_zero(tmp_path):
    run = _run(tmp_path / "a", _truth(0), 1.0, 0)
    result = compare_runs([run], [run], n_resamples=300)
    for d in result["pairs"][0]["models"]:
        assert d["diff"] == 0.0 and d["low"] == 0.0 and d["high"] == 0.0
        assert d["share_b_not_better"] == 1.0  # B <= A in every resample: no evidence B is better
    assert [d["model"] for d in result["pairs"][0]["models"]] == ["cnn", "tabular", "blend"]


def test_a_better_run_gets_a_positive_interval_and_the_numbers_are_the_metric(tmp_path):
    truth = _truth(1)
    worse, better = _run(tmp_path / "worse", truth, 2.5, 1), _run(tmp_path / "better", truth, 0.2, 2)
    result = compare_runs([worse], [better], n_resamples=400, seed=3)
    blend = result["pairs"][0]["models"][2]
    oof_b = pd.read_parquet(ArtifactPaths(better).oof_stack)
    assert blend["pauc_b"] == pytest.approx(pauc(oof_b["target"], oof_b["score"]))
    assert blend["diff"] == pytest.approx(blend["pauc_b"] - blend["pauc_a"])
    assert 0 < blend["low"] < blend["diff"] < blend["high"]
    assert blend["share_b_not_better"] < 0.025
    swapped = compare_runs([better], [worse], n_resamples=400, seed=3)["pairs"][0]["models"][2]
    assert swapped["diff"] == pytest.approx(-blend["diff"])
    assert swapped["high"] < 0
    assert compare_runs([worse], [better], n_resamples=400, seed=3) == result  # seeded


def test_runs_on_different_fold_files_are_refused_naming_both(tmp_path):
    a = _run(tmp_path / "a", _truth(0), 1.0, 0)
    b = _run(tmp_path / "b", _truth(0), 1.0, 1)
    folds = pd.read_csv(ArtifactPaths(b).folds)
    folds["fold"] = assign_folds(folds, 5, seed=7)["fold"]
    folds.to_csv(ArtifactPaths(b).folds, index=False)
    with pytest.raises(CompareError, match=f"{ArtifactPaths(a).folds} and {ArtifactPaths(b).folds} differ"):
        compare_runs([a], [b])


def test_several_seeds_give_a_paired_t_test(tmp_path):
    runs_a, runs_b = [], []
    for s in range(3):
        truth = _truth(10 + s)
        runs_a.append(_run(tmp_path / f"a{s}", truth, 2.0, s))
        runs_b.append(_run(tmp_path / f"b{s}", truth, 0.3, 100 + s))
    result = compare_runs(runs_a, runs_b, n_resamples=100)
    from scipy.stats import ttest_rel

    blend = next(t for t in result["seed_test"] if t["model"] == "blend")
    a = [p["models"][2]["pauc_a"] for p in result["pairs"]]
    b = [p["models"][2]["pauc_b"] for p in result["pairs"]]
    assert blend["n_seeds"] == 3 and blend["mean_diff"] == pytest.approx(np.mean(np.subtract(b, a)))
    assert blend["p_value"] == pytest.approx(ttest_rel(b, a).pvalue) and blend["p_value"] < 0.05
    assert "paired t-test over the 3 pairs above" in format_comparison(result)
    same = compare_runs(runs_a[:2], runs_a[:2], n_resamples=50)["seed_test"][0]
    assert same["mean_diff"] == 0.0 and same["p_value"] == 1.0 and same["t"] is None



def test_the_seed_test_covers_the_models_every_pair_has(tmp_path):
    """A pair whose runs lack the tabular score (a stacker without the fallback variant) beside one that has
    it: the pairs still compare, and the t-test covers CNN and blend only."""
    runs_a, runs_b = [], []
    for s in range(3):
        truth = _truth(20 + s)
        runs_a.append(_run(tmp_path / f"a{s}", truth, 2.0, s))
        runs_b.append(_run(tmp_path / f"b{s}", truth, 0.3, 100 + s))
    for run in (runs_a[1], runs_b[1]):
        oof = pd.read_parquet(ArtifactPaths(run).oof_stack)
        oof.drop(columns="score_tabular").to_parquet(ArtifactPaths(run).oof_stack)
    result = compare_runs(runs_a, runs_b, n_resamples=50)
    assert [m["model"] for m in result["pairs"][1]["models"]] == ["cnn", "blend"]
    assert [t["model"] for t in result["seed_test"]] == ["cnn", "blend"]
    blend = result["seed_test"][1]
    diffs = [next(m["diff"] for m in p["models"] if m["model"] == "blend") for p in result["pairs"]]
    assert blend["n_seeds"] == 3 and blend["mean_diff"] == pytest.approx(np.mean(diffs))


def test_cli_prints_the_table_and_writes_json(tmp_path):
    truth = _truth(2)
    a, b = _run(tmp_path / "a", truth, 2.0, 0), _run(tmp_path / "b", truth, 0.5, 1)
    shutil.copy2(ArtifactPaths(a).folds, ArtifactPaths(b).folds)
    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(out), "--resamples", "200"])
    assert res.exit_code == 0, res.output
    assert "B - A" in res.output and "blend" in res.output and "top-15" in res.output
    assert read_json(out)["pairs"][0]["b"] == str(b)
    res = CliRunner().invoke(app, ["compare", str(a), str(b), str(a)])
    assert res.exit_code != 0 and "even number" in str(res.exception)
