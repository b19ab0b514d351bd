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

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from lesionstack.config import ConfigError
from lesionstack.data.augment import augment_batch
from lesionstack.data.dataset import CropDataset, check_corrupt, training_crops
from lesionstack.data.diagnosis import (
    CLASS_COLUMN,
    LABEL_COLUMN,
    PROB_PREFIX,
    DiagnosisData,
    diagnosis_folds,
    read_diagnosis,
    read_task3,
)
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
from lesionstack.models import build_model, param_groups
from lesionstack.paths import ArtifactPaths, FoldFiles
from lesionstack.resume import Resume, guard
from lesionstack.runtime import RunSettings, Runtime, adamw, make_loader, model_logits, seed_everything
from lesionstack.train.cnn import optimiser_step, resume, save_torch, warmup_cosine
from lesionstack.train.cnn_config import RUNTIME_KEYS
from lesionstack.train.diagnosis_config import DiagnosisConfig
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


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ---- one fold -----------------------------------------------------------------------------------------


@dataclass
class FoldState:
    epoch: int = 0  # epochs completed
    best_score: float = -1.0  # validation balanced accuracy of the kept weights
    best_epoch: int = 0
    bad_rounds: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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
    """Train (or resume, or skip) one fold; returns its metrics.json content. `resume.guard` refuses a
    finished or checkpointed fold made by another config, other folds or other classes."""
    inputs = {"folds": folds_digest(folds), "classes": list(data.classes)}
    if guard(files, cfg, inputs, ignore=RUNTIME_KEYS) is Resume.SKIP:
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
    opt = adamw(param_groups(model, cfg.lr, cfg.weight_decay), cfg.lr, cfg.weight_decay)
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps * cfg.epochs, int(cfg.warmup_epochs * steps), cfg.min_lr_ratio))
    weights = class_weights(y[train], k).to(rt.device) if cfg.balance == "weights" else None
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)  # fp16 GPUs only
    state = resume(files, model, opt, sched, scaler, fold, FoldState, "diagnosis fold")
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.keep == "best" and state.bad_rounds >= cfg.patience:
            log.info("diagnosis fold %d: no better balanced accuracy in %d epochs, stopping", fold, cfg.patience)
            break
        seed_everything(cfg.seed, fold, epoch)  # a resumed epoch repeats the lost one exactly
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        sampler.set_epoch(epoch)
        desc = f"fold {fold} epoch {epoch + 1}"
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
               **_train_epoch(model, loader, train_ds, (opt, sched, scaler), cfg, weights, rt, gen, desc)}
        probs = predict_proba(model, val_ds, rt, tta=False, desc=f"fold {fold} val")
        row.update(_val_scores(probs, val_ds.labels.astype(np.int64), k))
        _keep(state, row, model, files, cfg.keep)
        state.history.append(row)
        state.epoch = epoch + 1
        log.info("diagnosis fold %d epoch %d: train_loss %.4f val_loss %.4f balanced acc %.4f (kept %.4f, epoch %d)",
                 fold, row["epoch"], row["train_loss"], row["val_loss"], row["val_balanced_accuracy"],
                 state.best_score, state.best_epoch)
        # (no RNG state: every epoch reseeds from (seed, fold, epoch))
        save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "state": dataclasses.asdict(state)}, files.checkpoint)
    metrics = {"epochs": state.history, "best_epoch": state.best_epoch, "best_balanced_accuracy": state.best_score,
               "n_train": int(train.sum()), "n_val": int(val.sum()), "classes": list(data.classes)}
    write_json(files.metrics, metrics)
    write_text(files.done, f"best_epoch {state.best_epoch} balanced_accuracy {state.best_score:.6f}\n")
    files.checkpoint.unlink(missing_ok=True)
    return metrics


def _train_epoch(model: nn.Module, loader: Any, dataset: CropDataset, optimisers: tuple[Any, Any, Any],
                 cfg: DiagnosisConfig, weights: torch.Tensor | None, rt: Runtime, gen: torch.Generator, desc: str
                 ) -> dict[str, float]:
    opt, sched, scaler = optimisers
    model.train()
    total, count, start = 0.0, 0, time.perf_counter()
    for batch in rt.bar(loader, desc):
        check_corrupt(batch, dataset, cfg.skip_corrupt)
        if len(batch.labels) < 2:  # BatchNorm cannot train on one image
            continue
        x = rt.finish(augment_batch(rt.prepare(batch.images), cfg.augment, gen))
        y = batch.labels.to(rt.device).long()
        with rt.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=weights, label_smoothing=cfg.label_smoothing)
        optimiser_step(loss, opt, sched, scaler)
        total += float(loss.detach()) * len(y)
        count += len(y)
    return {"train_loss": total / max(count, 1), "images_per_s": count / (time.perf_counter() - start)}


def _val_scores(probs: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    ok = np.isfinite(probs).all(axis=1)
    p, t = probs[ok], y[ok]
    loss = float(-np.mean(np.log(np.clip(p[np.arange(len(t)), t], 1e-12, None))))
    return {"val_loss": loss, "val_balanced_accuracy": balanced_accuracy(t, p.argmax(1), k)}


def _keep(state: FoldState, row: dict[str, Any], model: nn.Module, files: FoldFiles, keep: str) -> None:
    """Save the weights the fold will be scored with: the best so far, or (keep: last) every epoch's."""
    from safetensors.torch import save_file

    better = row["val_balanced_accuracy"] > state.best_score
    if better or keep == "last":
        state.best_score, state.best_epoch = row["val_balanced_accuracy"], row["epoch"]
        with atomic_path(files.safetensors) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    state.bad_rounds = 0 if better else state.bad_rounds + 1


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
    if all(art.diagnosis_fold(k).done.exists() for k in all_folds):
        last_fold = max(art.diagnosis_fold(k).done.stat().st_mtime_ns for k in all_folds)
        written = art.diagnosis_cv.is_file() and art.oof_diagnosis.is_file()
        if written and min(art.diagnosis_cv.stat().st_mtime_ns, art.oof_diagnosis.stat().st_mtime_ns) >= last_fold:
            summary.update(read_json(art.diagnosis_cv))  # scored after the last fold: reuse, not re-score
        else:
            summary.update(write_oof(data, folds, cfg, art, rt))
    return summary
