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
from typing import Any, Literal

from lesionstack.config import (
    ConfigError,
    Fraction,
    Invalid,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    check_fields,
    load_config,
    retired,
    runtime,
)
from lesionstack.data.augment import AugmentConfig
from lesionstack.models import ModelConfig, check_model_names, with_segmenter
from lesionstack.train.aux_heads import AuxDiagnosisConfig, aux_outputs

log = logging.getLogger(__name__)

# with keep: last, validation only watches (nothing is picked on it, and each epoch reseeds), so how often and on
# how many crops it runs cannot change the fold's weights
MONITOR_KEYS = ("val_every", "val_max_negatives")
# where the initial weights were read from: provenance only (the fold's model.safetensors holds every weight), and
# absolute, so comparing them would refuse to resume a copied or moved artifacts folder
PROVENANCE_KEYS = ("model.segmenter_weights", "model.classifier_weights")
INIT_KEYS = ("init_weights",)  # likewise: its bytes are a fold input (`train.cnn._train_cnn`)

AMP = Literal["auto", "bf16", "fp16", "off"]
KEEP_BEST_GONE = ("best picked each fold's epoch by the pAUC of the fold it then scores, which made the "
                  "out-of-fold scores optimistic; it is gone. Use keep: last (the final epoch) or keep: best_inner "
                  "(the epoch picked on an inner split of the training folds)")


