"""Measure the stacker's image-score options and the archive pretraining on finished demo runs.

Arms of the stacker (`StackConfig` keys) are trained on one run's own feature table, folds and CNN OOF
scores (the same CNN for every arm: the options act on the stacker only), each in `RUN/arms/<arm>/`
(resumable); archive pretraining is compared as two whole runs on one fold file (`pair`). Every difference
is the paired patient bootstrap of the pooled OOF pAUC that `lesionstack compare` computes (2,000
resamples of whole patients, the same ones for both sides, 95% percentile interval); each blend is also
given as a share of the truth's pAUC (the demo's `demo-truth.csv` probability; the goal is 90%).

    python benchmarks/bench_image_scores.py arms DATA=RUN [DATA=RUN ...] --config configs/stack/demo.yaml
    python benchmarks/bench_image_scores.py pair DATA=RUN_A=RUN_B [...]
    python benchmarks/bench_image_scores.py arms DATA=RUN --config C.yaml --base-run --arms standardise,lof

`--base-run`: the run's own stacker is the base arm (it must have been trained with `--config`, checked
against its saved fold config), so only the arms are trained. Arms that change the tabular features (`lof`,
`neg30`) also train the tabular fallback variant, so the table gives the tabular difference too.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pandas as pd

from lesionstack.config import ensure_same_config, load_config
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
    "neg30": {"neg_pos_ratio": 30.0},  # the tabular half's lever: 3x the negatives per positive and seed
}
TABULAR_ARMS = ("lof", "all", "neg30")  # arms that change what the tabular variant sees


def truth_pauc(data: Path, folds: pd.DataFrame) -> float:
    truth = pd.read_csv(DataPaths(data).demo_truth)
    rows = folds[["isic_id", "target"]].merge(truth[["isic_id", "probability"]], on="isic_id")
    return pauc(rows["target"].to_numpy(), rows["probability"].to_numpy())


def _diffs(run_a: Path, run_b: Path) -> dict[str, dict]:
    """`lesionstack compare`'s paired patient bootstrap of B - A, per model (cnn, tabular, blend)."""
    result = compare_runs([run_a], [run_b])
    return {m["model"]: m for m in result["pairs"][0]["models"]}


def arms_dir(run: Path, seeds: tuple[int, ...] | None) -> Path:
    """Where the arms of `run` go: RUN/arms, or RUN/arms/seeds-3-4-5 for another set of stacker seeds."""
    return run / "arms" / ("seeds-" + "-".join(map(str, seeds)) if seeds else "")


def run_arms(data: Path, run: Path, cfg: StackConfig, arms: list[str], base_run: bool = False,
             seeds: tuple[int, ...] | None = None) -> list[dict]:
    """Train each stacker arm on `run`'s features, folds and CNN OOF scores; each arm against the base (the
    run's own stacker with `base_run`, else a `base` arm trained here). `seeds`: the stacker's seeds instead
    of the config's (a replicate for `lesionstack compare`'s paired test over seeds; the base is retrained)."""
    art, where = ArtifactPaths(run), arms_dir(run, seeds)
    base_run = base_run and not seeds
    cfg = dataclasses.replace(cfg, seeds=seeds) if seeds else cfg
    folds = read_folds(art.folds)
    feats = pd.read_parquet(art.features_train)
    truth = truth_pauc(data, folds)
    if base_run:
        ensure_same_config(cfg, art.stack_fold(0).config)
    for arm in ([] if base_run else ["base"]) + arms:
        out = ArtifactPaths(where / arm)
        out.root.mkdir(parents=True, exist_ok=True)
        out.folds.write_bytes(art.folds.read_bytes())
        # the arms compare blends: the fallback variant only where the arm changes the tabular features
        arm_cfg = dataclasses.replace(cfg, train_tabular=base_run and arm in TABULAR_ARMS, **ARMS[arm])
        train_stack(feats, out.folds, out, arm_cfg, cnn_oof=art.oof_cnn)
    rows = []
    for arm in arms:
        for model, d in _diffs(run if base_run else where / "base", where / arm).items():
            if model == "cnn":
                continue  # the same CNN scores in every arm
            rows.append({"set": data.name, "arm": arm, "model": model, "base": d["pauc_a"], "arm_pauc": d["pauc_b"],
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
    parser.add_argument("--base-run", action="store_true", help="the run's own stacker is the base arm")
    parser.add_argument("--seeds", default=None, help="stacker seeds instead of the config's, e.g. 3,4,5")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        parts = [Path(p) for p in spec.split("=")]
        if args.mode == "arms":
            rows += run_arms(parts[0], parts[1], load_config(StackConfig, args.config), args.arms.split(","),
                             args.base_run, tuple(map(int, args.seeds.split(","))) if args.seeds else None)
        else:
            rows += run_pair(parts[0], parts[1], parts[2])
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.round(4).to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
