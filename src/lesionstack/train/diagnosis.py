"""Train a K-class diagnosis classifier once per fold; write out-of-fold class probabilities.

    lesionstack train-diagnosis DATA --artifacts ARTIFACTS --config configs/diagnosis/demo.yaml

DATA is any of the three layouts of `lesionstack.data.diagnosis` (ISIC 2024, HAM10000, ISIC Task 3). The
folds group by lesion (HAM10000, Task 3) or patient (ISIC 2024) and are stratified on the class; they are
written once (`diagnosis/folds.csv`) and every fold model is checked against them.

The network is the gated model of the CNN stage with a K-way softmax head (`model.gate: none` for a plain
timm classifier). The rare classes are weighted in the cross-entropy (balance: weights, by inverse class
frequency) or drawn as often as the common ones (balance: sampler), and each fold keeps its last epoch (keep:
last, the default) or the epoch of best balanced accuracy on the fold it then scores (keep: best; cv.json
then says its OOF figures are optimistic).

Per fold folder (`ArtifactPaths.diagnosis_fold(k)`): `config.yaml` (written first), `inputs.json` (fold
file and classes), `checkpoint.pt` (after each epoch, removed at the end; never leaves the machine),
`model.safetensors` (the kept weights), `metrics.json`, `DONE` (last). A rerun skips DONE folds, resumes a
killed fold from its checkpoint and refuses a fold made by another config or other folds. When all folds
are done: `diagnosis/oof.parquet` (one probability column per class) and `diagnosis/cv.json`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from lesionstack import provenance
from lesionstack.config import ConfigError
from lesionstack.data.dataset import CropDataset, check_corrupt, training_crops
from lesionstack.data.diagnosis import CLASS_COLUMN, LABEL_COLUMN, PROB_PREFIX, DiagnosisData, diagnosis_folds
from lesionstack.data.diagnosis_layouts import read_diagnosis, read_task3
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import atomic_path, read_json, write_json, write_text
from lesionstack.folds import folds_digest
from lesionstack.metrics import (
    balanced_accuracy,
    confusion_matrix,
    macro_auc,
    one_vs_rest_auc,
    per_class_sensitivity,
    per_class_specificity,
)
from lesionstack.models import build_model
from lesionstack.paths import ArtifactPaths, DataPaths, FoldFiles
from lesionstack.resume import Resume, guard
from lesionstack.runtime import RunSettings, Runtime, make_loader, model_logits, save_weights, seed_everything
from lesionstack.train.diagnosis_config import DiagnosisConfig
from lesionstack.train.loop import (
    FoldState,
    checkpoint_dict,
    epoch_generator,
    finish,
    keep,
    make_optimiser,
    resume,
    run_epochs,
    save_torch,
    train_epoch,
)
from lesionstack.trained.loaders import load_diagnosis_fold

log = logging.getLogger(__name__)

def read_data(data_dir: str | os.PathLike[str], cfg: DiagnosisConfig) -> DiagnosisData:
    if cfg.layout == "task3" or cfg.implicit_class is not None:
        return read_task3(data_dir, implicit_class=cfg.implicit_class)
    return read_diagnosis(data_dir, cfg.layout, cfg.labels)


# ---- sampling and loss --------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """Each epoch, `size` indices (default: one per row): a shuffle (cut or repeated to `size`), or
    (balanced) a draw with replacement in which every class is equally likely. Depends only on
    (seed, epoch): a resumed epoch draws the same."""

    def __init__(self, labels: Sequence[int], balanced: bool, seed: int, size: int | None = None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(self.labels)
        self.p = (1.0 / counts[self.labels]) / (counts > 0).sum() if balanced else None
        self.size = int(size or len(self.labels))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.labels)
        if self.p is None:
            draw = np.concatenate([rng.permutation(n) for _ in range(-(-self.size // n))])[: self.size]
        else:
            draw = rng.choice(n, size=self.size, replace=True, p=self.p)
        return iter(int(i) for i in draw)

    def __len__(self) -> int:
        return self.size


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """n / (K * count_c): each class contributes equally to the loss (1 for every class when balanced)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


# ---- one fold -----------------------------------------------------------------------------------------


def _runtime(cfg: DiagnosisConfig) -> Runtime:
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    return Runtime.create(RunSettings.pick(cfg), cfg.device, cfg.amp)


