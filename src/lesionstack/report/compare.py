"""Is a change real? Two runs on the same folds, compared on their out-of-fold scores.

    lesionstack compare RUN_A RUN_B                  # one pair: B - A with a paired patient bootstrap
    lesionstack compare A1 A2 A3 B1 B2 B3            # three CV seeds: pairs (A1, B1), ...; plus a paired t-test

For each model (CNN, tabular, blend) the pooled OOF pAUC of both runs, the difference B - A and its 95%
interval from a paired bootstrap over patients: each resample draws patients with replacement, and the same
draw weights both runs' scores, so the noise the two runs share (which patients happen to be in the data)
cancels. A run compared with itself differs by exactly 0 in every resample. With several pairs (one per CV
seed, each pair on its own fold file), the per-seed differences also go into a paired t-test, the test the
1st place of ISIC 2024 required before accepting a change (over 10 CV seeds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionstack.files import write_json
from lesionstack.folds import FoldError, read_folds
from lesionstack.metrics import pauc, top_n_sensitivity
from lesionstack.paths import ArtifactPaths
from lesionstack.report.inputs import ReportError, add_cnn_scores, read_oof_stack
from lesionstack.report.stats import WeightedROC

COMPARED = {"cnn": "score_cnn", "tabular": "score_tabular", "blend": "score"}
LABELS = {"cnn": "CNN", "tabular": "tabular", "blend": "blend"}


class CompareError(ReportError):
    """Runs that cannot be compared (other folds, other lesions, a model missing from one side)."""


@dataclass(frozen=True)
class PairDiff:
    """One model in one pair of runs: pooled OOF pAUC of each, B - A, its bootstrap interval."""

    model: str
    pauc_a: float
    pauc_b: float
    diff: float
    low: float
    high: float
    share_b_not_better: float  # resamples where B - A <= 0: a one-sided bootstrap p-value
    top15_a: float
    top15_b: float


@dataclass(frozen=True)
class SeedTest:
    """Paired t-test over CV seeds of one model's pooled OOF pAUC (B against A)."""

    model: str
    n_seeds: int
    mean_diff: float
    std_diff: float
    t: float | None  # None when every seed's difference is the same (t is undefined)
    p_value: float


def load_run(root: Path) -> tuple[pd.DataFrame, Path]:
    """A run's OOF table (isic_id, target, patient_id and the compared score columns) and its fold file."""
    paths = ArtifactPaths(Path(root))
    if not paths.root.is_dir():
        raise CompareError(f"{paths.root}: no such artifacts root")
    try:
        folds = read_folds(paths.folds)
    except FoldError as err:
        raise CompareError(f"{paths.root}: {err}") from err
    oof = add_cnn_scores(read_oof_stack(paths.oof_stack), paths.oof_cnn, [])
    oof = oof.drop(columns=["patient_id"], errors="ignore").merge(
        folds[["isic_id", "patient_id"]], on="isic_id", how="left")
    if oof["patient_id"].isna().any():
        row = int(np.flatnonzero(oof["patient_id"].isna().to_numpy())[0])
        raise CompareError(f"{paths.oof_stack}: isic_id {oof['isic_id'].iloc[row]!r} (row {row}) is not in "
                           f"{paths.folds}")
    return oof, paths.folds


def check_same_folds(folds_a: Path, folds_b: Path) -> None:
    """Refuse two runs whose fold files differ: their OOF scores would come from different splits."""
    if folds_a.read_bytes() != folds_b.read_bytes():
        raise CompareError(f"{folds_a} and {folds_b} differ: compare needs both runs trained on one fold file "
                           "(copy one run's folds.csv into the other's artifacts root before training it)")


def compare_pair(a: pd.DataFrame, b: pd.DataFrame, n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0, where: tuple[str, str] = ("A", "B")) -> list[PairDiff]:
    """B - A per model present in both, with a paired patient-bootstrap interval (seeded)."""
    if set(a["isic_id"]) != set(b["isic_id"]):
        only = sorted(set(a["isic_id"]) ^ set(b["isic_id"]))
        raise CompareError(f"{where[0]} and {where[1]} score different lesions ({len(only)} differ, e.g. "
                           f"{only[0]!r})")
    b = b.set_index("isic_id").loc[a["isic_id"]].reset_index()
    if not np.array_equal(a["target"].to_numpy(), b["target"].to_numpy()):
        raise CompareError(f"{where[0]} and {where[1]} disagree on the labels (column 'target')")
    models = [m for m, col in COMPARED.items() if col in a and col in b]
    if not models:
        raise CompareError(f"{where[0]} and {where[1]} share no scored model (CNN, tabular or blend)")
    y = a["target"].to_numpy()
    codes = pd.factorize(a["patient_id"])[0]
    counts = _resample_counts(y, codes, n_resamples, seed)
    out = []
    for m in models:
        col = COMPARED[m]
        roc_a, roc_b = WeightedROC(y, a[col], codes), WeightedROC(y, b[col], codes)
        diffs = np.array([roc_b.scores(c)[0] - roc_a.scores(c)[0] for c in counts])
        lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
        pa, pb = pauc(y, a[col]), pauc(y, b[col])
        out.append(PairDiff(m, pa, pb, pb - pa, float(lo), float(hi), float(np.mean(diffs <= 0)),
                            top_n_sensitivity(y, a[col], a["patient_id"]),
                            top_n_sensitivity(y, b[col], b["patient_id"])))
    return out


