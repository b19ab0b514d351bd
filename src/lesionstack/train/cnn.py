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

import dataclasses
import functools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as torch_dist

from lesionstack import provenance
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.metadata import check_images_cover
from lesionstack.folds import read_folds
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.resume import file_digest, guard, images_digest
from lesionstack.runtime import (
    DistContext,
    RunSettings,
    Runtime,
    amp_dtype,
    barrier,
    init_distributed,
    resolve_device,
)
from lesionstack.train.aux_heads import attach_aux_classes
from lesionstack.train.cnn_config import CNNConfig, check_weights_files, resolve_untrained_segmenter
from lesionstack.train.cnn_fold import fold_inputs, guard_ignore, member_config, train_fold
from lesionstack.train.cnn_pool import (
    _fold_or_name_it,
    _in_process,
    _train_fold_in_process,
    fold_pool,
    pool_workers,
    run_in_pool,
)
from lesionstack.train.cnn_scores import (
    FoldScores,
    JobRunner,
    ScoreJobs,
    read_scores,
    save_scores,
    scores_inputs,
    scores_up_to_date,
    write_scores,
)
from lesionstack.train.loop import EpochHook
from lesionstack.train.pretrain import pretrain_on_archive
from lesionstack.trained.loaders import cnn_fold_done

log = logging.getLogger(__name__)


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
    scoring = pool_scoring(data, folds, images, cfg, art, rt, todo, all_folds, on_epoch_end)
    trained, scored = train_folds(todo, folds, images, cfg, art, rt, on_epoch_end, inputs, Path(folds_path), scoring)
    summary: dict[str, Any] = {"folds": trained}
    if ctx.is_main:  # after the folds trained: a failing call changes nothing; serve/score/predict read it
        provenance.record(art.root, data.root, ("cnn",))
    if all(cnn_fold_done(art.cnn_fold(k)) for k in all_folds):
        record = scores_inputs(data, art, folds, all_folds, train_images)
        if scores_up_to_date(data, art, record):
            summary.update(read_scores(folds, art))
        elif scoring is not None:
            summary.update(save_scores(folds, art, rt, record, scoring.test_ids, scored))
        else:
            runner = score_runner(cfg, rt, len(all_folds))
            summary.update(write_scores(data, folds, images, cfg, art, rt, record, runner))
    elif ctx.is_main:
        log.info("not all folds done yet; oof_cnn/test_cnn are written when the last fold finishes")
    return summary


def pool_scoring(data: DataPaths, folds: pd.DataFrame, images: H5Images, cfg: CNNConfig, art: ArtifactPaths,
                 rt: Runtime, todo: Sequence[int], all_folds: Sequence[int],
                 on_epoch_end: EpochHook | None) -> ScoreJobs | None:
    """The scoring jobs the CPU fold pool runs as each fold finishes training, when this run trains there, and
    trains every fold not done yet: the scores must be rewritten, and a fold's scoring fills a process that
    would wait for the last fold (5 folds on 2 processes train as 2 + 2 + 1). None: score after training."""
    not_done = [k for k in all_folds if not cnn_fold_done(art.cnn_fold(k))]
    if not training_workers(cfg, rt, todo, on_epoch_end) or not not_done or set(not_done) - set(todo):
        return None
    return ScoreJobs.of(data, folds, images, cfg, art, rt, pooled=True)


def training_workers(cfg: CNNConfig, rt: Runtime, todo: Sequence[int], on_epoch_end: EpochHook | None) -> int:
    """The fold processes that train `todo` (each fold's `seeds_per_fold` members): 0 for one after the other
    in this process (a GPU, torchrun, one worker, or an epoch hook, which must run here)."""
    return 0 if on_epoch_end is not None else pool_workers(cfg, rt, len(todo) * cfg.seeds_per_fold)