@torch.no_grad()
def predict_proba(model: nn.Module, dataset: CropDataset, rt: Runtime, tta: bool, desc: str = "score"
                  ) -> np.ndarray:
    """(N, K) softmax probabilities for every row of `dataset` (NaN rows: skipped corrupt crops)."""
    model.eval()
    loader = make_loader(dataset, rt, sampler=list(range(len(dataset))), batch_size=rt.settings.eval_batch_size)
    out: np.ndarray | None = None
    for batch in rt.bar(loader, desc):
        check_corrupt(batch, dataset, rt.settings.skip_corrupt)
        if len(batch.index) == 0:
            continue
        logits = model_logits(model, rt.finish(rt.prepare(batch.images)), rt, tta)
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        if out is None:
            out = np.full((len(dataset), probs.shape[1]), np.nan)
        out[batch.index.numpy()] = probs
    if out is None:
        raise ValueError(f"{desc}: no image could be scored")
    return out


def train_fold(fold: int, data: DiagnosisData, folds: pd.DataFrame, cfg: DiagnosisConfig, files: FoldFiles,
               rt: Runtime) -> dict[str, Any]:
    """Train (or resume, or skip) one fold through the shared loop (`train.loop`); returns its metrics.json
    content. `resume.guard` refuses a finished or checkpointed fold made by another config, other folds or
    other classes."""
    inputs = {"folds": folds_digest(folds), "classes": list(data.classes)}
    if guard(files, cfg, inputs) is Resume.SKIP:
        log.info("diagnosis fold %d: already done, skipped (%s)", fold, files.done)
        return read_json(files.metrics)
    k = len(data.classes)
    y = folds[LABEL_COLUMN].map({c: i for i, c in enumerate(data.classes)}).to_numpy()
    train, val = folds["fold"].to_numpy() != fold, folds["fold"].to_numpy() == fold
    draws = EpochSampler(y[train], cfg.balance == "sampler", seed=cfg.seed * 1000 + fold, size=cfg.epoch_size)
    train_ds, sampler = training_crops(data.images, folds[ID_COLUMN][train], y[train], cfg.image_size,
                                       cfg.augment, draws)
    val_ds = CropDataset(data.images, folds[ID_COLUMN][val], y[val], cfg.image_size)
    seed_everything(cfg.seed, fold)
    model = rt.place(build_model(cfg.model, num_classes=k))
    loader = make_loader(train_ds, rt, sampler=sampler, batch_size=cfg.batch_size,
                         drop_last=len(sampler) > cfg.batch_size)
    opt, sched, scaler = make_optimiser(model, cfg.lr, cfg.weight_decay, len(loader), cfg.epochs,
                                        cfg.warmup_epochs, cfg.min_lr_ratio, rt)
    weights = class_weights(y[train], k).to(rt.device) if cfg.balance == "weights" else None
    state = resume(files, model, opt, sched, scaler, fold, "diagnosis fold")

    def loss(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels.long(), weight=weights, label_smoothing=cfg.label_smoothing)

    def stop(state: FoldState) -> bool:
        if cfg.keep == "best" and state.bad_rounds >= cfg.patience:
            log.info("diagnosis fold %d: no better balanced accuracy in %d epochs, stopping", fold, cfg.patience)
            return True
        return False

    def one_epoch(epoch: int) -> dict[str, Any]:
        gen = epoch_generator(cfg.seed, fold, epoch)  # a resumed epoch repeats the lost one exactly
        sampler.set_epoch(epoch)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"]}
        train_loss, ips = train_epoch(model, loader, train_ds, opt, sched, scaler, rt, cfg.augment, gen,
                                      f"fold {fold} epoch {epoch + 1}", loss)
        row.update(train_loss=train_loss, images_per_s=ips)
        probs = predict_proba(model, val_ds, rt, tta=False, desc=f"fold {fold} val")
        row.update(_val_scores(probs, val_ds.labels.astype(np.int64), k))
        _keep(state, row, model, files, cfg.keep)
        return row

    def end_epoch(state: FoldState, row: dict[str, Any]) -> None:
        log.info("diagnosis fold %d epoch %d: train_loss %.4f val_loss %.4f balanced acc %.4f (kept %.4f, epoch %d)",
                 fold, row["epoch"], row["train_loss"], row["val_loss"], row["val_balanced_accuracy"],
                 state.best_score, state.best_epoch)
        # (no RNG state: every epoch reseeds from (seed, fold, epoch))
        save_torch(checkpoint_dict(model, opt, sched, scaler, state, rng=False), files.checkpoint)

    run_epochs(state, cfg.epochs, one_epoch, stop, end_epoch)
    metrics = {"epochs": state.history, "best_epoch": state.best_epoch, "best_balanced_accuracy": state.best_score,
               "n_train": int(train.sum()), "n_val": int(val.sum()), "classes": list(data.classes)}
    return finish(files, metrics, f"best_epoch {state.best_epoch} balanced_accuracy {state.best_score:.6f}\n",
                  rt.ctx)