@dataclass
class ArchiveConfig:
    """The CNN config's `archive` section: ISIC Archive images the CNN learns from before the folds."""

    dir: str = ""  # the OUTDIR of `isic image download` (<isic_id>.JPG + metadata.csv); `demo-data --archive N`
    # pretrain: train the fold network on the archive once, then every fold fine-tunes from those weights
    mode: Literal["pretrain"] = "pretrain"
    epochs: PositiveInt = 4  # passes over the archive
    lr: PositiveFloat | None = None  # null: the CNN's lr
    indeterminate_target: Probability = 0.5  # the soft target of "Indeterminate" records (benign 0, malignant 1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class CNNConfig:
    """Everything that defines one per-fold CNN run (defaults: a real-data run on a GPU)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: PositiveInt = 128
    batch_size: PositiveInt = 64  # per process
    eval_batch_size: PositiveInt = runtime(256)
    epochs: PositiveInt = 10
    lr: PositiveFloat = 2e-4  # AdamW fine-tuning rate for ImageNet weights (1e-4 learnt too slowly)
    weight_decay: NonNegativeFloat = 1e-2
    warmup_epochs: NonNegativeFloat = 1.0
    min_lr_ratio: Probability = 0.01  # cosine decays to lr * min_lr_ratio
    # each epoch: all positives + this many times as many fresh negatives (real data: 314 positives a fold,
    # so 250 gives ~1,200 optimiser steps an epoch at batch 64; 3 gave 19)
    neg_per_pos: PositiveFloat = 250.0
    # last: score with the final epoch; the per-epoch validation on the scored fold is monitoring only, so
    # the OOF scores are unbiased. best_inner: hold out an inner split of the training folds (whole
    # patients, positives balanced; `inner_folds`), validate on it, stop early and keep the epoch of best
    # inner pAUC; the scored fold still picks nothing.
    keep: Literal["last", "best_inner"] = retired("last", best=KEEP_BEST_GONE)
    inner_folds: PositiveInt = 5  # best_inner: the inner split is one of this many patient-grouped parts
    patience: NonNegativeInt = 3  # inner validations without a better pAUC before stopping (keep: best_inner only)
    val_every: PositiveInt = 1  # validate every n epochs (and after the last)
    # per-epoch validation on every positive plus at most this many negatives (a fixed seeded draw); null
    # scores all of it. The final out-of-fold scores always cover the whole fold.
    val_max_negatives: PositiveInt | None = None
    # model.gate train/freeze with no segmenter weights (and, in `run`, no masks folder to train one):
    # refuse: stop and say what to give; gate_none: fall back to model.gate none (a plain classifier);
    # allow: the segmenter starts from random init inside the CNN (a gate of noise until it learns). A policy
    # decided before training, never compared on resume: gate_none's effect is in model.gate.
    untrained_segmenter: Literal["refuse", "gate_none", "allow"] = runtime("refuse")
    # model.gate freeze: online runs the frozen segmenter on every augmented batch; cached makes each training
    # crop's mask once, of the plain crop, and warps it with its crop's flips, rotation, zoom and shift (colour
    # jitter is the image's alone), and scoring makes one mask per crop for every TTA view. Changes the
    # figures; costs one byte per training pixel in each fold process (400,000 crops at 128 px: 6.5 GB), so
    # online stays the default and cached is the small-data setting (`train.gate_masks`)
    gate_masks: Literal["online", "cached"] = "online"
    tta_hflip: bool = True  # average the logits of the image and its mirror when scoring
    tta_dihedral: bool = False  # and of their rotations by 90, 180, 270 degrees: 8 views (4x the scoring time)
    # auxiliary diagnosis heads trained beside the malignancy logit (`train.aux_heads`); null: off. Sets
    # model.aux_outputs (the head's extra outputs), so the saved fold config rebuilds the head.
    aux_diagnosis: AuxDiagnosisConfig | None = None
    # score and save an exponential moving average of the weights (decay per optimiser step: horizon about
    # 1 / (1 - decay) steps) instead of the final step's noisy weights; null: off. See `WeightEMA`.
    ema_decay: Fraction | None = None
    # ISIC Archive images (`isic image download` layout) to pretrain the fold network on before the folds
    # fine-tune from it (`train.pretrain`); null: off
    archive: ArchiveConfig | None = None
    # a full model's weights (safetensors, this `model` section) every fold starts from; set by the archive
    # pretraining; its bytes are a fold input, its path provenance only
    init_weights: str | None = None
    # train this many models per fold, with seeds seed, seed + 1, ...; the fold scores with the mean of
    # their logits (`models.SeedEnsemble`). One small model's OOF moves with its seed about as much as most
    # recipe changes do; two seeds lower that variance for twice the training (README "Seed ensembles").
    seeds_per_fold: PositiveInt = 1
    seed: int = 42
    num_workers: NonNegativeInt = runtime(2)
    # torch threads on CPU; 0 keeps torch's default (1 is faster on a busy machine)
    cpu_threads: NonNegativeInt = runtime(0)
    # CPU only: train this many folds at once, each in its own process with `cpu_threads` threads. Small
    # CPU models use one core far better than two threads do, so two folds side by side on a 2-core machine
    # finish nearly twice as fast as one after the other. Results are the same either way.
    fold_workers: PositiveInt = runtime(1)
    skip_corrupt: bool = False  # True: log and skip undecodable crops; False: stop naming the isic_id
    device: str = runtime("auto")  # auto: cuda when available, else cpu (or cpu, cuda, cuda:1, ...)
    amp: AMP = "auto"  # auto: bf16 on a GPU that has it, else fp16 (+ GradScaler) on GPU; off on CPU
    channels_last: bool = True  # NHWC model and batches, on CPU and CUDA (faster on both)
    progress: bool = runtime(True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.keep == "best_inner" and self.inner_folds < 2:
            raise Invalid("inner_folds", "an integer >= 2 with keep: best_inner", self.inner_folds)
        if self.gate_masks == "cached" and self.model.gate == "train":  # a training gate's mask moves each step
            raise Invalid("gate_masks", "online with model.gate train (cached needs a frozen gate)", "cached")
        if self.gate_masks == "cached" and self.augment.enabled and self.augment.phone.p > 0:
            # the phone degradation changes the crop itself each epoch: a mask made once would not be its mask
            raise Invalid("gate_masks", "online with augment.phone.p > 0", "cached")
        if self.model.aux_outputs != aux_outputs(self.aux_diagnosis):  # derived, never set by hand
            self.model = dataclasses.replace(self.model, aux_outputs=aux_outputs(self.aux_diagnosis))


def load_cnn_config(path: str | os.PathLike[str] | None = None,
                    segmenter: str | os.PathLike[str] | None = None, **overrides: Any) -> CNNConfig:
    """Defaults, then the YAML at `path`, then `overrides`; `segmenter` replaces model.segmenter_weights."""
    cfg = load_config(CNNConfig, path, **overrides)
    check_model_names(cfg.model, str(path or "CNN config"))
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
