"""How far a finished demo run's blend is from what its halves allow (docs/experiments/2026-11-23-cnn-recipe.md).

The demo's label is a logistic model of a tabular half (how unlike the patient's other lesions a lesion
is, plus age) and a hidden image cue. This script takes a finished `run` on a demo folder and prints the
pAUC of the truth, of each hidden half and of the run's tabular GBDT and CNN, then trains the stacker
twice on the run's own feature table and folds: once as the run did, and once with the CNN score replaced
by the hidden cue itself (a perfect image reader), its `cnn_*` features rebuilt by the same feature
function. The second blend is what the stacker could reach if the CNN saw all of the cue. The cue is a
standard normal; the stacker gets its logistic (positive, in the same order, like a CNN probability), so
that `cnn_score_over_patient_mean` means what it means for a CNN score.

    python benchmarks/bench_blend_ceiling.py demo/artifacts --seed 0
    python benchmarks/bench_blend_ceiling.py runs/large --seed 2 --patients 600 --config configs/stack/demo.yaml

The demo's hidden halves are re-drawn from its seed and patient count (`make_tables`); the script refuses
a run whose training ids or labels differ from them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

from lesionstack.config import load_config
from lesionstack.data.demo_tables import make_tables
from lesionstack.data.metadata import id_mismatch
from lesionstack.data.synthetic import DemoSpec
from lesionstack.folds import read_folds
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.features import CNN_PREFIX, cnn_features
from lesionstack.tabular.stack import train_stack
from lesionstack.tabular.stack_config import StackConfig

ROOT = Path(__file__).resolve().parents[1]


def hidden_halves(art: ArtifactPaths, spec: DemoSpec) -> pd.DataFrame:
    """The demo's truth rows (target, probability, tabular_score, image_cue, patient_id) in fold-file order."""
    tables = make_tables(spec)
    folds = read_folds(art.folds)
    truth = tables.truth.merge(tables.train[["isic_id", "patient_id"]], on="isic_id")
    demo = f"the demo of --seed {spec.seed} and --patients {spec.patients}"
    if (diff := id_mismatch(folds["isic_id"], truth["isic_id"])) is not None:
        raise SystemExit(f"{art.folds}: its isic_ids are not those of {demo}: {diff}")
    rows = folds[["isic_id", "fold", "target"]].merge(truth, on="isic_id", suffixes=("", "_demo"))
    if (bad := rows["target"] != rows["target_demo"]).any():  # e.g. another --positive-rate
        raise SystemExit(f"{art.folds}: {int(bad.sum())} target(s) differ from {demo}, "
                         f"e.g. {rows.loc[bad, 'isic_id'].head(3).tolist()}")
    return rows.drop(columns="target_demo")


def blend_with(features: pd.DataFrame, scores: pd.DataFrame, art: ArtifactPaths, cfg: StackConfig) -> float:
    """Train the stacker on `features` with the run's folds, writing to a scratch folder (never the run's);
    its pooled OOF blend pAUC."""
    with tempfile.TemporaryDirectory() as tmp:
        cv = train_stack(features, art.folds, ArtifactPaths(Path(tmp)), cfg, cnn_oof=scores)
    return float(cv["models"]["blend"]["pauc_oof"])


def cue_features(features: pd.DataFrame, truth: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`features` with every `cnn_*` column rebuilt from the hidden cue, and the cue as an OOF score table."""
    scores = truth[["isic_id", "fold"]].assign(score=expit(truth["image_cue"].to_numpy()))
    rebuilt = cnn_features(truth[["isic_id", "patient_id"]], scores[["isic_id", "score"]])
    rebuilt.index = truth["isic_id"].to_numpy()  # cnn_features keeps the metadata's row order
    out = features.set_index("isic_id")
    cols = [c for c in out.columns if c.startswith(CNN_PREFIX)]
    out[cols] = rebuilt.loc[out.index, cols].to_numpy(np.float32)
    return out.reset_index(), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, help="a finished `lesionstack run` on a demo folder")
    parser.add_argument("--seed", type=int, default=0, help="the demo-data seed of that folder")
    parser.add_argument("--patients", type=int, default=DemoSpec().patients)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/stack/demo.yaml")
    args = parser.parse_args()
    art = ArtifactPaths(args.artifacts)
    missing = [p for p in (art.folds, art.features_train, art.oof_cnn, art.oof_stack) if not p.is_file()]
    if missing:
        raise SystemExit(f"{args.artifacts}: not a finished run with CNN scores; missing {[str(p) for p in missing]}")
    cfg = load_config(StackConfig, args.config)
    truth = hidden_halves(art, DemoSpec(seed=args.seed, patients=args.patients))
    features = pd.read_parquet(art.features_train)
    cnn = pd.read_parquet(art.oof_cnn)
    oof = pd.read_parquet(art.oof_stack).set_index("isic_id").loc[truth["isic_id"]]
    y = truth["target"].to_numpy()
    cue_feats, cue_scores = cue_features(features, truth)
    ceiling = blend_with(cue_feats, cue_scores, art, cfg)
    run_blend = blend_with(features, cnn, art, cfg)  # retrained with this config (untuned): like the ceiling
    rows = [
        ("truth", pauc(y, truth["probability"]), None),
        ("tabular half (hidden)", pauc(y, truth["tabular_score"]), None),
        ("tabular GBDT (the run)", pauc(y, oof["score_tabular"]), "tabular half (hidden)"),
        ("image cue (hidden)", pauc(y, truth["image_cue"]), None),
        ("CNN (the run)", pauc(y, oof["score_cnn"]), "image cue (hidden)"),
        ("blend (the run)", pauc(y, oof["score"]), "truth"),
        ("blend retrained here", run_blend, "truth"),
        ("blend, cue in place of CNN", ceiling, "truth"),
    ]
    values = {name: value for name, value, _ in rows}
    print(f"{args.artifacts}: pooled OOF pAUC (stacker: {args.config})")
    for name, value, of in rows:
        share = f"  ({value / values[of]:.1%} of the {of})" if of else ""
        print(f"  {name:>27}  {value:.4f}{share}")


if __name__ == "__main__":
    main()
