"""The training loop every per-fold network stage shares: the CNN (`train.cnn_fold`), its distilled students
(`train.distill`, through the CNN's fold loop) and the diagnosis classifier (`train.diagnosis`).

    opt, sched, scaler = make_optimiser(model, lr, weight_decay, ...)  # AdamW, warm-up + cosine per step
    state = resume(files, model, opt, sched, scaler, fold)            # a killed fold goes on from its checkpoint
    run_epochs(state, epochs, epoch_fn, stop=..., end_epoch=...)      # the epoch loop
      train_epoch(...)                                                # one pass: augment, forward, optimiser step
      keep(state, score, epoch, every_epoch=...)                      # the keep rule: which epoch is scored
      save_torch(checkpoint_dict(...), files.checkpoint)              # after every epoch
    finish(files, metrics, done_line, ctx)                            # metrics.json, then DONE, checkpoint gone

What differs between the stages (the loss, the validation metric, what a row of the history holds, how an
epoch is seeded) stays in the stage; what a fold folder holds and how it resumes is the same everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lesionstack.data.augment import AugmentConfig, augment_batch, augment_with_masks
from lesionstack.data.dataset import CropDataset, check_corrupt
from lesionstack.files import atomic_path, write_json, write_text
from lesionstack.models import param_groups
from lesionstack.paths import FoldFiles
from lesionstack.runtime import DistContext, Runtime, adamw, barrier, load_optimiser_state, seed_everything
from lesionstack.train.ema import WeightEMA
from lesionstack.train.gate_masks import CachedMasks

log = logging.getLogger(__name__)

EpochHook = Callable[[int, int], None]  # (fold, epochs completed) -> None; raise to simulate a crash
# (logits, labels, dataset indices of the batch) -> loss; None: BCE on the labels (distillation adds a teacher)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- the optimiser --------------------------------------------------------------------------------------


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


def make_optimiser(model: nn.Module, lr: float, weight_decay: float, steps_per_epoch: int, epochs: int,
                   warmup_epochs: float, min_lr_ratio: float, rt: Runtime
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler]:
    """AdamW over `param_groups`, a per-step LR schedule (linear warm-up over `warmup_epochs`, then cosine to
    `lr * min_lr_ratio`), and a GradScaler that is on only for fp16 autocast (GPUs without bf16)."""
    opt = adamw(param_groups(model, lr, weight_decay), lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps_per_epoch * epochs, int(warmup_epochs * steps_per_epoch), min_lr_ratio))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    return opt, sched, scaler


# ---- one epoch --------------------------------------------------------------------------------------------


def epoch_generator(*seed: int) -> torch.Generator:
    """Seed python, numpy and torch from `seed` (e.g. seed, fold, epoch[, rank]) and return the generator the
    epoch's augmentation draws from: a resumed epoch repeats the lost one exactly."""
    seed_everything(*seed)
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))


def train_epoch(model: nn.Module, loader: DataLoader, dataset: CropDataset, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, rt: Runtime,
                augment: AugmentConfig, gen: torch.Generator, desc: str,
                loss_fn: LossFn | None = None, ema: WeightEMA | None = None,
                masks: CachedMasks | None = None) -> tuple[float, float]:
    """One pass over the epoch's draw (`ema`: averaged after each step; `masks`: the frozen gate's masks made
    once, warped with their crops); returns (mean train loss over all ranks, images/s over all ranks)."""
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
        x, given = rt.prepare(batch.images), {}
        if masks is None:
            x = rt.finish(augment_batch(x, augment, gen))
        else:  # the same draws as augment_batch: only the mask is new
            x, given["mask"] = augment_with_masks(x, masks.batch(batch.index, x), augment, gen)
            x = rt.finish(x)
        y = batch.labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(x, aux=True, **given)  # (B,), or (B, 1 + K) with auxiliary heads (loss_fn reads them)
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


# ---- one fold ---------------------------------------------------------------------------------------------


@dataclass
class FoldState:
    """The progress of a fold: what a checkpoint restores besides the weights and optimiser."""

    epoch: int = 0  # epochs completed
    best_score: float = -1.0  # validation score of the kept weights (CNN: pAUC; diagnosis: balanced accuracy)
    best_auc: float | None = None
    best_epoch: int = 0
    bad_rounds: int = 0  # validations since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)


def keep(state: FoldState, score: float, epoch: int, every_epoch: bool, auc: float | None = None) -> bool:
    """The keep rule: True when the weights of `epoch` become the fold's kept weights (the caller saves them):
    the best so far by `score`, or with `every_epoch` (keep: last) every validated epoch's, the final one last.
    Counts the validations without improvement that early stopping reads."""
    better = score > state.best_score
    if better or every_epoch:
        state.best_score, state.best_auc, state.best_epoch = score, auc, epoch
    state.bad_rounds = 0 if better else state.bad_rounds + 1
    return better or every_epoch


def run_epochs(state: FoldState, epochs: int, epoch_fn: Callable[[int], dict[str, Any]],
               stop: Callable[[FoldState], bool], end_epoch: Callable[[FoldState, dict[str, Any]], None]) -> None:
    """The epoch loop from where `state` stopped: `stop` is checked first (so a run killed after its stopping
    epoch's checkpoint also stops on resume), `epoch_fn(epoch)` trains and validates one epoch and returns its
    history row, `end_epoch` logs and checkpoints it."""
    for epoch in range(state.epoch, epochs):
        if stop(state):
            break
        row = epoch_fn(epoch)
        state.history.append(row)
        state.epoch = epoch + 1
        end_epoch(state, row)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_torch(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_dict(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler,
                    state: FoldState, ema: WeightEMA | None = None, rng: bool = True) -> dict[str, Any]:
    """What `resume` restores; `rng`: also the python, numpy and torch RNG states."""
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "state": dataclasses.asdict(state)}
    if rng:
        ckpt["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    return ckpt if ema is None else {**ckpt, "ema": ema.state_dict()}


LEGACY_STATE_KEYS = {"best_pauc": "best_score"}  # CNN checkpoints of earlier releases


def resume(files: FoldFiles, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
           scaler: torch.amp.GradScaler, fold: int, what: str = "fold", ema: WeightEMA | None = None) -> FoldState:
    """Restore a killed fold from its last checkpoint (and `ema`, the weight average), or start a fresh state
    (`what` names the fold in the log)."""
    if not files.checkpoint.exists():
        return FoldState()
    ckpt = torch.load(files.checkpoint, map_location="cpu", weights_only=False)  # our own local file
    model.load_state_dict(ckpt["model"])
    load_optimiser_state(opt, ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:  # ema_decay is compared by the resume guard, so an EMA run's checkpoint holds one
        ema.load_state_dict(ckpt["ema"])
    state = FoldState(**{LEGACY_STATE_KEYS.get(k, k): v for k, v in ckpt["state"].items()})
    log.info("%s %d: resuming after epoch %d from %s", what, fold, state.epoch, files.checkpoint)
    return state


def finish(files: FoldFiles, metrics: dict[str, Any], done_line: str, ctx: DistContext) -> dict[str, Any]:
    """metrics.json, then DONE (last, so its presence means the fold is complete); drop the checkpoint."""
    if ctx.is_main:
        write_json(files.metrics, metrics)
        write_text(files.done, done_line)
        files.checkpoint.unlink(missing_ok=True)
    barrier(ctx)
    return metrics
