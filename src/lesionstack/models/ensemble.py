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

    def one_segmenter(self) -> bool:
        """True when every member is gated by the same frozen segmenter (one segmenter file, never trained),
        so they make the same mask (checked each time: a few ms next to a segmenter pass)."""
        first = self.members[0]
        return all(getattr(m, "gate", None) == "freeze" for m in self.members) and \
            all(_same_weights(first.segmenter, m.segmenter) for m in self.members[1:])

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The members' mean soft lesion mask, or None when they have no segmenter."""
        if self.one_segmenter():  # the mean of equal masks is that mask, to the bit
            return self.members[0].mask(x)
        found = [m.mask(x) for m in self.members if getattr(m, "segmenter", None) is not None]
        return torch.stack(found).mean(0) if found else None

    def forward(self, x: torch.Tensor, aux: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean logit; `mask` (frozen gates only) is each member's mask, made beforehand."""
        given = {} if mask is None else {"mask": mask}  # a member of another kind takes no mask argument
        logits = self.members[0](x, aux, **given)
        for member in self.members[1:]:
            logits = logits + member(x, aux, **given)
        return logits / len(self.members)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def ensemble_members(model: nn.Module) -> list[nn.Module]:
    """The networks inside a fold model: a SeedEnsemble's members, else the model itself (Grad-CAM hooks
    each member's own classifier)."""
    return list(model.members) if isinstance(model, SeedEnsemble) else [model]
