"""Benchmark the features and the stacker on demo metadata of the real size.

    .venv/bin/python benchmarks/bench_stack.py [--patients 1042] [--lesions 385] [--full] [--skip-lgbm]

Draws metadata only (no images) with the demo generator, then prints wall time and peak memory of
`build_features`, a 5-fold single-seed LightGBM stage, and with `--full` the whole 5-fold, 3-model stacker
of configs/stack/default.yaml as `lesionstack train-stack` runs it, in a child process (with a proxy CNN
score from the demo's hidden image cue, so the tabular variant is trained too). Peak memory: the process's
max RSS (resource.getrusage), which only grows; for the stacker, its own process's.
The load average is printed at the start and the end: on a shared machine wall time depends on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack.config import load_config, save_config
from lesionstack.data.demo_tables import make_tables
from lesionstack.data.synthetic import DemoSpec
from lesionstack.folds import assign_folds
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.features import build_features
from lesionstack.tabular.stack import format_cv, train_stack
from lesionstack.tabular.stack_config import StackConfig

ROOT = Path(__file__).resolve().parents[1]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(label: str, fn, *args, **kwargs):  # noqa: ANN001, ANN201 - a tiny timing helper
    """Wall and CPU seconds (CPU: the honest figure on a shared, busy machine)."""
    t0, c0 = time.perf_counter(), cpu_s()
    out = fn(*args, **kwargs)
    print(f"{label}: {time.perf_counter() - t0:.1f} s wall, {cpu_s() - c0:.1f} s CPU, "
          f"peak RSS so far {peak_gb():.2f} GB", flush=True)
    return out


def full_stacker(feats: pd.DataFrame, folds: pd.DataFrame, cnn: pd.DataFrame, cfg: StackConfig,
                 art: ArtifactPaths) -> None:
    """`lesionstack train-stack` in a child process on these inputs: its wall, CPU and peak RSS alone."""
    art.features_train.parent.mkdir(parents=True, exist_ok=True)
    feats.to_parquet(art.features_train, index=False)
    folds.to_csv(art.folds, index=False)
    cnn.to_parquet(art.oof_cnn, index=False)
    config = save_config(cfg, art.root / "stack.yaml")
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, "-m", "lesionstack.cli", "train-stack", "--artifacts", str(art.root),
                    "--config", str(config)], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"5-fold 3-model stacker, `lesionstack train-stack` ({len(cfg.seeds)} seeds, + tabular variant): "
          f"{time.perf_counter() - t0:.1f} s wall, {cpu:.1f} s CPU, its peak RSS {after.ru_maxrss / 1024**2:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1042)
    ap.add_argument("--lesions", type=float, default=385.0)
    ap.add_argument("--positive-rate", type=float, default=0.001, help="real data: 393 / 401,059")
    ap.add_argument("--full", action="store_true", help="also train the whole 3-model stacker")
    ap.add_argument("--skip-lgbm", action="store_true", help="skip the single-seed LightGBM stage")
    ap.add_argument("--n-jobs", type=int, help="threads per booster (default: the config's)")
    ap.add_argument("--workers", type=int, help="fits at once (default: the config's)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()} on {os.cpu_count()} CPUs", flush=True)

    spec = DemoSpec(patients=args.patients, lesions_per_patient=args.lesions, positive_rate=args.positive_rate,
                    test_fraction=0.0)
    tables = timed("demo metadata", make_tables, spec)
    train = tables.train
    print(f"rows {len(train)}, patients {train['patient_id'].nunique()}, positives {int(train['target'].sum())}")
    feats = timed("features (no CNN)", build_features, train)
    print(f"feature table: {feats.shape[1] - 1} features, {feats.memory_usage(deep=True).sum() / 1e9:.2f} GB")
    folds = timed("folds", assign_folds, train, 5, 0)
    cue = tables.truth.set_index("isic_id").loc[train["isic_id"], "image_cue"].to_numpy()
    rng = np.random.default_rng(0)
    # PROXY CNN score (no CNN is trained here): a noisy function of the demo's hidden image cue
    cnn = pd.DataFrame({"isic_id": train["isic_id"], "fold": folds["fold"],
                        "score": 1 / (1 + np.exp(-(1.8 * cue + rng.normal(size=len(cue)) - 4)))})
    feats_cnn = timed("features (with CNN)", build_features, train, cnn[["isic_id", "score"]])
    with tempfile.TemporaryDirectory() as tmp:
        art = ArtifactPaths(tmp)
        folds.to_csv(art.folds, index=False)
        runtime = {k: v for k, v in (("n_jobs", args.n_jobs), ("workers", args.workers)) if v is not None}
        base = load_config(StackConfig, ROOT / "configs" / "stack" / "default.yaml", use_tuned=False, **runtime)
        print(f"stacker: {len(base.seeds)} seeds, {base.n_rounds} rounds, {base.workers} workers x "
              f"{base.n_jobs} thread(s), params {base.params}", flush=True)
        if not args.skip_lgbm:
            lgbm = dataclasses.replace(base, models=("lgbm",), seeds=(0,), train_tabular=False)
            cv = timed("5-fold LightGBM stage (1 seed, with CNN)", train_stack, feats_cnn, art.folds,
                       ArtifactPaths(art.root / "lgbm"), lgbm, cnn_oof=cnn)
            print(format_cv(cv))
        if args.full:
            del tables, train, feats  # the stage runs in its own process, as `lesionstack train-stack` does
            full_stacker(feats_cnn, folds, cnn, base, ArtifactPaths(art.root / "full"))
    print(f"peak RSS {peak_gb():.2f} GB; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
