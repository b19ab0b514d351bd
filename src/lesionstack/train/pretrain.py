"""Pretrain the per-fold CNN on ISIC Archive images, then let every fold fine-tune from those weights.

The 1st place of ISIC 2024 pretrained its image model on archive images pulled with `isic-cli` (a
3-class target from the archive's diagnosis), then fine-tuned on the competition crops: private pAUC
0.163 -> 0.165. Here the CNN config's `archive` section names an `isic image download` folder
(`data.archive`): the network the folds train (same `model` section, so every weight carries over) first
trains on the archive's benign (target 0) and malignant (1) records, indeterminate ones with the soft
target `indeterminate_target`, for `epochs` epochs (each one pass over the archive in a seeded shuffle),
with the fold recipe's optimiser, schedule, batch size and augmentation. Each fold then starts from these
weights instead of its random or ImageNet start (`CNNConfig.init_weights`).

No competition crop is used, so the pretraining is done once for all folds, and no fold's validation
rows leak into another fold. Written under the artifacts root, `cnn/pretrain/`: `config.yaml`,
`inputs.json` (the archive's labels and image bytes), `model.safetensors`, `metrics.json`, `DONE`; a rerun
reuses a finished pretraining made by the same config from the same archive, and refuses another.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Sampler

from lesionstack.config import ConfigError
from lesionstack.data.archive import BENIGN, INDETERMINATE, MALIGNANT, read_archive
from lesionstack.data.dataset import CropDataset
from lesionstack.files import write_json, write_text
from lesionstack.models import build_model
from lesionstack.paths import ArtifactPaths, FoldFiles
from lesionstack.resume import Resume, file_digest, files_digest, frame_digest, guard
from lesionstack.runtime import Runtime, make_loader, save_weights, seed_everything

if TYPE_CHECKING:
    from lesionstack.train.cnn_config import CNNConfig

log = logging.getLogger(__name__)

class EpochShuffle(Sampler[int]):
    """Every index once per epoch, in an order seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        return iter(np.random.default_rng([self.seed, self.epoch, 17]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def archive_targets(labels: np.ndarray, indeterminate_target: float) -> np.ndarray:
    """Class indices (benign, malignant, indeterminate) -> the BCE targets 0, 1, `indeterminate_target`."""
    values = np.zeros(len(labels), dtype=np.float32)
    values[labels == MALIGNANT] = 1.0
    values[labels == INDETERMINATE] = indeterminate_target
    assert np.isin(labels, [BENIGN, MALIGNANT, INDETERMINATE]).all()
    return values


def pretrain_files(art: ArtifactPaths) -> FoldFiles:
    return FoldFiles(art.cnn_dir / "pretrain")


def pretrain_on_archive(cfg: CNNConfig, art: ArtifactPaths, rt: Runtime) -> Path:
    """Train `cfg.model` on `cfg.archive` (or reuse a finished pretraining); return its weights file."""
    from lesionstack.train.cnn_config import PROVENANCE_KEYS
    from lesionstack.train.loop import epoch_generator, make_optimiser, train_epoch

    assert cfg.archive is not None
    if not cfg.archive.dir:
        raise ConfigError("cnn archive.dir: name the folder `isic image download` wrote (or set archive: null)")
    archive = read_archive(cfg.archive.dir)
    files = pretrain_files(art)
    files.dir.mkdir(parents=True, exist_ok=True)
    inputs = {"archive_labels": frame_digest(archive.table),
              "archive_images": files_digest([archive.images.files[i] for i in archive.table["isic_id"]])}
    for key in PROVENANCE_KEYS:  # a segmenter (or timm weights) the network starts from: its bytes
        if (path := getattr(cfg.model, key.split(".")[1])) is not None:
            inputs[key] = file_digest(path)
    record = _pretrain_record(cfg)
    # paths are provenance (the archive's labels and image bytes, the weights' bytes are inputs)
    ignore = (*PROVENANCE_KEYS, "archive.dir")  # and the runtime() fields, as every guard
    if guard(files, record, inputs, ignore=ignore, partial=(), write=rt.ctx.is_main) is Resume.SKIP:
        log.info("archive pretraining: done before, reused (%s)", files.done)
        return files.safetensors
    log.info("archive pretraining on %s", archive)
    targets = archive_targets(archive.table["label"].to_numpy(), cfg.archive.indeterminate_target)
    dataset = CropDataset(archive.images, archive.table["isic_id"], targets, cfg.image_size)
    seed_everything(cfg.seed, 7919)
    model = rt.place(build_model(cfg.model))
    sampler = EpochShuffle(len(dataset), cfg.seed)
    loader = make_loader(dataset, rt, sampler=sampler, batch_size=cfg.batch_size,
                         drop_last=len(dataset) > cfg.batch_size)
    opt, sched, scaler = make_optimiser(model, cfg.archive.lr or cfg.lr, cfg.weight_decay, len(loader),
                                        cfg.archive.epochs, cfg.warmup_epochs, cfg.min_lr_ratio, rt)
    history = []
    for epoch in range(cfg.archive.epochs):
        gen = epoch_generator(cfg.seed, 7919, epoch)
        sampler.set_epoch(epoch)
        loss, ips = train_epoch(model, loader, dataset, opt, sched, scaler, rt, cfg.augment, gen,
                                f"archive epoch {epoch + 1}/{cfg.archive.epochs}")
        history.append({"epoch": epoch + 1, "train_loss": loss, "images_per_s": ips})
        log.info("archive pretraining epoch %d: train_loss %.4f (%.0f img/s)", epoch + 1, loss, ips)
    if rt.ctx.is_main:
        save_weights(model, files.safetensors)
        write_json(files.metrics, {"epochs": history, "n_images": len(dataset), "classes": archive.counts()})
        write_text(files.done, "done\n")
    return files.safetensors


def _pretrain_record(cfg: CNNConfig) -> Any:
    """What the pretraining depends on: the CNN config without the keys only the folds use."""
    import dataclasses

    # the folds' keys held at one fixed (valid) value each: they never change the pretraining
    return dataclasses.replace(cfg, init_weights=None, epochs=1, keep="last", seeds_per_fold=1)


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Start a fold from a full model's weights (the archive pretraining's); every key must match."""
    from lesionstack.runtime import load_weights

    if not Path(path).is_file():
        raise ConfigError(f"cnn init_weights: {path} does not exist")
    missing, unexpected = model.load_state_dict(load_weights(path), strict=False)
    if missing or unexpected:
        raise ConfigError(f"cnn init_weights: {path} does not fit the model section (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); pretrain with the same model")