def _val_scores(probs: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    ok = np.isfinite(probs).all(axis=1)
    p, t = probs[ok], y[ok]
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(t)), t], 1e-12, None))))
    return {"val_loss": loss, "val_balanced_accuracy": balanced_accuracy(t, p.argmax(1), k)}


def _keep(state: FoldState, row: dict[str, Any], model: nn.Module, files: FoldFiles, keep_rule: str) -> None:
    """Save the weights the fold will be scored with (`loop.keep`): the best so far, or (keep: last) every
    epoch's."""
    if keep(state, row["val_balanced_accuracy"], row["epoch"], keep_rule == "last"):
        save_weights(model, files.safetensors)


# ---- out-of-fold scores -------------------------------------------------------------------------------


def write_oof(data: DiagnosisData, folds: pd.DataFrame, cfg: DiagnosisConfig, art: ArtifactPaths,
              rt: Runtime) -> dict[str, Any]:
    """Score each fold's rows with its own kept model; write oof.parquet and cv.json; return the summary."""
    parts = []
    for fold in sorted(folds["fold"].unique()):
        model = rt.place(load_diagnosis_fold(art.diagnosis_fold(int(fold)), len(data.classes)))
        rows = folds[folds["fold"] == fold].reset_index(drop=True)
        ds = CropDataset(data.images, rows[ID_COLUMN], None, cfg.image_size)
        probs = predict_proba(model, ds, rt, tta=cfg.tta_hflip, desc=f"OOF fold {fold}")
        parts.append(pd.concat([rows[[ID_COLUMN, "fold", LABEL_COLUMN]],
                                pd.DataFrame(probs, columns=[PROB_PREFIX + c for c in data.classes])], axis=1))
    oof = pd.concat(parts, ignore_index=True)
    oof.insert(3, CLASS_COLUMN, oof[LABEL_COLUMN].map({c: i for i, c in enumerate(data.classes)}).astype(np.int64))
    with atomic_path(art.oof_diagnosis) as tmp:
        oof.to_parquet(tmp, index=False)
    summary = summarise(oof, data.classes)
    summary.update(layout=data.layout, group_kind=data.group_kind, labels_file=str(data.labels_file),
                   image_size=cfg.image_size, selection=SELECTION[cfg.keep])
    write_json(art.diagnosis_cv, summary)
    return summary


SELECTION = {"last": "the last epoch of every fold: nothing was picked on the fold it scores",
             "best": "keep: best picked each fold's epoch on the fold it then scores: these OOF figures are "
                     "optimistic"}