def train_folds(todo: Sequence[int], folds: pd.DataFrame, images: H5Images, cfg: CNNConfig, art: ArtifactPaths,
                rt: Runtime, on_epoch_end: EpochHook | None, inputs: dict[str, str], folds_path: Path,
                scoring: ScoreJobs | None = None) -> tuple[dict[int, dict[str, Any]], dict[int, FoldScores]]:
    """`train_fold` for each fold of `todo` and each of its `seeds_per_fold` members: one after the other,
    or `cfg.fold_workers` at a time in their own processes (CPU, one process, no epoch hook), where each
    fold's `scoring` job (`pool_scoring`) runs once the fold is trained; returns ({fold: metrics of its
    member 0}, {fold: its scores} when `scoring` was given)."""
    todo_members = [(k, r) for k in todo for r in range(cfg.seeds_per_fold)]
    for k, r in todo_members:  # refuse before any job starts: a pool would train the others meanwhile
        guard(art.cnn_fold(k).member(r), member_config(cfg, r), inputs, ignore=guard_ignore(cfg), write=False)
    workers = training_workers(cfg, rt, todo, on_epoch_end)
    if not workers:
        done = {(k, r): _fold_or_name_it(k, folds_path, train_fold, k, folds, images, member_config(cfg, r),
                                         art.cnn_fold(k).member(r), rt, on_epoch_end, inputs=inputs)
                for k, r in todo_members}
        return {k: done[(k, 0)] for k in todo}, {}
    log.info("training folds %s (%d model(s) each), %d at a time (a process each, %d torch thread(s) each)",
             list(todo), cfg.seeds_per_fold, workers, max(cfg.cpu_threads, 1))
    done, scored = _train_in_pool(todo_members, folds, images, cfg, art, rt, inputs, folds_path, workers, scoring)
    return {k: done[(k, 0)] for k in todo}, scored


def _train_in_pool(todo_members: list[tuple[int, int]], folds: pd.DataFrame, images: H5Images, cfg: CNNConfig,
                   art: ArtifactPaths, rt: Runtime, inputs: dict[str, str], folds_path: Path, workers: int,
                   scoring: ScoreJobs | None) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[int, FoldScores]]:
    """Every (fold, member) job in `workers` fold processes; each fold's scoring job (first the folds that were
    done already) joins the queue behind the training jobs as soon as the fold has no member left."""
    threads = max(cfg.cpu_threads, 1)
    with fold_pool(workers) as pool:
        jobs = {pool.submit(_in_process, threads, _fold_or_name_it, k, folds_path, _train_fold_in_process, k, folds,
                            images.path, member_config(cfg, r), art.cnn_fold(k).member(r), inputs): (k, r)
                for k, r in todo_members}
        left = Counter(k for k, _ in todo_members)
        scoring_jobs: dict[Future[FoldScores], int] = {}

        def score(k: int) -> None:
            if scoring is not None:
                fn, args = scoring.job(k)
                scoring_jobs[pool.submit(_in_process, threads, fn, *args)] = k

        for k in scoring.all_folds if scoring is not None else ():
            if k not in left:
                score(k)
        done = {}
        for job in rt.bar(as_completed(jobs), "CNN folds", total=len(jobs)):
            k, r = jobs[job]
            done[(k, r)] = job.result()
            left[k] -= 1
            if not left[k]:
                score(k)
        return done, {k: job.result() for job, k in scoring_jobs.items()}


def score_runner(cfg: CNNConfig, rt: Runtime, n_folds: int) -> JobRunner | None:
    """Score the folds in `fold_workers` one-thread fold processes, as they trained (None: in this process)."""
    workers = pool_workers(cfg, rt, n_folds)
    return functools.partial(run_in_pool, workers=workers, threads=max(cfg.cpu_threads, 1)) if workers else None


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


def cnn_stage(data: DataPaths, art: ArtifactPaths, cfg: CNNConfig, *,
              folds_only: Sequence[int] | None = None) -> CNNResult:
    """The `train-cnn` stage on the fold file `data.fold_file(art)` (default `art.folds`): see `train_cnn`."""
    summary = train_cnn(data.root, data.fold_file(art), cfg, art.root, folds_only=folds_only)
    per_fold = tuple(CNNFoldResult.of(int(k), m, summary, cfg.keep) for k, m in sorted(summary["folds"].items()))
    return CNNResult(per_fold, cfg.keep, summary.get("oof_pauc"), summary.get("oof_auc"))
