"""Datasets and samplers for the CNN: HDF5 crops -> resized uint8 tensors, and the per-epoch draw.

Workers only read, decode (at a reduced JPEG scale when the model wants a small image) and resize, plus
the phone-photo degradation where a config asks for it (`PhoneCropDataset`); the rest of the random
augmentation runs batched on the training device (`lesionstack.data.augment`). Images stay uint8
until then, so a batch crosses process and device boundaries at a quarter of the float size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lesionstack.data.augment import AugmentConfig, PhoneConfig, degrade_crop
from lesionstack.data.decode import decode_input, resize_square, shrink
from lesionstack.data.hdf5 import CorruptImageError, CropRanges, H5Images

log = logging.getLogger(__name__)

PHONE_MAX_SIDE = 256  # phone degradation works on crops up to this side (ISIC 2024's are 60-240 px)

Item = tuple[torch.Tensor | None, float, int, str | None]


class Batch(NamedTuple):
    """A collated batch: uint8 images, float labels, dataset indices, and the crops that failed."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    corrupt: list[tuple[int, str]]  # (dataset index, reason)


class CropDataset(Dataset[Item]):
    """Crops of `ids` from one HDF5 file, resized to `image_size` square, as uint8 (3, S, S) tensors.

    An item is `(image, label, index, error)`; `index` is the position in `ids`, so scores map back to
    rows whatever the sampler did. A crop that cannot be decoded gives `image=None` and the reason in
    `error`: the decision to stop or skip is taken in the main process (`check_corrupt`), because an
    exception raised inside a DataLoader worker loses its type on the way back.
    """

    def __init__(self, images: H5Images | str | os.PathLike[str], ids: Sequence[str],
                 labels: Sequence[float] | None = None, image_size: int = 128) -> None:
        # a path opens an HDF5 file; any other reader with `read(id, min_side)` and `path` (e.g. the
        # diagnosis layouts' image folders) is used as it is
        self.images = H5Images(images) if isinstance(images, (str, os.PathLike)) else images
        self.ids = list(ids)
        self.skipped: set[str] = set()  # ids of corrupt crops skipped (`check_corrupt` with skip set)
        self.labels = np.zeros(len(self.ids), np.float32) if labels is None else np.asarray(labels, np.float32)
        if len(self.labels) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids but {len(self.labels)} labels")
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, index: int, min_side: int | None) -> np.ndarray:
        """The crop at `index` as decoded, (H, W, 3) uint8, at least `min_side` where it can be (raises
        `CorruptImageError`)."""
        isic_id = self.ids[index]
        array = self.images.read(isic_id, min_side=min_side)
        if array.ndim != 3 or array.shape[2] != 3:
            raise CorruptImageError(isic_id, f"decoded to shape {array.shape}, not (H, W, 3)", self.images.path)
        return array

    def load(self, index: int) -> np.ndarray:
        """The crop at `index` as an (S, S, 3) uint8 array, made by `decode_input` as `score` and `serve`
        make theirs (raises `CorruptImageError`)."""
        isic_id = self.ids[index]
        return decode_input(self.images.read_bytes(isic_id), self.image_size, where=isic_id, path=self.images.path)

    def __getitem__(self, index: int) -> Item:
        return self.item(index, self.load)

    def item(self, index: int, load: Callable[[int], np.ndarray]) -> Item:
        return decoded_item(index, float(self.labels[index]), load)


def decoded_item(index: int, label: float, load: Callable[[int], np.ndarray]) -> Item:
    """`(image, label, index, error)` of the crop `load(index)` makes, (H, W, 3) uint8 -> (3, H, W) tensor; a
    `CorruptImageError` gives `image=None` and its reason (the main process decides to stop or skip)."""
    try:
        array = load(index)
    except CorruptImageError as err:
        reason = str(err).split(": ", 1)[-1]  # drop the "image 'X' in file" prefix; re-added later
        return None, label, index, reason
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), label, index, None


