"""One CNN fold's seed ensemble: the fold's models trained with different seeds (`seeds_per_fold` in the CNN
config), scored as one network whose logit is the mean of theirs.

A single small model's out-of-fold scores move with its seed about as much as most recipe changes do
(docs/experiments, "Seed ensembles"); averaging two seeds' logits per fold lowers that variance. Everything that scores
a fold (OOF, test, `predict`, `serve`, the Kaggle kernel) sees one module per fold either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SeedEnsemble(nn.Module):
    """The mean logit of `members` (same architecture and input, different seeds), in eval mode."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a seed ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def segmenter(self) -> nn.Module | None:
        """The first member's segmenter (with gate: freeze from trained segmenter weights, every member holds
        the same one; `mask` averages them either way)."""
        return getattr(self.members[0], "segmenter", None)

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' mean soft lesion mask, or None when they have no segmenter."""
        found = [m.mask(x) for m in self.members if getattr(m, "segmenter", None) is not None]
        return torch.stack(found).mean(0) if found else None

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor:
        logits = self.members[0](x, aux)
        for member in self.members[1:]:
            logits = logits + member(x, aux)
        return logits / len(self.members)


def ensemble_members(model: nn.Module) -> list[nn.Module]:
    """The networks inside a fold model: a SeedEnsemble's members, else the model itself (Grad-CAM hooks
    each member's own classifier)."""
    return list(model.members) if isinstance(model, SeedEnsemble) else [model]
