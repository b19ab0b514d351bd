"""An exponential moving average of a network's weights (`WeightEMA`), scored and saved instead of the final
step's noisy weights when a CNN config sets `ema_decay`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """An exponential moving average of a model's weights, updated after every optimiser step.

    The decay warms up as min(decay, 1 - 1/t) at step t: the first step copies the weights (random init gets
    no weight), then a plain running mean until the average spans 1 / (1 - decay) steps. timm's
    min(decay, (1 + t) / (10 + t)) caps the horizon at about t / 9 steps instead: on the demo's ~290 steps a
    fold would never reach a decay of 0.99, and the configured value would hardly matter.

    BatchNorm statistics are neither averaged (timm's ModelEmaV3) nor copied: both describe other weights'
    activations, and averaged weights give smaller ones (an average of vectors pointing apart is shorter).
    On the demo, averaged statistics took a fold's held-out pAUC from 0.150 to 0.050. `refresh_batchnorm`
    recomputes them for the averaged weights (as SWA's update_bn does) before they are validated or saved.
    """

    def __init__(self, model: nn.Module, decay: float, images: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.decay, self.steps, self.images = decay, 0, images
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        weight = 1.0 - min(self.decay, 1.0 - 1.0 / self.steps)  # of the new weights
        for averaged, now in zip(self.module.parameters(), model.parameters(), strict=True):
            averaged.lerp_(now, weight)

    @torch.no_grad()
    def refresh_batchnorm(self) -> None:
        """BatchNorm statistics of the averaged weights: the plain mean over one pass of `images`."""
        self.module.train()  # a frozen segmenter stays in eval mode: its statistics stay as loaded
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative mean
        for x in self.images():
            self.module(x)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        self.module.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.module.load_state_dict(state["module"])