def summarise(oof: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """The headline metrics of OOF probabilities: balanced accuracy, macro AUC, per-class sensitivity,
    specificity and AUC, and the confusion matrix (rows with a NaN probability are left out)."""
    probs = oof[[PROB_PREFIX + c for c in classes]].to_numpy()
    ok = np.isfinite(probs).all(axis=1)
    y, p, k = oof[CLASS_COLUMN].to_numpy()[ok], probs[ok], len(classes)
    pred = p.argmax(1)
    sens, spec, auc = (per_class_sensitivity(y, pred, k), per_class_specificity(y, pred, k),
                       one_vs_rest_auc(y, p, k))
    per_class = [{"class": c, "n": int((y == i).sum()), "sensitivity": _num(sens[i]), "specificity": _num(spec[i]),
                  "auc": _num(auc[i])} for i, c in enumerate(classes)]
    return {"classes": list(classes), "n": int(ok.sum()), "n_unscored": int((~ok).sum()),
            "balanced_accuracy": balanced_accuracy(y, pred, k), "accuracy": float((pred == y).mean()),
            "macro_auc": macro_auc(y, p, k), "per_class": per_class,
            "confusion_matrix": confusion_matrix(y, pred, k).tolist()}


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


# ---- the stage ----------------------------------------------------------------------------------------


def fold_table(data: DiagnosisData, cfg: DiagnosisConfig, art: ArtifactPaths) -> pd.DataFrame:
    """The diagnosis folds, made once: an existing folds.csv with other content is refused."""
    folds = diagnosis_folds(data.table, cfg.n_folds, cfg.fold_seed)
    text = folds.to_csv(index=False, lineterminator="\n")
    path = art.diagnosis_folds
    if path.exists() and path.read_text() != text:
        raise ConfigError(f"{path} exists with different folds (other data, n_folds or fold_seed); use a new "
                          "--artifacts folder, or delete that folder to retrain on purpose")
    if not path.exists():
        write_text(path, text)
    return folds


def train_diagnosis(data_dir: str | os.PathLike[str], cfg: DiagnosisConfig, out: str | os.PathLike[str],
                    folds_only: Sequence[int] | None = None) -> dict[str, Any]:
    """Train every fold (or `folds_only`), then, once all folds are done, write oof.parquet and cv.json.
    Returns {"folds": {k: metrics}} plus the cv.json summary when it was written."""
    art = ArtifactPaths(out)
    data = read_data(data_dir, cfg)
    counts = data.counts()
    log.info("train-diagnosis on %s (%s layout, %d images, grouped by %s): %s", data_dir, data.layout,
             len(data.table), data.group_kind, counts.to_dict())
    folds = fold_table(data, cfg, art)
    rt = _runtime(cfg)
    all_folds = list(range(cfg.n_folds))
    todo = all_folds if folds_only is None else sorted({int(k) for k in folds_only})
    if set(todo) - set(all_folds):
        raise ValueError(f"--folds-only {todo}: the diagnosis folds are {all_folds}")
    summary: dict[str, Any] = {"folds": {}}
    for fold in todo:
        summary["folds"][fold] = train_fold(fold, data, folds, cfg, art.diagnosis_fold(fold), rt)
    provenance.record(art.root, data_dir, ("diagnosis",))  # after training: serve/score say when synthetic
    if all(art.diagnosis_fold(k).done.exists() for k in all_folds):
        last_fold = max(art.diagnosis_fold(k).done.stat().st_mtime_ns for k in all_folds)
        written = art.diagnosis_cv.is_file() and art.oof_diagnosis.is_file()
        if written and min(art.diagnosis_cv.stat().st_mtime_ns, art.oof_diagnosis.stat().st_mtime_ns) >= last_fold:
            summary.update(read_json(art.diagnosis_cv))  # scored after the last fold: reuse, not re-score
        else:
            summary.update(write_oof(data, folds, cfg, art, rt))
    return summary


@dataclass(frozen=True)
class DiagnosisFoldResult:
    fold: int
    balanced_accuracy: float  # of the kept epoch, on the fold's validation rows
    epoch: int

    def __str__(self) -> str:
        return f"fold {self.fold}: balanced accuracy {self.balanced_accuracy:.4f} (epoch {self.epoch})"


@dataclass(frozen=True)
class DiagnosisResult:
    """What `train-diagnosis` made: each fold's kept epoch; the OOF figures once every fold is done."""

    folds: tuple[DiagnosisFoldResult, ...]
    root: Path
    balanced_accuracy: float | None = None
    macro_auc: float | None = None
    n: int | None = None

    def __str__(self) -> str:
        lines = [str(f) for f in self.folds]
        if self.balanced_accuracy is not None:
            lines.append(f"OOF balanced accuracy {self.balanced_accuracy:.4f}, macro AUC {self.macro_auc:.4f} over "
                         f"{self.n} images; wrote {self.root}/diagnosis/oof.parquet and cv.json")
        return "\n".join(lines)


def diagnosis_stage(data: DataPaths, art: ArtifactPaths, cfg: DiagnosisConfig, *,
                    folds_only: Sequence[int] | None = None) -> DiagnosisResult:
    """The `train-diagnosis` stage on the data folder `data` (any layout): see `train_diagnosis`."""
    summary = train_diagnosis(data.root, cfg, art.root, folds_only)
    folds = tuple(DiagnosisFoldResult(int(k), m["best_balanced_accuracy"], m["best_epoch"])
                  for k, m in summary["folds"].items())
    return DiagnosisResult(folds, art.root, summary.get("balanced_accuracy"), summary.get("macro_auc"),
                           summary.get("n"))
