"""One fold of the per-fold CNN: what it trains on and watches, how it is kept, and its fold folder.

`train_fold` trains (or resumes, or skips) one fold or one seed-ensemble member through the shared loop
(`train.loop`); the stage around it (`train.cnn`) runs every fold and scores them (`train.cnn_scores`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionstack.data.dataset import BalancedEpochSampler, CropDataset, check_corrupt, training_crops
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import read_json
from lesionstack.folds import assign_folds, folds_digest
from lesionstack.metrics import MetricError, pauc, roc_auc
from lesionstack.models import ModelConfig, build_model
from lesionstack.paths import FoldFiles
from lesionstack.resume import Resume, file_digest, guard, images_digest
from lesionstack.runtime import (
    DistContext,
    Runtime,
    barrier,
    make_loader,
    predict_logits,
    save_weights,
    seed_everything,
    sigmoid,
    sync_buffers,
)
from lesionstack.train.aux_heads import with_aux_loss
from lesionstack.train.cnn_config import INIT_KEYS, MONITOR_KEYS, PROVENANCE_KEYS, CNNConfig
from lesionstack.train.ema import WeightEMA
from lesionstack.train.gate_masks import CachedMasks
from lesionstack.train.loop import (
    EpochHook,
    FoldState,
    LossFn,
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
from lesionstack.train.pretrain import load_init_weights

log = logging.getLogger(__name__)


def fold_inputs(folds: pd.DataFrame, images_digest: str, model: ModelConfig | None = None) -> dict[str, str]:
    """What a CNN fold is made from: the fold file's assignment and labels, the training crops, and the
    bytes of the initial weights files the model starts from (their paths are provenance only, so a moved
    artifacts folder resumes, but a retrained segmenter is a different start and is refused)."""
    inputs = {"folds": folds_digest(folds), "train_images": images_digest}
    for key in PROVENANCE_KEYS:
        path = getattr(model, key.split(".")[1], None) if model is not None else None
        if path is not None and Path(path).is_file():
            inputs[key] = file_digest(path)
    return inputs


def train_fold(fold: int, folds: pd.DataFrame, images: H5Images, cfg: CNNConfig, files: FoldFiles,
               rt: Runtime, on_epoch_end: EpochHook | None = None, loss_fn: LossFn | None = None,
               inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Train (or resume, or skip) one fold; returns its metrics.json content. `loss_fn` replaces the BCE
    (`train.distill` trains its student through this loop). With `cfg.aux_diagnosis`, the auxiliary heads
    train on the rows' diagnosis classes (`folds` column from `train.aux_heads.attach_aux_classes`).

    `resume.guard` decides: a finished or checkpointed fold made by another config (runtime keys aside)
    or from other inputs (default: `fold_inputs` of `folds` and `images`) is refused, naming the key.
    """
    inputs = inputs if inputs is not None else fold_inputs(folds, images_digest(images.path), cfg.model)
    decision = guard(files, cfg, inputs, ignore=guard_ignore(cfg), write=rt.ctx.is_main)
    barrier(rt.ctx)
    if decision is Resume.SKIP:
        log.info("fold %d: already done, skipped (%s)", fold, files.done)
        return read_json(files.metrics)
    train, watched = training_and_validation_rows(folds, fold, cfg)
    val = validation_rows(watched, cfg.val_max_negatives, cfg.seed * 1000 + fold)
    draws = BalancedEpochSampler(train["target"].to_numpy(), cfg.neg_per_pos, seed=cfg.seed * 1000 + fold,
                                 rank=rt.ctx.rank, world_size=rt.ctx.world_size)
    train_ds, sampler = training_crops(images, train[ID_COLUMN], train["target"], cfg.image_size, cfg.augment,
                                       draws)
    val_ds = CropDataset(images, val[ID_COLUMN], val["target"], cfg.image_size)
    seed_everything(cfg.seed, fold)
    model = rt.place(build_model(cfg.model))
    if cfg.init_weights is not None:  # e.g. the archive pretraining's
        load_init_weights(model, cfg.init_weights)
    loss_fn = with_aux_loss(cfg.aux_diagnosis, train, rt.device, loss_fn)
    loader = make_loader(train_ds, rt, sampler=sampler, batch_size=cfg.batch_size,
                         drop_last=len(sampler) > cfg.batch_size)
    opt, sched, scaler = make_optimiser(model, cfg.lr, cfg.weight_decay, len(loader), cfg.epochs,
                                        cfg.warmup_epochs, cfg.min_lr_ratio, rt)
    ema = weight_ema(model, cfg, train_ds, fold, rt)
    masks = CachedMasks.of(model, train_ds, rt) if caches_masks(cfg) else None
    state = resume(files, model, opt, sched, scaler, fold, ema=ema)
    scored = model if ema is None else ema.module  # what validation watches and model.safetensors holds
    net: nn.Module = model
    if rt.ctx.active:
        ids = [rt.ctx.local_rank] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def stop(state: FoldState) -> bool:
        if cfg.keep == "best_inner" and state.bad_rounds >= cfg.patience:
            log.info("fold %d: no better inner-split pAUC in %d validations, stopping", fold, cfg.patience)
            return True
        return False

    def one_epoch(epoch: int) -> dict[str, Any]:
        gen = epoch_generator(cfg.seed, fold, epoch, rt.ctx.rank)
        sampler.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        desc = f"fold {fold} epoch {epoch + 1}/{cfg.epochs}"
        train_loss, ips = train_epoch(net, loader, train_ds, opt, sched, scaler, rt, cfg.augment, gen, desc,
                                      loss_fn, ema, masks)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": None,
                               "val_pauc": None, "val_auc": None, "images_per_s": ips, "lr": lr}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            if ema is not None:
                ema.refresh_batchnorm()
            sync_buffers(scored, rt.ctx)
            # per-epoch validation without TTA (half the cost); the final OOF scores use it
            val_logits = predict_logits(scored, val_ds, rt, desc=f"fold {fold} val", tta=False)
            row.update(evaluate(val_logits, val_ds.labels))
            update_best(state, row, scored, files, rt.ctx, cfg.keep)
        return row

    def end_epoch(state: FoldState, row: dict[str, Any]) -> None:
        log_epoch(fold, row, state, rt.ctx)
        if rt.ctx.is_main:
            save_torch(checkpoint_dict(model, opt, sched, scaler, state, ema), files.checkpoint)
        barrier(rt.ctx)
        if on_epoch_end is not None:
            on_epoch_end(fold, state.epoch)

    run_epochs(state, cfg.epochs, one_epoch, stop, end_epoch)
    return finish_fold(files, state, len(train_ds), len(val_ds), rt.ctx)


