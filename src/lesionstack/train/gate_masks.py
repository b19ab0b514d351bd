"""A frozen gate's lesion masks made once per training crop (`gate_masks: cached` in the CNN config).

With `model.gate: freeze` the segmenter never changes, yet `online` runs it on every augmented batch: about
29% of a demo training step. `cached` runs it once per crop, on the plain crop at the classifier's input
size, before the first epoch; each step then takes its crops' masks from here and warps them with the same
flips, rotation, zoom and shift as their images (`data.augment.augment_with_masks`; colour jitter is the
image's alone, so the mask no longer sees it). The figures move a little: a mask of the plain crop, warped,
is not the segmenter's mask of the warped, jittered crop.

Memory: one byte per pixel (the mask in steps of 1/255, at most 1/510 from the segmenter's), held by each
fold process for its training rows: 2,400 crops at 32 px are 2.5 MB; 400,000 crops at 128 px would be
6.5 GB a process. That is why `online` stays the default and `cached` is the small-data (demo) setting.
"""

from __future__ import annotations

import torch
from torch import nn

from lesionstack.data.dataset import CropDataset, check_corrupt
from lesionstack.runtime import Runtime, make_loader

LEVELS = 255.0  # uint8 steps


class CachedMasks:
    """uint8 (N, 1, S, S) masks of a training dataset's crops, by dataset index."""

    def __init__(self, masks: torch.Tensor) -> None:
        self.masks = masks

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, dataset: CropDataset, rt: Runtime) -> CachedMasks:
        """The masks `model`'s frozen segmenter makes of every crop of `dataset`, plain (decoded, resized and
        normalised as training prepares a batch, not augmented). A crop skipped as corrupt keeps a zero mask
        (training skips it too)."""
        size = dataset.image_size
        out = torch.zeros(len(dataset), 1, size, size, dtype=torch.uint8)
        loader = make_loader(dataset, rt, sampler=range(len(dataset)), batch_size=rt.settings.eval_batch_size)
        for batch in rt.bar(loader, "gate masks"):
            check_corrupt(batch, dataset, rt.settings.skip_corrupt)
            if len(batch.index) == 0:
                continue
            with rt.autocast():
                mask = model.mask(rt.finish(rt.prepare(batch.images)))
            out[batch.index] = quantise(mask.float().cpu())
        return cls(out)

    def batch(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The masks of dataset rows `index` as float (B, 1, S, S) in [0, 1], on `like`'s device and dtype."""
        return self.masks[index].to(like.device, non_blocking=True).to(like.dtype).div_(LEVELS)


def quantise(mask: torch.Tensor) -> torch.Tensor:
    """A float mask in [0, 1] -> uint8 in steps of 1/255 (nearest)."""
    return mask.mul(LEVELS).round_().clamp_(0, LEVELS).to(torch.uint8)
