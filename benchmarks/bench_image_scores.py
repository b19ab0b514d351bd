"""Measure the stacker's image-score options and the archive pretraining on finished demo runs.

Arms of the stacker (`StackConfig` keys) are trained on one run's own feature table, folds and CNN OOF
scores (the same CNN for every arm: the options act on the stacker only), each in `RUN/arms/<arm>/`
(resumable); archive pretraining is compared as two whole runs on one fold file (`pair`). Every difference
is the paired patient bootstrap of the pooled OOF pAUC that `lesionstack compare` computes (2,000
resamples of whole patients, the same ones for both sides, 95% percentile interval); each blend is also
given as a share of the truth's pAUC (the demo's `demo-truth.csv` probability; the goal is 90%).

    python benchmarks/bench_image_scores.py arms DATA=RUN [DATA=RUN ...] --config configs/stack/demo.yaml
    python benchmarks/bench_image_scores.py pair DATA=RUN_A=RUN_B [...]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pandas as pd

from lesionstack.config import load_config
from lesionstack.folds import read_folds
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report.compare import compare_runs
from lesionstack.tabular.stack import train_stack
from lesionstack.tabular.stack_config import StackConfig

ARMS = {
    "base": {},
    "standardise": {"cnn_standardise": True},
    "noise": {"cnn_noise": 0.1},
    "standardise+noise": {"cnn_standardise": True, "cnn_noise": 0.1},
    "lof": {"use_lof": True},
    "all": {"cnn_standardise": True, "cnn_noise": 0.1, "use_lof": True},
}


def truth_pauc(data: Path, folds: pd.DataFrame) -> float:
    truth = pd.read_csv(DataPaths(data).demo_truth)
    rows = folds[["isic_id", "target"]].merge(truth[["isic_id", "probability"]], on="isic_id")
    return pauc(rows["target"].to_numpy(), rows["probability"].to_numpy())


def _diffs(run_a: Path, run_b: Path) -> dict[str, dict]:
    """`lesionstack compare`'s paired patient bootstrap of B - A, per model (cnn, tabular, blend)."""
    result = compare_runs([run_a], [run_b])
    return {m["model"]: m for m in result["pairs"][0]["models"]}


def run_arms(data: Path, run: Path, cfg: StackConfig, arms: list[str]) -> list[dict]:
    """Train each stacker arm on `run`'s features, folds and CNN OOF scores; each arm against `base`."""
    art = ArtifactPaths(run)
    folds = read_folds(art.folds)
    feats = pd.read_parquet(art.features_train)
    truth = truth_pauc(data, folds)
    cfg = dataclasses.replace(cfg, train_tabular=False)  # the arms compare blends: no fallback variant needed
    for arm in ["base", *arms]:
        out = ArtifactPaths(run / "arms" / arm)
        out.root.mkdir(parents=True, exist_ok=True)
        out.folds.write_bytes(art.folds.read_bytes())
        train_stack(feats, out.folds, out, dataclasses.replace(cfg, **ARMS[arm]), cnn_oof=art.oof_cnn)
    rows = []
    for arm in arms:
        d = _diffs(run / "arms" / "base", run / "arms" / arm)["blend"]
        rows.append({"set": data.name, "arm": arm, "base": d["pauc_a"], "blend": d["pauc_b"],
                     "of_truth": d["pauc_b"] / truth, "diff": d["diff"], "low": d["low"], "high": d["high"],
                     "truth": truth})
    return rows


def run_pair(data: Path, run_a: Path, run_b: Path) -> list[dict]:
    """Two whole runs on one fold file (e.g. without and with archive pretraining): CNN and blend."""
    truth = truth_pauc(data, read_folds(ArtifactPaths(run_a).folds))
    return [{"set": data.name, "score": m, "a": d["pauc_a"], "b": d["pauc_b"], "diff": d["diff"], "low": d["low"],
             "high": d["high"], "a_of_truth": d["pauc_a"] / truth, "b_of_truth": d["pauc_b"] / truth}
            for m, d in _diffs(run_a, run_b).items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("arms", "pair"))
    parser.add_argument("runs", nargs="+", help="DATA=RUN (arms) or DATA=RUN_A=RUN_B (pair)")
    parser.add_argument("--config", type=Path, default=None, help="stack config YAML (arms)")
    parser.add_argument("--arms", default=",".join(a for a in ARMS if a != "base"))
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
