"""Distil the stacker (image + metadata + patient context) into an image-only student, per fold.

The student is any timm classifier (default `mobilenetv3_small_100`, no segmenter), trained by the CNN
stage's own fold loop (`train.cnn_fold.train_fold`) on the same fold file, with the loss

    alpha * BCE(s, label) + (1 - alpha) * T^2 * BCE(s / T, sigmoid(t / T))

for student logit s and teacher logit t at temperature T (Hinton et al.; T^2 keeps the soft term's
gradient on the scale of the hard one). `alpha: 1` is the same student trained on labels alone.

No leak. Student fold k is scored on fold k, so the teacher's scores for its training rows must come from
models that never saw fold k. The stacker's OOF blend does not qualify: the OOF score of a row in fold
j != k comes from a stack trained on every fold but j, fold k included. The default teacher ("nested")
therefore refits the stack for each student fold on its training folds only, as an inner (K-1)-fold OOF,
with the run's stack config on the tabular features. The CNN-score features are left out: each row's CNN
score comes from a CNN fold model that saw fold k. A teacher score file must likewise hold, per student
fold, scores made without that fold (column `student_fold`); a plain OOF file (or `source: oof_stack`) is
refused unless `allow_leak: true`, which exists to measure the leak, never for results. Teacher scores
(for the stack: rank blends) become logits by Platt scaling fitted on the student's training labels.

Files (`ArtifactPaths.distill_dir(name)`, one folder per student config): teacher.parquet (isic_id,
student_fold, score, logit) and teacher_inputs.json; fold_k/ as the CNN's (config.yaml, inputs.json,
metrics.json, DONE; resume from checkpoint.pt) with the weights as model.safetensors; oof.parquet
(isic_id, fold, score) and metrics.json (OOF and per-fold pAUC).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from lesionstack import provenance
from lesionstack.config import ConfigError, load_config
from lesionstack.data.dataset import CropDataset
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.metadata import check_images_cover, id_mismatch
from lesionstack.data.schema import ID_COLUMN, TARGET_COLUMN
from lesionstack.files import atomic_path, write_json
from lesionstack.folds import folds_digest, read_folds
from lesionstack.metrics import pauc, roc_auc
from lesionstack.paths import ArtifactPaths, DataPaths, FoldFiles
from lesionstack.resume import record_or_check_inputs
from lesionstack.runtime import RunSettings, Runtime, init_distributed, predict_logits, sigmoid
from lesionstack.tabular.blend import blend, fit_blend_weights
from lesionstack.tabular.estimator import estimator
from lesionstack.tabular.features import CNN_PREFIX
from lesionstack.tabular.stack import align_features, apply_tuned_params, tuning_inputs
from lesionstack.tabular.stack_config import StackConfig
from lesionstack.train.cnn_fold import train_fold
from lesionstack.train.cnn_scores import check_oof
from lesionstack.train.distill_config import DistillConfig, TeacherConfig
from lesionstack.train.loop import LossFn
from lesionstack.trained.loaders import load_student

log = logging.getLogger(__name__)

WEIGHTS_FILE = FoldFiles(Path(".")).safetensors.name  # in each student fold folder (the CNN loop writes it)


# ---- the loss -----------------------------------------------------------------------------------------


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                 temperature: float) -> torch.Tensor:
    """alpha * BCE(logits, labels) + (1 - alpha) * T^2 * BCE(logits / T, sigmoid(teacher_logits / T))."""
    hard = F.binary_cross_entropy_with_logits(logits, labels)
    if alpha >= 1.0:
        return hard
    t = temperature
    soft = F.binary_cross_entropy_with_logits(logits / t, torch.sigmoid(teacher_logits / t)) * t * t
    return alpha * hard + (1.0 - alpha) * soft


def make_loss(cfg: DistillConfig, teacher_logits: np.ndarray, device: torch.device) -> LossFn | None:
    """The fold's loss: teacher logits looked up by dataset index (None with alpha 1: plain BCE)."""
    if cfg.alpha >= 1.0:
        return None
    table = torch.as_tensor(teacher_logits, dtype=torch.float32, device=device)

    def loss(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return distill_loss(logits, labels, table[index], cfg.alpha, cfg.temperature)

    return loss


# ---- the teacher --------------------------------------------------------------------------------------


def training_rows(folds: pd.DataFrame, k: int) -> pd.DataFrame:
    """Student fold k's training rows in the order `train_fold` builds its dataset."""
    return folds[folds["fold"] != k]


def nested_scores(features: pd.DataFrame, folds: pd.DataFrame, cfg: StackConfig, k: int) -> np.ndarray:
    """Teacher scores for fold k's training rows from stacks that never saw fold k: an inner OOF over the
    training folds (each inner fold j scored by the stack fitted on the folds other than j and k), blended
    across the config's GBDT families as the stacker blends them. `features` is in fold-file order."""
    rows = (folds["fold"] != k).to_numpy()
    X = features.loc[rows, [c for c in features.columns if c != ID_COLUMN and not c.startswith(CNN_PREFIX)]]
    X = X.reset_index(drop=True)
    y = folds.loc[rows, TARGET_COLUMN].to_numpy()
    inner = folds.loc[rows, "fold"].to_numpy()
    scores = {m: np.zeros(len(y)) for m in cfg.models}
    for j in np.unique(inner):
        fit, score = inner != j, inner == j
        for m in cfg.models:
            est = estimator(cfg, m).fit(X[fit], y[fit])
            scores[m][score] = est.predict_proba(X[score])[:, 1]
    weights = fit_blend_weights(scores, y) if cfg.blend == "weights" and len(scores) > 1 else None
    return blend(scores, weights)


def platt(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logits a * logit(score) + b, fitted on `labels`: ranks and undersampled GBDT outputs are not
    probabilities, and soft targets at the base rate's scale are what the student should learn."""
    x = _logit(scores).reshape(-1, 1)
    lr = LogisticRegression(C=1e4, max_iter=1000).fit(x, labels.astype(int))
    return lr.decision_function(x)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def teacher_from_file(path: str | os.PathLike[str], folds: pd.DataFrame, k: int, allow_leak: bool,
                      column: str = "score") -> np.ndarray:
    """Scores for fold k's training rows from a file: rows with student_fold == k, or, in a plain
    one-score-per-row file (an OOF), every row, which only `allow_leak` accepts."""
    table = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    need = [c for c in (ID_COLUMN, column) if c not in table.columns]
    if need:
        raise ConfigError(f"teacher scores {path}: missing column(s) {need}")
    table[ID_COLUMN] = table[ID_COLUMN].astype(str)
    ids = training_rows(folds, k)[ID_COLUMN]
    if "student_fold" in table.columns:
        table = table[table["student_fold"] == k]
    elif allow_leak:
        table = table[table[ID_COLUMN].isin(set(ids))]
    else:
        raise ConfigError(
            f"teacher scores {path} have one score per row (no student_fold column): an OOF score of a row "
            f"in fold j comes from a model trained on fold {k}, the student's validation fold, so its labels "
            "would leak into the student. Use teacher.source: nested, or give per-student-fold scores."
        )
    if why := id_mismatch(table[ID_COLUMN], ids):
        raise ConfigError(f"teacher scores {path} for student fold {k} must cover its training rows once: {why}")
    scores = table.set_index(ID_COLUMN).loc[ids, column].to_numpy(dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = ids[~np.isfinite(scores)].iloc[0]
        raise ConfigError(f"teacher scores {path}: non-finite {column} for '{bad}' (student fold {k})")
    return scores


def teacher_scores(cfg: TeacherConfig, art: ArtifactPaths, folds: pd.DataFrame, k: int) -> np.ndarray:
    """Uncalibrated teacher scores for student fold k's training rows."""
    if cfg.source == "file":
        return teacher_from_file(cfg.scores or "", folds, k, cfg.allow_leak)
    if cfg.source == "oof_stack":
        return teacher_from_file(art.oof_stack, folds, k, cfg.allow_leak)
    if not art.features_train.is_file():
        raise ConfigError(f"teacher.source nested needs the feature table {art.features_train}; run features")
    features = align_features(pd.read_parquet(art.features_train), folds, str(art.features_train))
    return nested_scores(features, folds, nested_stack_config(cfg, art, tuning_inputs(features, folds)), k)


def nested_stack_path(cfg: TeacherConfig, art: ArtifactPaths) -> Path | None:
    """The stack YAML the nested teacher refits: teacher.stack_config, else the run's own (None: defaults)."""
    if cfg.stack_config:
        return Path(cfg.stack_config)
    return art.stack_fold(0).config if art.stack_fold(0).config.is_file() else None


def nested_stack_config(cfg: TeacherConfig, art: ArtifactPaths, tuning: dict[str, str]) -> StackConfig:
    """The stack config the teacher refits, with the run's tuned params when that config uses them (and the
    study was run on these features and folds: `tuning`, from `tuning_inputs`)."""
    stack_cfg, _ = apply_tuned_params(load_config(StackConfig, nested_stack_path(cfg, art)), art, tuning)
    return stack_cfg


def teacher_inputs(cfg: TeacherConfig, art: ArtifactPaths, folds: pd.DataFrame) -> dict[str, Any]:
    """What the teacher table is made from (files by digest); a stored teacher.parquet is reused only when
    all of it matches."""
    files = {"file": cfg.scores, "oof_stack": art.oof_stack, "nested": art.features_train}[cfg.source]
    inputs: dict[str, Any] = {"folds": folds_digest(folds), "teacher": dataclasses.asdict(cfg)}
    inputs["scores_file"] = _file_digest(Path(files)) if files else None
    if cfg.source == "nested":
        stack = nested_stack_path(cfg, art)
        inputs["stack_config"] = _file_digest(stack) if stack else "defaults"
        inputs["tuned_params"] = _file_digest(art.best_params) if art.best_params.is_file() else None
    return inputs


def _file_digest(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"teacher input {path} does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_teacher(cfg: DistillConfig, art: ArtifactPaths, name: str, folds: pd.DataFrame) -> pd.DataFrame:
    """teacher.parquet: for every student fold, its training rows' scores and calibrated logits (reused when
    its inputs are unchanged)."""
    path, inputs_path = art.distill_file(name, "teacher.parquet"), art.distill_file(name, "teacher_inputs.json")
    inputs = teacher_inputs(cfg.teacher, art, folds)
    if path.is_file() and inputs_path.is_file():
        record_or_check_inputs(inputs, inputs_path)
        return pd.read_parquet(path)
    parts = []
    for k in tqdm(sorted(folds["fold"].unique()), desc="teacher", disable=not cfg.progress):
        rows = training_rows(folds, int(k))
        scores = teacher_scores(cfg.teacher, art, folds, int(k))
        labels = rows[TARGET_COLUMN].to_numpy()
        logits = platt(scores, labels) if cfg.teacher.calibrate == "platt" else _logit(scores)
        parts.append(pd.DataFrame({ID_COLUMN: rows[ID_COLUMN].to_numpy(), "student_fold": int(k),
                                   "score": scores, "logit": logits}))
        log.info("teacher for student fold %d: pAUC %.4f on its %d training rows", k, pauc(labels, scores),
                 len(rows))
    table = pd.concat(parts, ignore_index=True)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    inputs_path.unlink(missing_ok=True)
    record_or_check_inputs(inputs, inputs_path)
    return table


def fold_teacher_logits(teacher: pd.DataFrame, folds: pd.DataFrame, k: int) -> np.ndarray:
    """Fold k's teacher logits in its training dataset's order."""
    part = teacher[teacher["student_fold"] == k].set_index(ID_COLUMN)
    return part.loc[training_rows(folds, k)[ID_COLUMN], "logit"].to_numpy(dtype=np.float32)


# ---- weights ------------------------------------------------------------------------------------------


# ---- the stage ----------------------------------------------------------------------------------------


def distill(data_dir: str | os.PathLike[str], artifacts: str | os.PathLike[str], cfg: DistillConfig,
            name: str = "default", folds_path: str | os.PathLike[str] | None = None,
            folds_only: Sequence[int] | None = None) -> dict[str, Any]:
    """Build the teacher table, train the student on every fold (or `folds_only`), then write its OOF scores
    and metrics once all folds are done. Returns {"folds": {k: metrics}, "oof_pauc", ...}."""
    data, art = DataPaths(data_dir), ArtifactPaths(artifacts)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    rt = Runtime.create(RunSettings.pick(cfg), cfg.device, cfg.amp, init_distributed(cfg.device))
    device = rt.device
    folds = read_folds(folds_path or art.folds)
    images = H5Images(data.train_images)
    check_images_cover(folds, set(images.ids), folds_path or art.folds, images.path)
    teacher = build_teacher(cfg, art, name, folds) if cfg.alpha < 1.0 else None
    all_folds = sorted(int(k) for k in folds["fold"].unique())
    summary: dict[str, Any] = {"folds": {}}
    for k in all_folds if folds_only is None else sorted(set(folds_only)):
        files = art.distill_fold(name, k)
        loss = None if teacher is None else make_loss(cfg, fold_teacher_logits(teacher, folds, k), device)
        summary["folds"][k] = train_fold(k, folds, images, cfg, files, rt, loss_fn=loss)
    if rt.ctx.is_main:  # after training: serve says when the student learnt from synthetic data
        provenance.record(art.root, data.root, ("distill",))
    if all(art.distill_fold(name, k).done.is_file() for k in all_folds):
        summary.update(write_student_scores(folds, images, cfg, art, name, rt))
    return summary


def write_student_scores(folds: pd.DataFrame, images: H5Images, cfg: DistillConfig, art: ArtifactPaths,
                         name: str, rt: Runtime) -> dict[str, Any]:
    """oof.parquet (each fold's validation rows scored by its own student) and metrics.json."""
    parts = []
    for k in sorted(folds["fold"].unique()):
        model = rt.place(load_student(art.distill_fold(name, int(k)).dir)[0])
        val = folds[folds["fold"] == k]
        ds = CropDataset(images, val[ID_COLUMN], val[TARGET_COLUMN], cfg.image_size)
        scores = sigmoid(predict_logits(model, ds, rt, desc=f"OOF fold {k}"))
        parts.append(pd.DataFrame({ID_COLUMN: ds.ids, "fold": int(k), "score": scores}))
    oof = pd.concat(parts, ignore_index=True)
    check_oof(oof, folds)
    with atomic_path(art.distill_file(name, "oof.parquet")) as tmp:
        oof.to_parquet(tmp, index=False)
    metrics = {"name": name, "alpha": cfg.alpha, "temperature": cfg.temperature, "teacher": cfg.teacher.source,
               "student": cfg.model.classifier, "image_size": cfg.image_size, **fold_spread(folds, oof)}
    write_json(art.distill_file(name, "metrics.json"), metrics)
    return metrics


def fold_spread(folds: pd.DataFrame, oof: pd.DataFrame, column: str = "score") -> dict[str, Any]:
    """OOF pAUC/AUC and the per-fold pAUC (mean, std) of the scores in `column`."""
    merged = folds[[ID_COLUMN, "fold", TARGET_COLUMN]].merge(oof[[ID_COLUMN, column]], on=ID_COLUMN)
    y, s = merged[TARGET_COLUMN].to_numpy(), merged[column].to_numpy(dtype=np.float64)
    per_fold = [pauc(y[merged["fold"] == k], s[merged["fold"] == k]) for k in sorted(merged["fold"].unique())]
    return {"oof_pauc": pauc(y, s), "oof_auc": roc_auc(y, s), "fold_pauc": per_fold,
            "fold_pauc_mean": float(np.mean(per_fold)), "fold_pauc_std": float(np.std(per_fold))}


@dataclass(frozen=True)
class StudentFoldResult:
    fold: int
    kept_epoch: int
    pauc: float  # the kept epoch's validation pAUC

    def __str__(self) -> str:
        return f"fold {self.fold}: kept epoch {self.kept_epoch}: pAUC {self.pauc:.4f}"


@dataclass(frozen=True)
class DistillResult:
    """What `distill` made: each student fold's kept epoch; the OOF figures once every fold is done."""

    name: str
    folds: tuple[StudentFoldResult, ...]
    out: Path  # the student's folder
    oof_pauc: float | None = None
    fold_pauc_mean: float | None = None
    fold_pauc_std: float | None = None

    def __str__(self) -> str:
        lines = [str(f) for f in self.folds]
        if self.oof_pauc is not None:
            lines.append(f"student {self.name}: OOF pAUC {self.oof_pauc:.4f} (folds {self.fold_pauc_mean:.4f} "
                         f"+- {self.fold_pauc_std:.4f}) -> {self.out}")
        return "\n".join(lines)


def distill_stage(data: DataPaths, art: ArtifactPaths, cfg: DistillConfig, *,
                  folds_only: Sequence[int] | None = None) -> DistillResult:
    """The `distill` stage: student `cfg.student` on the fold file `data.fold_file(art)` (default the run's
    `art.folds`); see `distill`."""
    name = cfg.student
    summary = distill(data.root, art.root, cfg, name=name, folds_path=data.fold_file(art), folds_only=folds_only)
    folds = tuple(StudentFoldResult(int(k), m["best_epoch"], m["best_pauc"]) for k, m in summary["folds"].items())
    return DistillResult(name, folds, art.distill_dir(name), summary.get("oof_pauc"),
                         summary.get("fold_pauc_mean"), summary.get("fold_pauc_std"))