class ScoringCrops(Dataset[Item]):
    """The crops of a single scoring pass, read by byte range (`CropRanges`), as `CropDataset.load` makes
    them; an item is `(image, 0.0, index, error)`. An unreadable crop (an I/O error) is a skipped item like
    an undecodable one: scoring never stops on one crop. Holds no Python object per crop, so a loader
    worker forked from a process scoring 500,000 crops copies nothing per crop."""

    def __init__(self, crops: CropRanges, image_size: int) -> None:
        self.crops, self.image_size = crops, int(image_size)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> Item:
        return decoded_item(index, 0.0, self.load)

    def load(self, index: int) -> np.ndarray:
        """The crop at `index` as `CropDataset.load` makes it; an I/O error is a `CorruptImageError` too."""
        where = self.crops.id(index)
        try:
            data = self.crops.read_bytes(index)
        except OSError as err:
            raise CorruptImageError(where, f"unreadable ({err})", self.crops.path) from err
        return decode_input(data, self.image_size, where=where, path=self.crops.path)


class PhoneCropDataset(CropDataset):
    """Training crops of which a share `phone.p` is degraded like a phone photo at the crop's own
    resolution, before it is resized to the model's input: as `phone-eval`'s degraded copy is made, so
    training and evaluation mean the same blur, capture size and JPEG. (Degrading the resized input instead
    was 2-4x harsher at 64-32 px: a 1.2-px blur at 32 px is ~5 px of a 130-px crop, and a quarter-size
    capture 8 px.) Keys come from `TaggedDraws`: (index, epoch, position in the epoch's draw), which seed each
    crop's degradation, so a resumed epoch repeats it (exactly with the same `num_workers` and
    `cpu_threads`: torch's resampling rounds differently across thread counts); a plain index gives the
    clean crop. An image larger than `PHONE_MAX_SIDE` (HAM10000's 600 x 450 photos, for train-diagnosis)
    is first shrunk to it: the strengths are set for ISIC 2024's 60-240 px crops, and degrading a 1,024-px
    photo costs ~40x a crop while the resize to the model's input would average most of it away."""

    def __init__(self, images: H5Images | str | os.PathLike[str], ids: Sequence[str],
                 labels: Sequence[float] | None, image_size: int, phone: PhoneConfig, seed: int) -> None:
        super().__init__(images, ids, labels, image_size)
        self.phone, self.seed = phone, int(seed)

    def __getitem__(self, key: int | tuple[int, int, int]) -> Item:  # type: ignore[override]
        if not isinstance(key, tuple):
            return super().__getitem__(key)
        index, epoch, position = key
        draw = (self.seed, epoch, position, index)
        if np.random.default_rng(draw).random() >= self.phone.p:
            return super().__getitem__(index)
        return self.item(index, lambda i: resize_square(degrade_crop(self.stored(i), self.phone, draw),
                                                        self.image_size))

    def stored(self, index: int) -> np.ndarray:
        """The crop as stored, shrunk to `PHONE_MAX_SIDE` if it is larger."""
        array = self.read(index, None)
        return shrink(array, PHONE_MAX_SIDE) if max(array.shape[:2]) > PHONE_MAX_SIDE else array


