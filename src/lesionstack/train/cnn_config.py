"""The per-fold CNN's config (`CNNConfig`), its YAML loader, and the checks run before any fold trains.

The stage that trains with it is `lesionstack.train.cnn`; the keys the resume guard ignores live here, beside
the fields they name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesionstack.config import ConfigError, load_config
from lesionstack.data.augment import AugmentConfig
from lesionstack.models import ModelConfig, with_segmenter
from lesionstack.train.aux_heads import AuxDiagnosisConfig, aux_outputs

log = logging.getLogger(__name__)

# Top-level config keys that change how fast a fold trains, never what it learns.
RUNTIME_KEYS = ("eval_batch_size", "num_workers", "cpu_threads", "fold_workers", "device", "progress")
# with keep: last, validation only watches (nothing is picked on it, and each epoch reseeds), so how often and on
# how many crops it runs cannot change the fold's weights
MONITOR_KEYS = ("val_every", "val_max_negatives")
# where the initial weights were read from: provenance only (the fold's model.safetensors holds every weight), and
# absolute, so comparing them would refuse to resume a copied or moved artifacts folder
PROVENANCE_KEYS = ("model.segmenter_weights", "model.classifier_weights")
INIT_KEYS = ("init_weights",)  # likewise: its bytes are a fold input (`train.cnn._train_cnn`)

UNTRAINED_SEGMENTER = ("allow", "refuse", "gate_none")
KEEP = ("last", "best_inner")

ARCHIVE_MODES = ("pretrain",)


@dataclass
class ArchiveConfig:
    """The CNN config's `archive` section: ISIC Archive images the CNN learns from before the folds."""

    dir: str = ""  # the OUTDIR of `isic image download` (<isic_id>.JPG + metadata.csv); `demo-data --archive N`
    # pretrain: train the fold network on the archive once, then every fold fine-tunes from those weights
    mode: str = "pretrain"
    epochs: int = 4  # passes over the archive
    lr: float | None = None  # null: the CNN's lr
    indeterminate_target: float = 0.5  # the soft target of "Indeterminate" records (benign 0, malignant 1)

    def __post_init__(self) -> None:
        if self.mode not in ARCHIVE_MODES:
            raise ConfigError(f"cnn archive.mode must be one of {ARCHIVE_MODES}, got {self.mode!r}")
        if self.epochs < 1:
            raise ConfigError(f"cnn archive.epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.indeterminate_target <= 1.0:
            raise ConfigError(f"cnn archive.indeterminate_target must be in [0, 1], got {self.indeterminate_target}")


@dataclass
class CNNConfig:
    """Everything that defines one per-fold CNN run (defaults: a real-data run on a GPU)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: int = 128
    batch_size: int = 64  # per process
    eval_batch_size: int = 256
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    neg_per_pos: float = 3.0  # each epoch: all positives + this many times as many fresh negatives
    # last: score with the final epoch; the per-epoch validation on the scored fold is monitoring only, so
    # the OOF scores are unbiased. best_inner: hold out an inner split of the training folds (whole
    # patients, positives balanced; `inner_folds`), validate on it, stop early and keep the epoch of best
    # inner pAUC; the scored fold still picks nothing.
    keep: str = "last"
    inner_folds: int = 5  # best_inner: the inner split is one of this many patient-grouped parts of the training rows
    patience: int = 3  # inner validations without a better pAUC before stopping (keep: best_inner only)
    val_every: int = 1  # validate every n epochs (and after the last)
    # per-epoch validation on every positive plus at most this many negatives (a fixed seeded draw); null
    # scores all of it. The final out-of-fold scores always cover the whole fold.
    val_max_negatives: int | None = None
    # model.gate train/freeze with no segmenter weights (and, in `run`, no masks folder to train one):
    # allow: the segmenter starts from random init inside the CNN; refuse: stop and say what to give;
    # gate_none: fall back to model.gate none (a plain classifier)
    untrained_segmenter: str = "allow"
    tta_hflip: bool = True  # average the logits of the image and its mirror when scoring
    tta_dihedral: bool = False  # and of their rotations by 90, 180, 270 degrees: 8 views (4x the scoring time)
    # auxiliary diagnosis heads trained beside the malignancy logit (`train.aux_heads`); null: off. Sets
    # model.aux_outputs (the head's extra outputs), so the saved fold config rebuilds the head.
    aux_diagnosis: AuxDiagnosisConfig | None = None
    # score and save an exponential moving average of the weights (decay per optimiser step: horizon about
    # 1 / (1 - decay) steps) instead of the final step's noisy weights; null: off. See `WeightEMA`.
    ema_decay: float | None = None
    # ISIC Archive images (`isic image download` layout) to pretrain the fold network on before the folds
    # fine-tune from it (`train.pretrain`); null: off
    archive: ArchiveConfig | None = None
    # a full model's weights (safetensors, this `model` section) every fold starts from; set by the archive
    # pretraining; its bytes are a fold input, its path provenance only
    init_weights: str | None = None
    # train this many models per fold, with seeds seed, seed + 1, ...; the fold scores with the mean of
    # their logits (`models.SeedEnsemble`). One small model's OOF moves with its seed about as much as most
    # recipe changes do; two seeds lower that variance for twice the training (README "Seed ensembles").
    seeds_per_fold: int = 1
    seed: int = 42
    num_workers: int = 2
    cpu_threads: int = 0  # torch threads on CPU; 0 keeps torch's default (1 is faster on a busy machine)
    # CPU only: train this many folds at once, each in its own process with `cpu_threads` threads. Small
    # CPU models use one core far better than two threads do, so two folds side by side on a 2-core machine
    # finish nearly twice as fast as one after the other. Results are the same either way.
    fold_workers: int = 1
    skip_corrupt: bool = False  # True: log and skip undecodable crops; False: stop naming the isic_id
    device: str = "auto"  # auto: cuda when available, else cpu
    amp: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 (+ GradScaler) on GPU; off on CPU
    channels_last: bool = True  # NHWC model and batches, on CPU and CUDA (faster on both)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.keep == "best":
            raise ConfigError("cnn keep: best picked each fold's epoch by the pAUC of the fold it then scores, "
                              "which makes the out-of-fold scores optimistic; it is gone. Use keep: last (the "
                              "final epoch) or keep: best_inner (the epoch picked on an inner split of the "
                              "training folds)")
        if self.keep not in KEEP:
            raise ConfigError(f"cnn keep must be one of {KEEP}, got {self.keep!r}")
        if self.keep == "best_inner" and self.inner_folds < 2:
            raise ConfigError(f"cnn inner_folds must be >= 2 with keep: best_inner, got {self.inner_folds}")
        if self.untrained_segmenter not in UNTRAINED_SEGMENTER:
            raise ConfigError(f"cnn untrained_segmenter must be one of {UNTRAINED_SEGMENTER}, "
                              f"got {self.untrained_segmenter!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"cnn ema_decay must be null or in (0, 1), got {self.ema_decay}")
        if self.seeds_per_fold < 1:
            raise ConfigError(f"cnn seeds_per_fold must be >= 1, got {self.seeds_per_fold}")
        if self.val_max_negatives is not None and self.val_max_negatives < 1:
            raise ConfigError(f"cnn val_max_negatives must be null or >= 1, got {self.val_max_negatives}")
        if self.model.aux_outputs != aux_outputs(self.aux_diagnosis):  # derived, never set by hand
            self.model = dataclasses.replace(self.model, aux_outputs=aux_outputs(self.aux_diagnosis))


def load_cnn_config(path: str | os.PathLike[str] | None = None,
                    segmenter: str | os.PathLike[str] | None = None, **overrides: Any) -> CNNConfig:
    """Defaults, then the YAML at `path`, then `overrides`; `segmenter` replaces model.segmenter_weights."""
    cfg = load_config(CNNConfig, path, **overrides)
    if segmenter is not None:
        if not Path(segmenter).is_file():
            raise FileNotFoundError(f"--segmenter {segmenter}: no such file")
        cfg.model = with_segmenter(cfg.model, segmenter)
    return cfg


def check_weights_files(model: ModelConfig, where: str = "CNN config") -> None:
    """Stop before any work when a configured local weights file is missing (nothing is downloaded)."""
    for key in ("classifier_weights", "segmenter_weights"):
        path = getattr(model, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(
                f"{where}: model.{key} is {path!r}, but no such file exists (relative paths are read from "
                f"{Path.cwd()}). Put the timm weights file there (nothing is downloaded at run time), point "
                f"model.{key} at it, or set it to null for random initialisation.")


def resolve_untrained_segmenter(cfg: CNNConfig, why: str = "") -> CNNConfig:
    """`cfg` as it will train when its gate has no segmenter weights, by `cfg.untrained_segmenter`.

    A gate on a random segmenter multiplies the image by noise until the classifier's loss has taught the
    segmenter something; on real data that wastes the run, so real-data configs refuse or fall back.
    """
    model = cfg.model
    if model.gate == "none" or model.segmenter_weights is not None or cfg.untrained_segmenter == "allow":
        return cfg
    if cfg.untrained_segmenter == "gate_none":
        log.warning("model.gate %r has no segmenter weights%s: untrained_segmenter is gate_none, so the CNN "
                    "trains without a gate (model.gate none)", model.gate, why)
        return dataclasses.replace(cfg, model=dataclasses.replace(model, gate="none"))
    raise ConfigError(
        f"model.gate is {model.gate!r} but model.segmenter_weights is null{why}: the CNN would gate on a "
        "randomly initialised segmenter. Give it a trained one (--segmenter artifacts/segmenter/model.pt from "
        "`lesionstack train-seg`, or masks_dir in the run config so `run` trains it), or set model.gate: none, "
        "or set untrained_segmenter: gate_none (fall back to no gate) or allow (train it from scratch).")
