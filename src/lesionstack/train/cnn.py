"""Train the gated CNN once per fold; write out-of-fold and test scores.

For each fold k the model trains on the other folds; its kept weights score fold k's lesions (out-of-fold)
and the test set. Every training lesion thus gets exactly one score from a model that never saw it, which
is what the GBDT stacker needs. Nothing is chosen on fold k: `keep: last` scores with the final epoch
(validation on fold k is monitoring only), `keep: best_inner` picks the epoch on an inner split of the
training folds.

Per fold folder (`ArtifactPaths.cnn_fold(k)`): `config.yaml` and `inputs.json` (written first: digests of the
fold file with its labels and of the training crops), `checkpoint.pt` (after each epoch, removed at the end),
`model.safetensors` (the kept weights, or with `ema_decay` their moving average; portable, no pickle),
`metrics.json`, and `DONE` (written last). A rerun skips DONE folds, resumes a killed fold from its
checkpoint, and refuses a fold made by another config or from other inputs (`resume.guard`). The scores are
rescored, not refused, when what they were scored from changed (`cnn/scores_inputs.json`: fold models, fold
file, training and test crops, test ids).

With `seeds_per_fold: n` > 1 each fold trains n models, seeds `seed`, `seed + 1`, ... (member 0 in the fold
folder, member r in `member_r/` inside it, each with the same files), and the fold scores with the mean of
their logits (`models.SeedEnsemble`); the fold is finished when every member wrote DONE.

Under `torchrun --nproc_per_node N` the same code trains with DistributedDataParallel: each rank takes a
strided shard of the epoch's draw and of the lesions to score, scores are gathered on every rank (so all
ranks compute the same pAUC and agree on early stopping), and rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lesionstack.config import config_to_dict, read_config_dict
from lesionstack.data.augment import AugmentConfig, augment_batch
from lesionstack.data.dataset import BalancedEpochSampler, CropDataset, check_corrupt, training_crops
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.metadata import check_images_cover, id_mismatch
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import atomic_path, read_json, write_json, write_text
from lesionstack.folds import assign_folds, folds_digest, read_folds
from lesionstack.metrics import MetricError, pauc, roc_auc
from lesionstack.models import ModelConfig, build_model, param_groups
from lesionstack.paths import ArtifactPaths, DataPaths, FoldFiles
from lesionstack.resume import (
    Resume,
    changed_inputs,
    describe,
    file_digest,
    files_digest,
    frame_digest,
    guard,
    images_digest,
)
from lesionstack.runtime import (
    DistContext,
    RunSettings,
    Runtime,
    adamw,
    amp_dtype,
    barrier,
    init_distributed,
    load_optimiser_state,
    make_loader,
    predict_logits,
    resolve_device,
    save_weights,
    seed_everything,
    sigmoid,
    sync_buffers,
)
from lesionstack.train.aux_heads import attach_aux_classes, with_aux_loss
from lesionstack.train.cnn_config import (
    INIT_KEYS,
    MONITOR_KEYS,
    PROVENANCE_KEYS,
    RUNTIME_KEYS,
    CNNConfig,
    check_weights_files,
    resolve_untrained_segmenter,
)
from lesionstack.train.pretrain import load_init_weights, pretrain_on_archive
from lesionstack.trained.loaders import cnn_fold_done, cnn_fold_members, load_cnn_fold, load_network
from lesionstack.trained.scorer import FoldScorer

log = logging.getLogger(__name__)

EpochHook = Callable[[int, int], None]  # (fold, epochs completed) -> None; raise to simulate a crash
# (logits, labels, dataset indices of the batch) -> loss; None: BCE on the labels (distillation adds a teacher)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]



# ---- one epoch ----------------------------------------------------------------------------------------


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler) -> None:
    """One step: backward through the (fp16-)scaled loss, optimiser and scaler, then the per-step LR schedule."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