def caches_masks(cfg: CNNConfig) -> bool:
    """`gate_masks: cached` with a frozen gate: its masks are made once (`train.gate_masks`)."""
    return cfg.gate_masks == "cached" and cfg.model.gate == "freeze"


def guard_ignore(cfg: CNNConfig) -> tuple[str, ...]:
    """The config keys a finished or checkpointed fold may differ in: speed, provenance, and with keep: last
    the monitoring keys (validation there cannot change the weights)."""
    return PROVENANCE_KEYS + INIT_KEYS + (MONITOR_KEYS if cfg.keep == "last" else ())  # runtime() fields aside


def training_and_validation_rows(folds: pd.DataFrame, fold: int, cfg: CNNConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to train on, rows validated after epochs). keep: last trains on every other fold and watches
    the scored fold (monitoring only: nothing is picked on it). keep: best_inner holds out one of
    `inner_folds` patient-grouped, positive-balanced parts of the training rows and selects on it, so the
    scored fold never picks the epoch."""
    rest = folds[folds["fold"] != fold]
    if cfg.keep == "last":
        return rest, folds[folds["fold"] == fold]
    inner = assign_folds(rest.drop(columns="fold"), cfg.inner_folds, seed=cfg.seed * 1000 + fold)
    held = inner["fold"].to_numpy() == 0
    return rest[~held], rest[held]


def validation_rows(val: pd.DataFrame, max_negatives: int | None, seed: int) -> pd.DataFrame:
    """The rows scored after each epoch: all of them, or every positive plus `max_negatives` negatives drawn
    once (the same draw each epoch and on resume, so validations compare like with like)."""
    negatives = np.flatnonzero(val["target"].to_numpy() == 0)
    if max_negatives is None or len(negatives) <= max_negatives:
        return val
    drop = np.random.default_rng([seed, 7]).choice(negatives, size=len(negatives) - max_negatives, replace=False)
    keep = np.ones(len(val), dtype=bool)
    keep[drop] = False
    return val[keep]


def update_best(state: FoldState, row: dict[str, Any], model: nn.Module, files: FoldFiles,
                ctx: DistContext, keep_rule: str = "last") -> None:
    """Save the weights the fold will be scored with (`loop.keep`): with keep="best_inner" the best so far by
    inner-split pAUC, with keep="last" every validated epoch's, the final one last (every rank computed the
    same pAUC from gathered scores)."""
    if keep(state, row["val_pauc"], row["epoch"], keep_rule == "last", auc=row["val_auc"]) and ctx.is_main:
        save_weights(model, files.safetensors)


def log_epoch(fold: int, row: dict[str, Any], state: FoldState, ctx: DistContext) -> None:
    if not ctx.is_main:
        return
    val = "" if row["val_pauc"] is None else f" val_loss {row['val_loss']:.4f} pAUC {row['val_pauc']:.4f}"
    log.info("fold %d epoch %d: train_loss %.4f%s (%.0f img/s; kept: pAUC %.4f, epoch %d)", fold,
             row["epoch"], row["train_loss"], val, row["images_per_s"], state.best_score, state.best_epoch)


def finish_fold(files: FoldFiles, state: FoldState, n_train: int, n_val: int, ctx: DistContext) -> dict:
    """The fold's metrics.json (the kept epoch's pAUC as `best_pauc`) and DONE (`loop.finish`)."""
    metrics = {"epochs": state.history, "best_epoch": state.best_epoch, "best_pauc": state.best_score,
               "best_auc": state.best_auc, "n_train": n_train, "n_val": n_val}
    return finish(files, metrics, f"best_epoch {state.best_epoch} best_pauc {state.best_score:.6f}\n", ctx)


def member_config(cfg: CNNConfig, member: int) -> CNNConfig:
    """Seed-ensemble member `member` of each fold: the same recipe with seed `cfg.seed + member` (member 0
    is the fold's one model when `seeds_per_fold` is 1)."""
    return cfg if member == 0 else dataclasses.replace(cfg, seed=cfg.seed + member)


def weight_ema(model: nn.Module, cfg: CNNConfig, dataset: CropDataset, fold: int, rt: Runtime) -> WeightEMA | None:
    """`cfg.ema_decay`'s average of `model` (None when off). Its BatchNorm statistics come from a fixed draw
    of the training crops as an epoch draws them (all positives, `neg_per_pos` times as many negatives),
    without augmentation: the same crops every time, so a resumed fold recomputes the same statistics."""
    if cfg.ema_decay is None:
        return None
    draw = BalancedEpochSampler(dataset.labels, cfg.neg_per_pos, seed=cfg.seed * 1000 + fold)

    def images() -> Iterator[torch.Tensor]:
        for batch in make_loader(dataset, rt, sampler=draw, batch_size=cfg.batch_size):
            check_corrupt(batch, dataset, rt.settings.skip_corrupt)
            if len(batch.labels) >= 2:  # BatchNorm in training mode needs two
                yield rt.finish(rt.prepare(batch.images))

    return WeightEMA(model, cfg.ema_decay, images)



def evaluate(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Validation loss, pAUC and AUC over the scored rows (NaN rows are skipped corrupt crops)."""
    ok = np.isfinite(logits)
    x, y = logits[ok], labels[ok]
    loss = float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))
    try:
        return {"val_loss": loss, "val_pauc": pauc(y, sigmoid(x)), "val_auc": roc_auc(y, sigmoid(x))}
    except MetricError as err:
        raise MetricError(f"fold validation set: {err}") from err
