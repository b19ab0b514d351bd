"""The CNN stage's scores: each fold's validation rows by its own fold model (`oof_cnn.parquet`, the OOF
contract `check_oof`) and the test set by every fold model (`test_cnn.parquet`, through the same
`trained.scorer.FoldScorer` that prediction uses), rescored when what they were scored from changed
(`cnn/scores_inputs.json`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesionstack.config import config_to_dict, read_config_dict
from lesionstack.data.dataset import CropDataset
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.metadata import check_images_cover, id_mismatch
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import atomic_path, read_json, write_json
from lesionstack.folds import folds_digest
from lesionstack.metrics import pauc, roc_auc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.resume import changed_inputs, describe, files_digest, frame_digest, images_digest
from lesionstack.runtime import Runtime, barrier, predict_logits, sigmoid
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.trained.loaders import cnn_fold_members, load_cnn_fold, load_network
from lesionstack.trained.scorer import FoldScorer, fold_score_column, fold_table

log = logging.getLogger(__name__)

Job = tuple[Callable[..., Any], tuple[Any, ...]]  # (function, its arguments)
# [job] -> [each function's result], in order (`train.cnn_pool.run_in_pool`)
JobRunner = Callable[[list[Job]], list[Any]]
FoldScores = tuple[pd.DataFrame, "np.ndarray | None"]  # `score_fold`'s result: OOF rows, test scores


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
                 art: ArtifactPaths, rt: Runtime, inputs: dict[str, str | None],
                 run_jobs: JobRunner | None = None) -> dict[str, Any]:
    """Score each fold's val rows with its own fold model (OOF) and the test set with every fold model
    (through `trained.scorer.FoldScorer`, as `predict` does: an unreadable test crop is NaN, never a stop); record
    `inputs` (what they were scored from) last.

    By `run_jobs`, each fold's OOF and test scores are one job (`score_fold`) in the CPU fold pool's one-thread
    processes; here, the folds' OOF rows one after the other and the test crops decoded once for all fold
    models. A crop's score is computed the same way either way (the same batches, one thread), so the files
    hold the same bits."""
    jobs = ScoreJobs.of(data, folds, images, cfg, art, rt, pooled=run_jobs is not None)
    if run_jobs is not None:
        done = dict(zip(jobs.all_folds, run_jobs([jobs.job(k) for k in jobs.all_folds])))
    else:
        done = score_in_this_process(jobs)
    return save_scores(folds, art, rt, inputs, jobs.test_ids, done)


def score_in_this_process(jobs: ScoreJobs) -> dict[int, FoldScores]:
    """Each fold's OOF rows by its `score_fold` job without the test set, then the test ids by every fold
    model in one pass (`FoldScorer`), so a large test file is decoded once, not once a fold."""
    oof = {}
    for k in jobs.all_folds:
        fn, args = jobs.job(k, with_test=False)
        oof[k] = fn(*args)[0]
    if jobs.test_ids is None:
        return {k: (rows, None) for k, rows in oof.items()}
    rt = jobs.rt
    scorer = FoldScorer.load(jobs.art.root, device=str(rt.device), progress=rt.settings.progress, folds=list(oof),
                             batch_size=jobs.cfg.eval_batch_size, num_workers=jobs.cfg.num_workers, ctx=rt.ctx)
    test = scorer.score_hdf5(jobs.test_images, ids=jobs.test_ids, per_fold=True)
    return {k: (rows, test[fold_score_column(k)].to_numpy()) for k, rows in oof.items()}


@dataclass(frozen=True)
class ScoreJobs:
    """What `score_fold` needs besides the fold, and the folds to score: `job(k)` is fold k's job."""

    folds: pd.DataFrame
    images: Path
    cfg: CNNConfig
    art: ArtifactPaths
    rt: Runtime
    test_images: Path
    test_ids: list[str] | None  # None without a test set

    @classmethod
    def of(cls, data: DataPaths, folds: pd.DataFrame, images: H5Images, cfg: CNNConfig, art: ArtifactPaths,
           rt: Runtime, pooled: bool) -> ScoreJobs:
        """`pooled`: jobs for the CPU fold processes (no progress bars)."""
        tids = test_ids(data, H5Images(data.test_images)) if data.test_images.exists() else None
        quiet = dataclasses.replace(rt.settings, progress=False)  # two processes' bars would overwrite each other
        job_rt = dataclasses.replace(rt, settings=quiet) if pooled else rt
        return cls(folds, images.path, cfg, art, job_rt, data.test_images, tids)

    @property
    def all_folds(self) -> list[int]:
        return sorted(int(k) for k in self.folds["fold"].unique())

    def job(self, fold: int, with_test: bool = True) -> Job:
        """Fold `fold`'s `score_fold` job: its OOF rows, and the test ids unless not `with_test`."""
        return (score_fold, (fold, self.folds, self.images, self.cfg.image_size, self.art, self.rt, self.test_images,
                             self.test_ids if with_test else None, self.cfg.eval_batch_size, self.cfg.num_workers))


def save_scores(folds: pd.DataFrame, art: ArtifactPaths, rt: Runtime, inputs: dict[str, str | None],
                tids: list[str] | None, done: dict[int, FoldScores]) -> dict[str, Any]:
    """Check every fold's `score_fold` result against the OOF contract, write oof_cnn and (with test ids
    `tids`) test_cnn atomically, then `inputs` (what they were scored from) last; the OOF summary."""
    all_folds = sorted(done)
    oof = pd.concat([done[k][0] for k in all_folds], ignore_index=True)
    check_oof(oof, folds)
    summary = oof_summary(folds, oof)
    test = None if tids is None else fold_table(tids, np.column_stack([done[k][1] for k in all_folds]), all_folds)
    if rt.ctx.is_main:
        with atomic_path(art.oof_cnn) as tmp:
            oof.to_parquet(tmp, index=False)
        if test is not None:
            with atomic_path(art.test_cnn) as tmp:
                test.to_parquet(tmp, index=False)
        write_json(art.cnn_scores_inputs, inputs)
    barrier(rt.ctx)
    return summary


def score_fold(fold: int, folds: pd.DataFrame, images: Path, image_size: int, art: ArtifactPaths, rt: Runtime,
               test_images: Path, tids: list[str] | None, batch_size: int,
               num_workers: int) -> tuple[pd.DataFrame, np.ndarray | None]:
    """One fold's scores: its validation rows by its own model (DataFrame[isic_id, fold, score], flip TTA as
    the settings say) and the test ids `tids` by the same model through `FoldScorer`, as `predict` scores them
    (None without a test set; under DDP every rank gets all of them)."""
    files = art.cnn_fold(fold)  # its seed ensemble when it has members, as prediction loads it
    model = rt.place(load_cnn_fold(files, read_config_dict(files.config)))
    val = folds[folds["fold"] == fold]
    val_ds = CropDataset(H5Images(images), val[ID_COLUMN], val["target"], image_size)
    scores = sigmoid(predict_logits(model, val_ds, rt, desc=f"OOF fold {fold}"))
    oof = pd.DataFrame({ID_COLUMN: val_ds.ids, "fold": fold, "score": scores})
    if tids is None:
        return oof, None
    scorer = FoldScorer.load(art.root, device=str(rt.device), progress=rt.settings.progress, folds=[fold],
                             batch_size=batch_size, num_workers=num_workers, ctx=rt.ctx)
    return oof, scorer.score_hdf5(test_images, ids=tids, per_fold=True)[fold_score_column(fold)].to_numpy()


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
