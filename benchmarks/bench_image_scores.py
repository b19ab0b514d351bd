"""Measure the stacker's image-score options and the archive pretraining on finished demo runs.

Arms of the stacker (`StackConfig` keys) are trained on one run's own feature table, folds and CNN OOF
scores (the same CNN for every arm: the options act on the stacker only), each in `RUN/arms/<arm>/`
(resumable); archive pretraining is compared as two whole runs (`--pair`). Every difference is the paired
patient bootstrap of the pooled OOF pAUC (1,000 resamples of whole patients, the same resamples for both
arms, 95% percentile interval), and each blend is also given as a share of the truth's pAUC (the demo's
`demo-truth.csv` probability: the goal is 90%).

    python benchmarks/bench_image_scores.py arms DATA=RUN [DATA=RUN ...] --config configs/stack/demo.yaml
    python benchmarks/bench_image_scores.py pair DATA=RUN_A=RUN_B [...]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack.config import load_config
from lesionstack.folds import read_folds
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report.stats import WeightedROC
from lesionstack.tabular.stack import StackConfig, train_stack

ARMS = {
    "base": {},
    "standardise": {"cnn_standardise": True},
    "noise": {"cnn_noise": 0.1},
    "standardise+noise": {"cnn_standardise": True, "cnn_noise": 0.1},
    "lof": {"use_lof": True},
    "all": {"cnn_standardise": True, "cnn_noise": 0.1, "use_lof": True},
}


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, patients: np.ndarray, n: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(pAUC(b) - pAUC(a), 2.5% and 97.5% quantiles over patient resamples shared by both scores)."""
    codes = pd.factorize(patients)[0]
    groups = int(codes.max()) + 1
    roc_a, roc_b = WeightedROC(y, a, codes), WeightedROC(y, b, codes)
    pos = np.bincount(codes, weights=y, minlength=groups)
    rows = np.bincount(codes, minlength=groups)
    rng, diffs = np.random.default_rng(seed), []
    while len(diffs) < n:
        counts = np.bincount(rng.integers(0, groups, groups), minlength=groups)
        if 0 < counts @ pos < counts @ rows:
            diffs.append(roc_b.scores(counts)[0] - roc_a.scores(counts)[0])
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return pauc(y, b) - pauc(y, a), float(lo), float(hi)


def truth_pauc(data: Path, folds: pd.DataFrame) -> float:
    truth = pd.read_csv(DataPaths(data).demo_truth)
    rows = folds[["isic_id", "target"]].merge(truth[["isic_id", "probability"]], on="isic_id")
    return pauc(rows["target"].to_numpy(), rows["probability"].to_numpy())


def run_arms(data: Path, run: Path, cfg: StackConfig, arms: list[str]) -> list[dict]:
    art = ArtifactPaths(run)
    folds = read_folds(art.folds)
    feats = pd.read_parquet(art.features_train)
    truth = truth_pauc(data, folds)
    scores = {}
    for arm in arms:
        out = ArtifactPaths(run / "arms" / arm)
        out.root.mkdir(parents=True, exist_ok=True)
        out.folds.write_bytes(art.folds.read_bytes())
        train_stack(feats, out.folds, out, dataclasses.replace(cfg, **ARMS[arm]), cnn_oof=art.oof_cnn)
        oof = pd.read_parquet(out.oof_stack).set_index("isic_id").loc[folds["isic_id"]]
        scores[arm] = oof["score"].to_numpy()
        cnn = oof["score_cnn"].to_numpy()
    y, patients = folds["target"].to_numpy(), folds["patient_id"].to_numpy()
    rows = []
    for arm in arms:
        diff, lo, hi = paired_bootstrap(y, scores["base"], scores[arm], patients)
        blend = pauc(y, scores[arm])
        rows.append({"set": data.name, "arm": arm, "blend": blend, "of_truth": blend / truth,
                     "diff": diff, "low": lo, "high": hi, "cnn": pauc(y, cnn), "truth": truth})
    return rows


def run_pair(data: Path, run_a: Path, run_b: Path) -> list[dict]:
    a, b = ArtifactPaths(run_a), ArtifactPaths(run_b)
    folds = read_folds(a.folds)
    y, patients = folds["target"].to_numpy(), folds["patient_id"].to_numpy()
    truth = truth_pauc(data, folds)
    rows = []
    for what, path, col in (("cnn", "oof_cnn", "score"), ("blend", "oof_stack", "score")):
        sa = pd.read_parquet(getattr(a, path)).set_index("isic_id").loc[folds["isic_id"], col].to_numpy()
        sb = pd.read_parquet(getattr(b, path)).set_index("isic_id").loc[folds["isic_id"], col].to_numpy()
        diff, lo, hi = paired_bootstrap(y, sa, sb, patients)
        rows.append({"set": data.name, "score": what, "a": pauc(y, sa), "b": pauc(y, sb), "diff": diff, "low": lo,
                     "high": hi, "b_of_truth": pauc(y, sb) / truth, "a_of_truth": pauc(y, sa) / truth})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("arms", "pair"))
    parser.add_argument("runs", nargs="+", help="DATA=RUN (arms) or DATA=RUN_A=RUN_B (pair)")
    parser.add_argument("--config", type=Path, default=None, help="stack config YAML (arms)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        parts = [Path(p) for p in spec.split("=")]
        if args.mode == "arms":
            rows += run_arms(parts[0], parts[1], load_config(StackConfig, args.config), args.arms.split(","))
        else:
            rows += run_pair(parts[0], parts[1], parts[2])
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.round(4).to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
