"""Segment-then-classify: a lesion segmenter gates the image a timm classifier sees.

The exact gating, for an ImageNet-normalised image x of shape (B, 3, H, W):

    m = sigmoid(segmenter(x))                      # (B, 1, H, W), soft lesion mask in [0, 1]
    z = concat(x * (0.5 + 0.5 * m), m)             # (B, 4, H, W)
    logit = classifier(z)                          # timm model, in_chans=4, num_classes=1 -> (B,)

Why this form:
* The multiplier (0.5 + 0.5 m) is an attention map that never goes below one half: the lesion keeps full
  contrast and the surrounding skin stays visible at half contrast (towards the ImageNet mean, which is 0
  after normalisation). Diagnosis needs that context (border sharpness, the lesion against its own skin),
  and a segmenter error can dim but never erase the lesion. A hard `x * m` would let one bad mask blank out
  a melanoma.
* The mask as a 4th channel hands the classifier the lesion's shape and border directly (asymmetry and
  border irregularity are ABCD criteria), not only through the dimming.
* With local 3-channel classifier weights the mask channel starts at zero (see `build_classifier`), so the
  model starts as the pretrained classifier on a dimmed-context image and learns to use the mask.

Modes (`ModelConfig.gate`):
* "train": the segmenter trains with the classifier at `lr * segmenter_lr_scale` (`param_groups`), so it
  drifts from a lesion mask towards an attention map for the diagnosis.
* "freeze": the segmenter's parameters get no gradient and it stays in eval mode (its BatchNorm running
  statistics do not move either), so its weights are bit-identical after training.
* "none": no segmenter; the classifier is a plain 3-channel timm model on x. Compare it with the others to
  measure what the segmenter is worth.

Auxiliary outputs (`aux_outputs` K > 0, e.g. the diagnosis classes beside the malignancy logit): the
classifier's head has K extra outputs after the main ones. `forward(x)` drops them, so everything that
scores (prediction, export, the Kaggle kernel) sees the main logits only; `forward(x, aux=True)` returns
every output, (B, main + K), for the training loss.
"""

from __future__ import annotations

import torch
from torch import nn

GATES = ("train", "freeze", "none")


class GatedClassifier(nn.Module):
    """Image -> soft lesion mask -> classifier on the gated image; forward returns (B,) logits."""

    def __init__(
        self,
        classifier: nn.Module,
        segmenter: nn.Module | None,
        gate: str = "train",
        segmenter_lr_scale: float = 0.1,
        aux_outputs: int = 0,
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if (segmenter is None) != (gate == "none"):
            raise ValueError(f"gate={gate!r} needs {'no' if gate == 'none' else 'a'} segmenter")
        self.gate = gate
        self.segmenter_lr_scale = segmenter_lr_scale  # read by `param_groups`
        self.aux_outputs = aux_outputs  # the head's last outputs: trained, never scored
        self.classifier = classifier
        self.segmenter = segmenter
        if gate == "freeze":
            assert segmenter is not None
            segmenter.requires_grad_(False)
            segmenter.eval()

    def train(self, mode: bool = True) -> GatedClassifier:
        super().train(mode)
        if self.gate == "freeze" and self.segmenter is not None:
            self.segmenter.eval()  # frozen means frozen: BatchNorm statistics too
        return self

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Soft lesion mask (B, 1, H, W) in [0, 1], or None without a segmenter."""
        if self.segmenter is None:
            return None
        if self.gate == "freeze":
            with torch.no_grad():
                return torch.sigmoid(self.segmenter(x))
        return torch.sigmoid(self.segmenter(x))

    def forward_with_mask(self, x: torch.Tensor, aux: bool = False,
                          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B,), mask (B,1,H,W) or None); with `aux` and auxiliary outputs, logits are (B, main + K).
        `mask`: the frozen segmenter's mask of `x` made beforehand (`gate_masks: cached`), used instead of
        running the segmenter (a frozen gate only: a training gate must see the gradient)."""
        if mask is not None and self.gate != "freeze":
            raise ValueError(f"a mask made beforehand needs gate 'freeze', not {self.gate!r}")
        m = self.mask(x) if mask is None else mask
        z = x if m is None else torch.cat([x * (0.5 + 0.5 * m), m], dim=1)
        out = self.classifier(z)
        if not self.aux_outputs:
            return out.squeeze(-1), m
        return (out if aux else out[:, : -self.aux_outputs].squeeze(-1)), m

    def forward(self, x: torch.Tensor, aux: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_mask(x, aux, mask)[0]
