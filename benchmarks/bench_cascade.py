"""What a cascade costs in pAUC and saves in time, against scoring every crop with both model sets.

    .venv/bin/python benchmarks/bench_cascade.py FAST_ARTIFACTS SLOW_ARTIFACTS DATA [DATA ...] \
        [--overall 0.05 0.1 0.2] [--per-patient 1 2 3] [--slow-weight 0.5] [--json out.json]

FAST and SLOW are trained artifacts roots (CNN folds; `--folds 0` uses fold 0 only); each DATA is a labelled
data folder (`lesionstack demo-data`: train-image.hdf5 + train-metadata.csv) the models did not train on.
Per data set it scores every crop with the fast and with the slow models (timed), then for each cascade
(the top fraction overall, or the top k per patient, by the fast score) blends the slow score into the
picked rows (`inference.cascade.blend`) and reports: rows rescored, pAUC (0-0.2 above 80% TPR), the change
against scoring everything with both (the same blend on every row) with a 95% paired bootstrap interval
over patients, and the time (fast on all + slow per crop x rescored crops; one cascade is also run for
real through `cascade_hdf5` to check that estimate).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fast", type=Path)
    p.add_argument("slow", type=Path)
    p.add_argument("data", type=Path, nargs="+")
    p.add_argument("--folds", default=None, help="fold models to use, e.g. '0' (default: every one)")
    p.add_argument("--overall", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    p.add_argument("--per-patient", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--slow-weight", type=float, default=0.5)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def paired_interval(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray, n: int,
                    seed: int = 0) -> tuple[float, float]:
    """95% interval of pauc(a) - pauc(b), resampling whole patients (resamples without a positive redrawn)."""
    from lesionstack.metrics import pauc

    codes = pd.factorize(groups)[0]
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    rng, diffs = np.random.default_rng(seed), []
    while len(diffs) < n:
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[rows].sum() < len(rows):
            diffs.append(pauc(y[rows], a[rows]) - pauc(y[rows], b[rows]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)


def timed_scores(scorer, path: Path, ids: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    scores = scorer.score_hdf5(path, ids)["score"].to_numpy()
    return scores, time.perf_counter() - start


def one_set(fast, slow, data: Path, args: argparse.Namespace) -> list[dict]:
    from lesionstack.inference.cascade import CascadeConfig, blend, cascade_hdf5, pick_top
    from lesionstack.metrics import pauc

    meta = pd.read_csv(data / "train-metadata.csv", usecols=["isic_id", "patient_id", "target"])
    ids, y, patients = meta["isic_id"].astype(str).tolist(), meta["target"].to_numpy(), meta["patient_id"].to_numpy()
    h5 = data / "train-image.hdf5"
    f, t_fast = timed_scores(fast, h5, ids)
    s, t_slow = timed_scores(slow, h5, ids)
    everything = (1 - args.slow_weight) * f + args.slow_weight * s
    base = dict(data=data.name, crops=len(ids), positives=int(y.sum()), patients=len(set(patients)))
    rows = [dict(base, cascade="fast only", rescored=0, pauc=pauc(y, f), seconds=t_fast),
            dict(base, cascade="slow only", rescored=len(ids), pauc=pauc(y, s), seconds=t_slow),
            dict(base, cascade="both on every crop", rescored=len(ids), pauc=pauc(y, everything),
                 seconds=t_fast + t_slow)]
    configs = [(f"top {q:.0%} overall", CascadeConfig(top_k=round(q * len(ids)), slow_weight=args.slow_weight))
               for q in args.overall]
    configs += [(f"top {k} per patient", CascadeConfig(top_k=k, per_patient=True, slow_weight=args.slow_weight))
                for k in args.per_patient]
    for name, cfg in configs:
        pick = pick_top(f, cfg, patients)
        score = blend(f, s, pick, cfg)
        low, high = paired_interval(y, score, everything, patients, args.resamples)
        rows.append(dict(base, cascade=name, rescored=int(pick.sum()), pauc=pauc(y, score),
                         delta=pauc(y, score) - pauc(y, everything), delta_low=low, delta_high=high,
                         seconds=t_fast + t_slow * pick.sum() / len(ids)))
    check = CascadeConfig(top_k=round(0.1 * len(ids)), slow_weight=args.slow_weight)
    real = cascade_hdf5(fast, slow, h5, ids, check, patients)
    rows.append(dict(base, cascade="top 10% overall, run through cascade_hdf5", rescored=int(real["rescored"].sum()),
                     pauc=pauc(y, real["score"].to_numpy()), seconds=sum(real.attrs["seconds"].values())))
    return rows


def main() -> None:
    from lesionstack.trained.scorer import FoldScorer

    args = parse_args()
    folds = [int(k) for k in args.folds.split(",")] if args.folds else None
    fast = FoldScorer.load(args.fast, device="cpu", progress=False, folds=folds)
    slow = FoldScorer.load(args.slow, device="cpu", progress=False, folds=folds)
    rows = [row for data in args.data for row in one_set(fast, slow, data, args)]
    table = pd.DataFrame(rows)
    print("| set | cascade | rescored | pAUC | change vs both on every crop (95% CI, patients) | seconds |")
    print("|---|---|---:|---:|---|---:|")
    for r in table.itertuples():
        delta = getattr(r, "delta", np.nan)
        change = "" if pd.isna(delta) else f"{delta:+.4f} ({r.delta_low:+.4f}, {r.delta_high:+.4f})"
        print(f"| {r.data} | {r.cascade} | {r.rescored:,} | {r.pauc:.4f} | {change} | {r.seconds:.1f} |")
    if args.json:
        args.json.write_text(table.to_json(orient="records", indent=2) + "\n")


if __name__ == "__main__":
    main()