class TaggedDraws(Sampler[tuple[int, int, int]]):
    """An epoch sampler's indices as (index, epoch, position) keys for `PhoneCropDataset`: DataLoader
    workers persist across epochs, so the epoch has to travel with each index."""

    def __init__(self, sampler: Any) -> None:  # an epoch sampler: set_epoch, epoch and len
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.sampler.epoch  # read once: the epoch this iterator was started for
        return iter((int(i), epoch, pos) for pos, i in enumerate(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


def training_crops(images: H5Images | str | os.PathLike[str], ids: Sequence[str], labels: Sequence[float],
                   image_size: int, augment: AugmentConfig, sampler: Any) -> tuple[CropDataset, Any]:
    """The training rows' dataset and the sampler its loader takes: with `augment.phone.p` (and
    augmentation on), a `PhoneCropDataset` seeded like the epoch sampler (its `seed`) and the sampler
    wrapped in `TaggedDraws`, made together so neither can be forgotten; else the plain dataset and the
    sampler as it is."""
    if augment.enabled and augment.phone.p > 0:
        phone_crops = PhoneCropDataset(images, ids, labels, image_size, augment.phone, sampler.seed)
        return phone_crops, TaggedDraws(sampler)
    return CropDataset(images, ids, labels, image_size), sampler


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """An (H, W) mask (bool, or uint8 0/255 as in ISIC's PNGs) resized like its crop (`resize_square`,
    bilinear) to a (size, size) bool mask: a pixel is lesion when more than half of it was."""
    grey = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask
    return resize_square(grey, size) > 127


def collate_skip(items: list[Item]) -> Batch:
    """Stack items into a `Batch`, setting aside the crops that failed to decode."""
    kept = [item for item in items if item[0] is not None]
    corrupt = [(item[2], item[3] or "unreadable") for item in items if item[0] is None]
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0), empty, corrupt)
    images = torch.stack([item[0] for item in kept])  # type: ignore[misc]
    labels = torch.tensor([item[1] for item in kept], dtype=torch.float32)
    index = torch.tensor([item[2] for item in kept], dtype=torch.long)
    return Batch(images, labels, index, corrupt)


def check_corrupt(batch: Batch, dataset: CropDataset, skip: bool) -> None:
    """Stop with a `CorruptImageError` naming the isic_id, or log and go on when `skip` is set."""
    for index, reason in batch.corrupt:
        isic_id = dataset.ids[index]
        if not skip:
            hint = "; set `skip_corrupt: true` in the config to skip such images"
            raise CorruptImageError(isic_id, reason + hint, dataset.images.path)
        skipped = vars(dataset).setdefault("skipped", set())  # the count the warning carries: distinct crops lost
        skipped.add(isic_id)
        log.warning("skipping corrupt image '%s' in %s (%d skipped so far): %s", isic_id, dataset.images.path,
                    len(skipped), reason)


def shard(indices: Sequence[int], rank: int, world_size: int, pad: bool = True) -> Sequence[int]:
    """Rank `rank`'s share of `indices` (strided). With `pad`, wrap around so every rank gets as many.
    A range stays a range where no padding is needed (500,000 indices as a list are 18 MB)."""
    if isinstance(indices, range) and not (pad and world_size > 1):
        return indices[rank::world_size]
    indices = list(indices)
    if pad and world_size > 1 and indices:
        total = math.ceil(len(indices) / world_size) * world_size
        indices = (indices * math.ceil(total / len(indices)))[:total]
    return indices[rank::world_size]


class BalancedEpochSampler(Sampler[int]):
    """Each epoch: every positive plus a fresh draw of `neg_per_pos` times as many negatives, shuffled.

    The draw depends only on (seed, epoch), so every DDP rank computes the same draw and takes its own
    strided shard, and a resumed epoch draws the same lesions again. Call `set_epoch` before each epoch.
    """

    def __init__(self, labels: Sequence[float], neg_per_pos: float, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels)
        self.positives = np.flatnonzero(labels == 1)
        self.negatives = np.flatnonzero(labels == 0)
        if len(self.positives) == 0:
            raise ValueError("the training set of this fold has no positives; cannot draw a balanced epoch")
        self.n_neg = min(len(self.negatives), int(round(neg_per_pos * len(self.positives))))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self) -> np.ndarray:
        """This epoch's indices, in training order, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        negatives = rng.choice(self.negatives, size=self.n_neg, replace=False)
        return rng.permutation(np.concatenate([self.positives, negatives]))

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in shard(self.draw().tolist(), self.rank, self.world_size))

    def __len__(self) -> int:
        return math.ceil((len(self.positives) + self.n_neg) / self.world_size)