class WeightEMA:
    """An exponential moving average of a model's weights, updated after every optimiser step.

    The decay warms up as min(decay, 1 - 1/t) at step t: the first step copies the weights (random init gets
    no weight), then a plain running mean until the average spans 1 / (1 - decay) steps. timm's
    min(decay, (1 + t) / (10 + t)) caps the horizon at about t / 9 steps instead: on the demo's ~290 steps a
    fold would never reach a decay of 0.99, and the configured value would hardly matter.

    BatchNorm statistics are neither averaged (timm's ModelEmaV3) nor copied: both describe other weights'
    activations, and averaged weights give smaller ones (an average of vectors pointing apart is shorter).
    On the demo, averaged statistics took a fold's held-out pAUC from 0.150 to 0.050. `refresh_batchnorm`
    recomputes them for the averaged weights (as SWA's update_bn does) before they are validated or saved.
    """

    def __init__(self, model: nn.Module, decay: float, images: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.decay, self.steps, self.images = decay, 0, images
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        weight = 1.0 - min(self.decay, 1.0 - 1.0 / self.steps)  # of the new weights
        for averaged, now in zip(self.module.parameters(), model.parameters(), strict=True):
            averaged.lerp_(now, weight)

    @torch.no_grad()
    def refresh_batchnorm(self) -> None:
        """BatchNorm statistics of the averaged weights: the plain mean over one pass of `images`."""
        self.module.train()  # a frozen segmenter stays in eval mode: its statistics stay as loaded
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative mean
        for x in self.images():
            self.module(x)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        self.module.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.module.load_state_dict(state["module"])


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


def train_epoch(model: nn.Module, loader: DataLoader, dataset: CropDataset, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, rt: Runtime,
                augment: AugmentConfig, gen: torch.Generator, desc: str,
                loss_fn: LossFn | None = None, ema: WeightEMA | None = None) -> tuple[float, float]:
    """One pass over the epoch's draw (`ema`: averaged after each step); returns (mean train loss over all
    ranks, images/s over all ranks)."""
    model.train()
    total, count, start = 0.0, 0, time.perf_counter()
    bar = rt.bar(loader, desc)
    for batch in bar:
        check_corrupt(batch, dataset, rt.settings.skip_corrupt)
        usable = len(batch.labels) >= 2  # BatchNorm cannot train on one image
        if rt.settings.skip_corrupt:  # ranks get equal shards: only skipped crops make their batches differ
            usable = rt.all_ranks(usable)  # a collective, so it stays off the default per-step path
        if not usable:
            continue
        x = rt.finish(augment_batch(rt.prepare(batch.images), augment, gen))
        y = batch.labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x, aux=True)  # (B,), or (B, 1 + K) with auxiliary heads (their loss_fn reads them)
        if loss_fn is None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        else:
            loss = loss_fn(logits.float(), y, batch.index.to(rt.device, non_blocking=True))
        optimiser_step(loss, opt, sched, scaler)
        if ema is not None:
            ema.update(unwrap(model))
        total += float(loss.detach()) * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=rt.device)  # nccl: on the GPU
    if rt.ctx.active:
        torch_dist.all_reduce(sums)
    sums = sums.cpu()
    seconds = time.perf_counter() - start
    return float(sums[0] / max(sums[1], 1.0)), float(sums[1]) / seconds


