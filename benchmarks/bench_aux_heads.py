"""OOF pAUC of the per-fold CNN with and without the auxiliary diagnosis heads (issue 15.6), in one run.

    .venv/bin/python benchmarks/bench_aux_heads.py DATA_DIR --folds FOLDS.csv --out DIR \\
        [--config configs/cnn/demo.yaml] [--labels configs/diagnosis/demo.yaml] [--weight 0.3] \\
        [--folds-only 0 1 2] [--segmenter model.pt] [--epochs N] [--val-every N]

Trains the CNN config twice on the same folds with the same seed: `aux_diagnosis: null` (DIR/off) and
`aux_diagnosis: {weight, labels}` with the `labels` section of a diagnosis config (DIR/on); a rerun resumes
or skips finished folds (train-cnn's own guard). Then scores each trained fold's validation rows with its
kept model, as train-cnn's OOF scores are made, and prints per fold and pooled (over the trained folds;
all of them: the OOF pAUC) the pAUC and AUC of both, and for the aux run the auxiliary heads' balanced
accuracy on the validation rows that have a class (all classes, and the malignant subtypes alone: what the
heads could learn only from subtype cues), and a paired patient bootstrap of the pooled pAUC difference.
Writes DIR/summary.json and DIR/{off,on}/scores.parquet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lesionstack.config import config_from_dict, read_config_dict
from lesionstack.data.dataset import CropDataset
from lesionstack.data.diagnosis import LabelMap, read_iddx_classes
from lesionstack.data.hdf5 import H5Images
from lesionstack.folds import read_folds
from lesionstack.metrics import balanced_accuracy, pauc, roc_auc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report.stats import WeightedROC
from lesionstack.runtime import RunSettings, Runtime, predict_logits, sigmoid
from lesionstack.train.aux_heads import AuxDiagnosisConfig
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig, load_cnn_config
from lesionstack.train.cnn_scores import scoring_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--folds", type=Path, required=True, help="fold file (lesionstack folds)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=Path("configs/cnn/demo.yaml"))
    p.add_argument("--labels", type=Path, default=Path("configs/diagnosis/demo.yaml"),
                   help="a diagnosis config whose `labels` section maps iddx to the classes")
    p.add_argument("--weight", type=float, default=0.3)
    p.add_argument("--folds-only", type=int, nargs="*", default=None)
    p.add_argument("--segmenter", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--val-every", type=int, default=None,
                   help="override val_every: with keep: last the per-epoch validation only watches, so "
                        "validating after the last epoch alone gives the same model in less time")
    return p.parse_args()


class AuxClass(torch.nn.Module):
    """The auxiliary heads' predicted class (argmax of logits 1..K) as the model's only output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, aux=True)[:, 1:].argmax(1).float()


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def train_variant(args: argparse.Namespace, name: str, aux: AuxDiagnosisConfig | None) -> dict[str, Any]:
    # one seed per fold: the aux heads are read from each fold's one model (and were measured so)
    cfg = load_cnn_config(args.config, segmenter=args.segmenter, epochs=args.epochs, val_every=args.val_every,
                          seeds_per_fold=1)
    cfg = dataclasses.replace(cfg, aux_diagnosis=aux)
    start, cpu, load = time.perf_counter(), cpu_seconds(), os.getloadavg()
    train_cnn(args.data_dir, args.folds, cfg, args.out / name, folds_only=args.folds_only)
    return {"cfg": cfg, "wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu,
            "load_before": load, "load_after": os.getloadavg()}


def score_variant(args: argparse.Namespace, name: str, cfg: CNNConfig, aux_labels: pd.Series) -> dict[str, Any]:
    """Per fold: pAUC/AUC of the kept model on the fold's rows (with the config's TTA), and the aux heads'
    balanced accuracy; pooled over the trained folds."""
    folds, art = read_folds(args.folds), ArtifactPaths(args.out / name)
    images = H5Images(DataPaths(args.data_dir).train_images)
    rt = Runtime(RunSettings.pick(cfg, progress=False), torch.device("cpu"), None)
    todo = args.folds_only if args.folds_only else sorted(int(k) for k in folds["fold"].unique())
    # all folds done: train-cnn's own OOF scores; else each trained fold's rows rescored the same way
    oof = pd.read_parquet(art.oof_cnn).set_index("isic_id")["score"] if art.oof_cnn.is_file() else None
    rows, parts = {}, []
    for k in todo:
        val = folds[folds["fold"] == k]
        model = scoring_model(cfg, art.cnn_fold(k).kept_weights, torch.device("cpu"))
        ds = CropDataset(images, val["isic_id"], val["target"], cfg.image_size)
        score = (oof.loc[ds.ids].to_numpy() if oof is not None
                 else sigmoid(predict_logits(model, ds, rt, desc=f"{name} fold {k}")))
        part = pd.DataFrame({"isic_id": ds.ids, "fold": k, "target": val["target"].to_numpy(), "score": score})
        if cfg.aux_diagnosis is not None:
            part["aux_pred"] = predict_logits(AuxClass(model), ds, rt, tta=False).astype(np.int64)
        parts.append(part)
        rows[k] = summarise(part, cfg, aux_labels)
        rows[k]["kept_epoch"] = json.loads(art.cnn_fold(k).metrics.read_text())["best_epoch"]
    pooled = pd.concat(parts, ignore_index=True)
    pooled.to_parquet(args.out / name / "scores.parquet", index=False)
    return {"folds": rows, "pooled": summarise(pooled, cfg, aux_labels)}