def _resample_counts(y: np.ndarray, codes: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Patient draw counts for `n` resamples holding both classes (the same list serves both runs)."""
    n_groups = int(codes.max()) + 1
    pos = np.bincount(codes, weights=y, minlength=n_groups)
    rows = np.bincount(codes, minlength=n_groups)
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for _ in range(10 * n):
        c = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        if 0 < c @ pos < c @ rows:
            out.append(c)
            if len(out) == n:
                break
    return out


def seed_tests(pairs: list[list[PairDiff]]) -> list[SeedTest]:
    """Paired t-test over the pairs (one per CV seed) of each model's pooled OOF pAUC; needs 2+ pairs. Only
    the models every pair has are tested (a run without the tabular fallback variant has no tabular score)."""
    from scipy.stats import ttest_rel

    out = []
    for m in [d.model for d in pairs[0] if all(any(e.model == d.model for e in p) for p in pairs)]:
        a = np.array([next(d.pauc_a for d in p if d.model == m) for p in pairs])
        b = np.array([next(d.pauc_b for d in p if d.model == m) for p in pairs])
        diff = b - a
        if np.all(diff == diff[0]):  # a constant difference (e.g. a run against itself): t is undefined
            t, p = None, (1.0 if diff[0] == 0 else 0.0)
        else:
            res = ttest_rel(b, a)
            t, p = float(res.statistic), float(res.pvalue)
        out.append(SeedTest(m, len(pairs), float(diff.mean()), float(diff.std(ddof=1)), t, p))
    return out


def compare_runs(runs_a: list[Path], runs_b: list[Path], n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> dict[str, Any]:
    """Compare run A_i with run B_i for each i (same fold file per pair); the JSON-ready result."""
    if len(runs_a) != len(runs_b) or not runs_a:
        raise CompareError(f"compare needs as many B runs as A runs (pairs by CV seed); got {len(runs_a)} A "
                           f"and {len(runs_b)} B")
    pairs, result = [], {"n_resamples": n_resamples, "level": level, "seed": seed, "pairs": []}
    for ra, rb in zip(runs_a, runs_b):
        (oof_a, folds_a), (oof_b, folds_b) = load_run(ra), load_run(rb)
        check_same_folds(folds_a, folds_b)
        diffs = compare_pair(oof_a, oof_b, n_resamples, level, seed, (str(ra), str(rb)))
        pairs.append(diffs)
        result["pairs"].append({"a": str(ra), "b": str(rb), "folds": str(folds_a),
                                "models": [asdict(d) for d in diffs]})
    if len(pairs) >= 2:
        result["seed_test"] = [asdict(t) for t in seed_tests(pairs)]
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """The result as a table a person reads (what `lesionstack compare` prints)."""
    level = f"{result['level']:.0%}"
    lines = [f"pooled OOF pAUC (max 0.2), B - A with a paired {level} interval over {result['n_resamples']} "
             f"patient resamples (seed {result['seed']}); positive: B is better"]
    head = f"{'model':<8} {'pAUC A':>8} {'pAUC B':>8} {'B - A':>9}  {level + ' interval':<21} {'P(B<=A)':>7} " \
           f"{'top-15 A':>8} {'top-15 B':>8}"
    for pair in result["pairs"]:
        lines += ["", f"A: {pair['a']}", f"B: {pair['b']}  (folds: {pair['folds']})", head]
        for d in pair["models"]:
            lines.append(f"{LABELS[d['model']]:<8} {d['pauc_a']:8.4f} {d['pauc_b']:8.4f} {d['diff']:+9.4f}  "
                         f"[{d['low']:+.4f}, {d['high']:+.4f}]{'':<3} {d['share_b_not_better']:7.3f} "
                         f"{d['top15_a']:8.3f} {d['top15_b']:8.3f}")
    if "seed_test" in result:
        n = result["seed_test"][0]["n_seeds"]
        lines += ["", f"paired t-test over the {n} pairs above (each a CV seed, stacker seed or data set), "
                      "pooled OOF pAUC:",
                  f"{'model':<8} {'mean B - A':>10} {'sd':>8} {'t':>7} {'p':>7}"]
        for t in result["seed_test"]:
            stat = "-" if t["t"] is None else f"{t['t']:.2f}"
            lines.append(f"{LABELS[t['model']]:<8} {t['mean_diff']:+10.4f} {t['std_diff']:8.4f} {stat:>7} "
                         f"{t['p_value']:7.3f}")
    return "\n".join(lines)


def write_comparison(result: dict[str, Any], out: Path) -> Path:
    """The JSON file beside the printed table (atomically)."""
    return write_json(out, result)