def evaluate(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Validation loss, pAUC and AUC over the scored rows (NaN rows are skipped corrupt crops)."""
    ok = np.isfinite(logits)
    x, y = logits[ok], labels[ok]
    loss = float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))
    try:
        return {"val_loss": loss, "val_pauc": pauc(y, sigmoid(x)), "val_auc": roc_auc(y, sigmoid(x))}
    except MetricError as err:
        raise MetricError(f"fold validation set: {err}") from err


# ---- one fold -----------------------------------------------------------------------------------------


@dataclass
class FoldState:
    """The progress of a fold: what a checkpoint restores besides the weights and optimiser."""

    epoch: int = 0  # epochs completed
    best_pauc: float = -1.0
    best_auc: float | None = None
    best_epoch: int = 0
    bad_rounds: int = 0  # validations since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    opt = adamw(param_groups(model, cfg.lr, cfg.weight_decay), cfg.lr, cfg.weight_decay)
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps * cfg.epochs, int(cfg.warmup_epochs * steps), cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    ema = weight_ema(model, cfg, train_ds, fold, rt)
    state = resume(files, model, opt, sched, scaler, fold, ema=ema)
    scored = model if ema is None else ema.module  # what validation watches and model.safetensors holds
    net: nn.Module = model
    if rt.ctx.active:
        ids = [rt.ctx.local_rank] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    for epoch in range(state.epoch, cfg.epochs):
        # checked first, so a run killed after its stopping epoch's checkpoint also stops on resume
        if cfg.keep == "best_inner" and state.bad_rounds >= cfg.patience:
            log.info("fold %d: no better inner-split pAUC in %d validations, stopping", fold, cfg.patience)
            break
        seed_everything(cfg.seed, fold, epoch, rt.ctx.rank)  # a resumed epoch repeats the lost one exactly
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        sampler.set_epoch(epoch)
        lr = opt.param_groups[0]["lr"]
        desc = f"fold {fold} epoch {epoch + 1}/{cfg.epochs}"
        train_loss, ips = train_epoch(net, loader, train_ds, opt, sched, scaler, rt, cfg.augment, gen, desc,
                                      loss_fn, ema)
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
        state.history.append(row)
        state.epoch = epoch + 1
        log_epoch(fold, row, state, rt.ctx)
        if rt.ctx.is_main:
            save_torch(checkpoint_dict(model, opt, sched, scaler, state, ema), files.checkpoint)
        barrier(rt.ctx)
        if on_epoch_end is not None:
            on_epoch_end(fold, state.epoch)
    return finish_fold(files, state, len(train_ds), len(val_ds), rt.ctx)


def guard_ignore(cfg: CNNConfig) -> tuple[str, ...]:
    """The config keys a finished or checkpointed fold may differ in: speed, provenance, and with keep: last
    the monitoring keys (validation there cannot change the weights)."""
    return RUNTIME_KEYS + PROVENANCE_KEYS + INIT_KEYS + (MONITOR_KEYS if cfg.keep == "last" else ())


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
                ctx: DistContext, keep: str = "last") -> None:
    """Save the weights the fold will be scored with: with keep="best_inner" the best so far by inner-split
    pAUC, with keep="last" every validated epoch's, the final one last (every rank computed the same pAUC
    from gathered scores)."""
    better = row["val_pauc"] > state.best_pauc
    if better or keep == "last":
        state.best_pauc, state.best_auc, state.best_epoch = row["val_pauc"], row["val_auc"], row["epoch"]
        if ctx.is_main:
            save_weights(model, files.safetensors)
    state.bad_rounds = 0 if better else state.bad_rounds + 1


def log_epoch(fold: int, row: dict[str, Any], state: FoldState, ctx: DistContext) -> None:
    if not ctx.is_main:
        return
    val = "" if row["val_pauc"] is None else f" val_loss {row['val_loss']:.4f} pAUC {row['val_pauc']:.4f}"
    log.info("fold %d epoch %d: train_loss %.4f%s (%.0f img/s; kept: pAUC %.4f, epoch %d)", fold,
             row["epoch"], row["train_loss"], val, row["images_per_s"], state.best_pauc, state.best_epoch)


def checkpoint_dict(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler,
                    state: FoldState, ema: WeightEMA | None = None) -> dict[str, Any]:
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "state": dataclasses.asdict(state),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    return ckpt if ema is None else {**ckpt, "ema": ema.state_dict()}


def resume(files: FoldFiles, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
           scaler: torch.amp.GradScaler, fold: int, state_cls: type = FoldState, what: str = "fold",
           ema: WeightEMA | None = None) -> Any:
    """Restore a killed fold from its last checkpoint (and `ema`, the weight average), or start a fresh state
    (`state_cls`: the stage's own progress record, e.g. the diagnosis stage's; `what` names the fold in the
    log)."""
    if not files.checkpoint.exists():
        return state_cls()
    ckpt = torch.load(files.checkpoint, map_location="cpu", weights_only=False)  # our own local file
    model.load_state_dict(ckpt["model"])
    load_optimiser_state(opt, ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:  # ema_decay is compared by the resume guard, so an EMA run's checkpoint holds one
        ema.load_state_dict(ckpt["ema"])
    state = state_cls(**ckpt["state"])
    log.info("%s %d: resuming after epoch %d from %s", what, fold, state.epoch, files.checkpoint)
    return state


def finish_fold(files: FoldFiles, state: FoldState, n_train: int, n_val: int, ctx: DistContext) -> dict:
    """metrics.json, then DONE (last, so its presence means the fold is complete); drop the checkpoint."""
    metrics = {"epochs": state.history, "best_epoch": state.best_epoch, "best_pauc": state.best_pauc,
               "best_auc": state.best_auc, "n_train": n_train, "n_val": n_val}
    if ctx.is_main:
        write_json(files.metrics, metrics)
        write_text(files.done, f"best_epoch {state.best_epoch} best_pauc {state.best_pauc:.6f}\n")
        files.checkpoint.unlink(missing_ok=True)
    barrier(ctx)
    return metrics


# ---- scores -------------------------------------------------------------------------------------------


def member_config(cfg: CNNConfig, member: int) -> CNNConfig:
    """Seed-ensemble member `member` of each fold: the same recipe with seed `cfg.seed + member` (member 0
    is the fold's one model when `seeds_per_fold` is 1)."""
    return cfg if member == 0 else dataclasses.replace(cfg, seed=cfg.seed + member)


def scoring_model(cfg: CNNConfig, weights: Path, device: torch.device) -> nn.Module:
    """One trained network from `cfg`'s model section and `weights`, built as prediction builds it
    (`lesionstack.trained.loaders`); `write_scores` loads whole folds, seed ensembles included."""
    return load_network(config_to_dict(cfg.model), weights, "CNN config").to(device)


def test_ids(data: DataPaths, images: H5Images) -> list[str]:
    """The test lesions: test-metadata.csv's ids when present (each must have a crop), else the HDF5's."""
    if not data.test_metadata.exists():
        return list(images.ids)
    meta = pd.read_csv(data.test_metadata, usecols=[ID_COLUMN], dtype={ID_COLUMN: str})
    check_images_cover(meta, set(images.ids), data.test_metadata, images.path)
    return meta[ID_COLUMN].tolist()


def check_oof(oof: pd.DataFrame, folds: pd.DataFrame) -> None:
    """The OOF contract: every training row exactly once, scored by its own fold's model."""
    if why := id_mismatch(oof[ID_COLUMN], folds[ID_COLUMN]):
        raise AssertionError(f"OOF ids differ from the fold file's: {why}")
    merged = folds[[ID_COLUMN, "fold"]].merge(oof, on=ID_COLUMN, suffixes=("", "_oof"))
    if (merged["fold"] != merged["fold_oof"]).any():
        bad = merged[merged["fold"] != merged["fold_oof"]].iloc[0]
        raise AssertionError(f"'{bad[ID_COLUMN]}' scored by fold {bad['fold_oof']}'s model, not {bad['fold']}")


def write_scores(data: DataPaths, folds: pd.DataFrame, images: H5Images, cfg: CNNConfig,
                 art: ArtifactPaths, rt: Runtime, inputs: dict[str, str | None]) -> dict[str, Any]:
    """Score each fold's val rows with its own fold model (OOF) and the test set with every fold model
    (through `trained.scorer.FoldScorer`, as `predict` does: an unreadable test crop is NaN, never a stop); record
    `inputs` (what they were scored from) last."""
    parts = []
    for fold in sorted(folds["fold"].unique()):
        files = art.cnn_fold(fold)  # its seed ensemble when it has members, as prediction loads it
        model = rt.place(load_cnn_fold(files, read_config_dict(files.config)))
        val = folds[folds["fold"] == fold]
        val_ds = CropDataset(images, val[ID_COLUMN], val["target"], cfg.image_size)
        scores = sigmoid(predict_logits(model, val_ds, rt, desc=f"OOF fold {fold}"))
        parts.append(pd.DataFrame({ID_COLUMN: val_ds.ids, "fold": int(fold), "score": scores}))
    oof = pd.concat(parts, ignore_index=True)
    check_oof(oof, folds)
    summary = oof_summary(folds, oof)
    test = score_test(data, folds, cfg, art, rt) if data.test_images.exists() else None
    if rt.ctx.is_main:
        with atomic_path(art.oof_cnn) as tmp:
            oof.to_parquet(tmp, index=False)
        if test is not None:
            with atomic_path(art.test_cnn) as tmp:
                test.to_parquet(tmp, index=False)
        write_json(art.cnn_scores_inputs, inputs)
    barrier(rt.ctx)
    return summary


def score_test(data: DataPaths, folds: pd.DataFrame, cfg: CNNConfig, art: ArtifactPaths,
               rt: Runtime) -> pd.DataFrame:
    """The test lesions' mean fold-model score and each fold model's, DataFrame[isic_id, score,
    score_fold_<k>...] (every rank gets all rows): the stacker pairs its fold k with CNN fold k."""
    tids = test_ids(data, H5Images(data.test_images))
    predictor = FoldScorer.load(art.root, device=str(rt.device), progress=cfg.progress,
                               folds=sorted(int(k) for k in folds["fold"].unique()),
                               batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, ctx=rt.ctx)
    return predictor.score_hdf5(data.test_images, ids=tids, per_fold=True)


def scores_inputs(data: DataPaths, art: ArtifactPaths, folds: pd.DataFrame, all_folds: Sequence[int],
                  train_images: str) -> dict[str, str | None]:
    """What oof_cnn / test_cnn are scored from: every fold model and seed-ensemble member (its config,
    metrics, DONE and weights bytes), the fold file, the training crops, and the test crops and ids (None
    without a test set)."""
    # each fold's own count: `--folds-only` runs may have trained them apart
    members = [m for k in all_folds for m in cnn_fold_members(art.cnn_fold(k))]
    fold_files = [p for m in members for p in (m.config, m.metrics, m.done, m.kept_weights)]
    inputs = {"fold_models": files_digest(fold_files), "folds": folds_digest(folds), "train_images": train_images,
              "test_images": None, "test_ids": None,
              "test_scores": "mean and per fold"}  # test_cnn files of releases before pairing held the mean only
    if data.test_images.exists():
        inputs["test_images"] = images_digest(data.test_images)
        if data.test_metadata.exists():
            inputs["test_ids"] = ids_digest(data.test_metadata)
    return inputs


def ids_digest(metadata: Path) -> str:
    """The digest of a metadata file's isic_id column, in order (the rows test_cnn scores)."""
    ids = pd.read_csv(metadata, usecols=[ID_COLUMN], dtype={ID_COLUMN: str})
    return frame_digest(ids)


def scores_up_to_date(data: DataPaths, art: ArtifactPaths, inputs: dict[str, str | None]) -> bool:
    """Scores written from exactly these inputs are reused; otherwise they are rescored (this stage's
    contract: scores are cheap next to training, so a change recomputes them and says what changed)."""
    outputs = [art.oof_cnn] + ([art.test_cnn] if data.test_images.exists() else [])
    if not all(p.is_file() for p in outputs) or not art.cnn_scores_inputs.is_file():
        return False
    if diff := changed_inputs(inputs, read_json(art.cnn_scores_inputs)):
        log.info("rescoring %s: %s", ", ".join(p.name for p in outputs), describe(diff))
        return False
    return True


def read_scores(folds: pd.DataFrame, art: ArtifactPaths) -> dict[str, Any]:
    """The summary of scores written by an earlier run (checked against the OOF contract again)."""
    oof = pd.read_parquet(art.oof_cnn)
    check_oof(oof, folds)
    return oof_summary(folds, oof)


def oof_summary(folds: pd.DataFrame, oof: pd.DataFrame) -> dict[str, Any]:
    """OOF pAUC and AUC over all rows, and each fold's held-out pAUC of its final scores (flip TTA)."""
    merged = folds[[ID_COLUMN, "target"]].merge(oof, on=ID_COLUMN)
    merged = merged[merged["score"].notna()]
    y, s = merged["target"].to_numpy(), merged["score"].to_numpy()
    per_fold = {int(k): pauc(g["target"].to_numpy(), g["score"].to_numpy()) for k, g in merged.groupby("fold")}
    return {"oof_pauc": pauc(y, s), "oof_auc": roc_auc(y, s), "fold_pauc": per_fold}


# ---- the stage ----------------------------------------------------------------------------------------


def train_cnn(data_dir: str | os.PathLike[str], folds_path: str | os.PathLike[str], cfg: CNNConfig,
              out: str | os.PathLike[str], folds_only: Sequence[int] | None = None,
              on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train every fold (or `folds_only`), then write oof_cnn.parquet and test_cnn.parquet once all folds
    of the fold file are done. Returns {"folds": {k: metrics}, "oof_pauc", "oof_auc"} (scores only when
    written)."""
    ctx = init_distributed(cfg.device)
    try:
        return _train_cnn(data_dir, folds_path, cfg, out, folds_only, on_epoch_end, ctx)
    finally:
        if ctx.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _train_cnn(data_dir: str | os.PathLike[str], folds_path: str | os.PathLike[str], cfg: CNNConfig,
               out: str | os.PathLike[str], folds_only: Sequence[int] | None, on_epoch_end: EpochHook | None,
               ctx: DistContext) -> dict[str, Any]:
    data, art = DataPaths(data_dir), ArtifactPaths(out)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    device = resolve_device(cfg.device, ctx)
    rt = Runtime(RunSettings.pick(cfg), device, amp_dtype(cfg.amp, device), ctx)
    check_weights_files(cfg.model)
    cfg = resolve_untrained_segmenter(cfg)
    folds = read_folds(folds_path)
    images = H5Images(data.train_images)
    check_images_cover(folds, set(images.ids), folds_path, images.path)
    all_folds = sorted(int(k) for k in folds["fold"].unique())
    todo = all_folds if folds_only is None else sorted(set(int(k) for k in folds_only))
    unknown = sorted(set(todo) - set(all_folds))
    if unknown:
        raise ValueError(f"--folds-only {unknown}: {folds_path} has folds {all_folds}")
    if ctx.is_main:
        log.info("train-cnn on %s (%s, amp %s, %d process(es)), folds %s", data.root, device, rt.dtype,
                 ctx.world_size, todo)
    train_images = images_digest(images.path)
    if cfg.archive is not None and cfg.init_weights is None:
        cfg = dataclasses.replace(cfg, init_weights=str(pretrain_on_archive(cfg, art, rt)))
        barrier(ctx)
    inputs = fold_inputs(folds, train_images, cfg.model)
    if cfg.init_weights is not None:
        inputs["init_weights"] = file_digest(cfg.init_weights)
    if cfg.aux_diagnosis is not None:  # each row's diagnosis class travels with it to its fold's loss
        folds, aux_record = attach_aux_classes(folds, data.train_metadata, cfg.aux_diagnosis)
        inputs.update(aux_record)
    summary: dict[str, Any] = {"folds": train_folds(todo, folds, images, cfg, art, rt, on_epoch_end, inputs,
                                                    Path(folds_path))}
    if all(cnn_fold_done(art.cnn_fold(k)) for k in all_folds):
        record = scores_inputs(data, art, folds, all_folds, train_images)
        if scores_up_to_date(data, art, record):
            summary.update(read_scores(folds, art))
        else:
            summary.update(write_scores(data, folds, images, cfg, art, rt, record))
    elif ctx.is_main:
        log.info("not all folds done yet; oof_cnn/test_cnn are written when the last fold finishes")
    return summary


def train_folds(todo: Sequence[int], folds: pd.DataFrame, images: H5Images, cfg: CNNConfig, art: ArtifactPaths,
                rt: Runtime, on_epoch_end: EpochHook | None, inputs: dict[str, str],
                folds_path: Path) -> dict[int, dict[str, Any]]:
    """`train_fold` for each fold of `todo` and each of its `seeds_per_fold` members: one after the other,
    or `cfg.fold_workers` at a time in their own processes (CPU, one process, no epoch hook); returns
    {fold: metrics of its member 0}."""
    todo_members = [(k, r) for k in todo for r in range(cfg.seeds_per_fold)]
    for k, r in todo_members:  # refuse before any job starts: a pool would train the others meanwhile
        guard(art.cnn_fold(k).member(r), member_config(cfg, r), inputs, ignore=guard_ignore(cfg), write=False)
    workers = min(cfg.fold_workers, len(todo_members))
    if workers <= 1 or rt.ctx.active or rt.device.type != "cpu" or on_epoch_end is not None:
        done = {(k, r): _fold_or_name_it(k, folds_path, train_fold, k, folds, images, member_config(cfg, r),
                                         art.cnn_fold(k).member(r), rt, on_epoch_end, inputs=inputs)
                for k, r in todo_members}
        return {k: done[(k, 0)] for k in todo}
    log.info("training folds %s (%d model(s) each), %d at a time (a process each, %d torch thread(s) each)",
             list(todo), cfg.seeds_per_fold, workers, max(cfg.cpu_threads, 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        jobs = {pool.submit(_fold_or_name_it, k, folds_path, _train_fold_in_process, k, folds, images.path,
                            member_config(cfg, r), art.cnn_fold(k).member(r), inputs): (k, r)
                for k, r in todo_members}
        done = {jobs[job]: job.result() for job in rt.bar(as_completed(jobs), "CNN folds", total=len(jobs))}
    return {k: done[(k, 0)] for k in todo}


def _fold_or_name_it(fold: int, folds_path: Path, train: Callable[..., dict[str, Any]], *args: Any,
                     **kwargs: Any) -> dict[str, Any]:
    try:
        return train(*args, **kwargs)
    except MetricError as err:  # e.g. skipped corrupt crops took a class out of the validation set
        raise MetricError(f"fold {fold} of {folds_path}: {err}") from err


def _train_fold_in_process(fold: int, folds: pd.DataFrame, images: Path, cfg: CNNConfig, files: FoldFiles,
                           inputs: dict[str, str]) -> dict[str, Any]:
    """One fold in a fresh (spawned) process: its own torch threads, logging to stderr as the CLI's does."""
    package_log = logging.getLogger("lesionstack")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    torch.set_num_threads(max(cfg.cpu_threads, 1))
    # no per-batch bars: two processes' bars would overwrite each other; each epoch logs a line instead
    rt = Runtime(RunSettings.pick(cfg, progress=False), torch.device("cpu"), None, DistContext())
    return train_fold(fold, folds, H5Images(images), cfg, files, rt, inputs=inputs)


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """A fold process's initializer: stop when `parent`, the run that started it, is gone (killed, not
    interrupted). An orphan would go on writing the fold's checkpoint while a resumed run trains the same
    fold, or wait for work forever."""
    if os.getppid() != parent:  # it died while this process was starting
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@dataclass(frozen=True)
class CNNFoldResult:
    """One fold: the kept epoch, the scored fold's pAUC (its final OOF scores once written, else the last
    validation's when that watched the scored fold), and with keep: best_inner the inner split's pAUC."""

    fold: int
    kept_epoch: int
    pauc: float | None
    selection_pauc: float | None
    n_train: int
    n_val: int

    @classmethod
    def of(cls, fold: int, metrics: dict[str, Any], summary: dict[str, Any], keep: str) -> CNNFoldResult:
        held_out = summary.get("fold_pauc", {}).get(fold)
        if held_out is None and keep == "last":
            held_out = metrics["best_pauc"]
        selection = metrics["best_pauc"] if keep == "best_inner" else None
        return cls(fold, metrics["best_epoch"], held_out, selection, metrics["n_train"], metrics["n_val"])

    def __str__(self) -> str:
        held_out = "not scored yet" if self.pauc is None else f"{self.pauc:.4f}"
        inner = "" if self.selection_pauc is None else f" (picked on the inner split: pAUC {self.selection_pauc:.4f})"
        return (f"fold {self.fold}: kept epoch {self.kept_epoch}{inner}, held-out pAUC {held_out}; "
                f"{self.n_train} train / {self.n_val} validated")


@dataclass(frozen=True)
class CNNResult:
    """What `train-cnn` made: per fold the kept epoch's held-out scores; the OOF scores once all folds are
    done (None before)."""

    folds: tuple[CNNFoldResult, ...]
    keep: str
    oof_pauc: float | None = None
    oof_auc: float | None = None

    def __str__(self) -> str:
        text = f"fold pAUC [{', '.join('-' if f.pauc is None else f'{f.pauc:.3f}' for f in self.folds)}]"
        return text + (f", OOF pAUC {self.oof_pauc:.4f}" if self.oof_pauc is not None else "")


def cnn_stage(data: DataPaths, art: ArtifactPaths, cfg: CNNConfig, *, folds: Path | None = None,
              folds_only: Sequence[int] | None = None) -> CNNResult:
    """The `train-cnn` stage on the fold file `folds` (default `art.folds`): see `train_cnn`."""
    summary = train_cnn(data.root, folds or art.folds, cfg, art.root, folds_only=folds_only)
    per_fold = tuple(CNNFoldResult.of(int(k), m, summary, cfg.keep) for k, m in sorted(summary["folds"].items()))
    return CNNResult(per_fold, cfg.keep, summary.get("oof_pauc"), summary.get("oof_auc"))