def paired_bootstrap(args: argparse.Namespace, n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """pAUC(on) - pAUC(off) on the same resampled patients (the pooled rows of both runs): mean, 95%
    percentile interval, and the share of resamples in which the heads score higher."""
    off, on = (pd.read_parquet(args.out / name / "scores.parquet") for name in ("off", "on"))
    rows = off.merge(on[["isic_id", "score"]], on="isic_id", suffixes=("_off", "_on"))
    rows = rows.merge(read_folds(args.folds)[["isic_id", "patient_id"]], on="isic_id")
    codes = pd.factorize(rows["patient_id"])[0]
    y, n = rows["target"].to_numpy(dtype=float), int(codes.max()) + 1
    curves = [WeightedROC(y, rows[f"score_{name}"].to_numpy(), codes) for name in ("off", "on")]
    positives, sizes = np.bincount(codes, weights=y, minlength=n), np.bincount(codes, minlength=n)
    rng, diffs = np.random.default_rng(seed), []
    while len(diffs) < n_resamples:
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        if 0 < counts @ positives < counts @ sizes:  # pAUC needs both classes
            diffs.append(curves[1].scores(counts)[0] - curves[0].scores(counts)[0])
    d = np.asarray(diffs)
    low, high = np.quantile(d, [0.025, 0.975])
    return {"delta_pauc": pauc(y, rows["score_on"]) - pauc(y, rows["score_off"]), "low": float(low),
            "high": float(high), "share_on_higher": float((d > 0).mean()), "n_resamples": n_resamples,
            "patients": n}


def summarise(part: pd.DataFrame, cfg: CNNConfig, aux_labels: pd.Series) -> dict[str, Any]:
    out = {"n": len(part), "positives": int(part["target"].sum()), "pauc": pauc(part["target"], part["score"]),
           "auc": roc_auc(part["target"], part["score"])}
    if "aux_pred" in part:
        y = aux_labels.reindex(part["isic_id"]).to_numpy()
        has, k = y >= 0, len(cfg.aux_diagnosis.labels.classes)
        out["aux_balanced_accuracy"] = balanced_accuracy(y[has], part["aux_pred"].to_numpy()[has], k)
        malignant = has & (part["target"].to_numpy() == 1)
        present = sorted(set(y[malignant]))
        recalls = [float((part["aux_pred"].to_numpy()[malignant & (y == c)] == c).mean()) for c in present]
        out["aux_malignant_subtype_recall"] = float(np.mean(recalls)) if recalls else None
    return out


def main() -> None:
    args = parse_args()
    labels = config_from_dict(LabelMap, read_config_dict(args.labels)["labels"], where=f"{args.labels}: labels")
    aux = AuxDiagnosisConfig(weight=args.weight, labels=labels)
    aux_labels = read_iddx_classes(DataPaths(args.data_dir).train_metadata, aux.labels)
    summary: dict[str, Any] = {"data": str(args.data_dir), "folds": str(args.folds), "config": str(args.config),
                               "labels": str(args.labels), "weight": args.weight, "folds_only": args.folds_only,
                               "epochs": args.epochs}
    for name, section in (("off", None), ("on", aux)):
        run = train_variant(args, name, section)
        summary[name] = {**score_variant(args, name, run.pop("cfg"), aux_labels), **run}
        print(name, json.dumps(summary[name]["pooled"]), f"wall {run['wall_s']:.0f} s, cpu {run['cpu_s']:.0f} s",
              flush=True)
    summary["paired_bootstrap"] = paired_bootstrap(args)
    print("pAUC on - off, patients resampled:", json.dumps(summary["paired_bootstrap"]))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print("| fold | pAUC off | pAUC on | AUC off | AUC on | aux bal. acc | aux subtype recall |")
    print("|---|---|---|---|---|---|---|")
    for key in [*summary["off"]["folds"], "pooled"]:
        off = summary["off"]["pooled"] if key == "pooled" else summary["off"]["folds"][key]
        on = summary["on"]["pooled"] if key == "pooled" else summary["on"]["folds"][key]
        print(f"| {key} | {off['pauc']:.4f} | {on['pauc']:.4f} | {off['auc']:.3f} | {on['auc']:.3f} | "
              f"{on['aux_balanced_accuracy']:.3f} | {on['aux_malignant_subtype_recall']:.3f} |")


if __name__ == "__main__":
    main()
