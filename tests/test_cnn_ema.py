"""train-cnn with ema_decay: the weight average's warm-up and buffers, the saved and validated weights are
the average's, a killed fold resumes to the same bits, and the resume guard refuses a changed decay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.resume import ResumeError
from lesionstack.runtime import load_weights
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.train.ema import WeightEMA


def tiny_config(gate: str = "none", **changes: object) -> CNNConfig:
    return tiny_cnn_config(gate, **{"ema_decay": 0.9, **changes})


class Crash(RuntimeError):
    pass


def crash(fold: int, epoch: int) -> None:
    raise Crash(f"killed after epoch {epoch}")


class Net(nn.Module):
    """weight * x, then a BatchNorm that trains and one that stays frozen (as a frozen segmenter's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm, self.frozen = nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1), nn.BatchNorm1d(1)

    def train(self, mode: bool = True) -> Net:
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.norm(self.linear(x)))


def test_average_copies_the_first_step_then_runs_a_mean_until_its_horizon() -> None:
    net = Net()
    ema = WeightEMA(net, decay=0.75, images=lambda: [])  # horizon 1 / (1 - 0.75) = 4 steps
    expected = None
    for step, value in enumerate([8.0, 4.0, 0.0, 4.0, 12.0], start=1):
        with torch.no_grad():
            net.linear.weight.fill_(value)
        ema.update(net)
        # steps 1-4: mean of all steps so far (random init gets no weight); then 0.75 * before + 0.25 * now
        expected = value if expected is None else expected + (value - expected) * max(1 / step, 0.25)
        assert ema.module.linear.weight.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.75 * 4.0 + 0.25 * 12.0)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_batchnorm_statistics_are_recomputed_for_the_averaged_weights() -> None:
    net = Net()
    with torch.no_grad():
        net.frozen.running_mean.fill_(5.0)
        net.linear.weight.fill_(3.0)
    batches = [torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [7.0]])]
    ema = WeightEMA(net, decay=0.9, images=lambda: batches)
    ema.update(net)
    with torch.no_grad():
        net.norm.running_mean.fill_(-1.0)  # the trained model's statistics describe its own weights, not these
    ema.refresh_batchnorm()
    assert ema.module.norm.running_mean.item() == pytest.approx(3.0 * 4.0)  # 3 * the mean of the crops
    assert ema.module.norm.running_var.item() == pytest.approx(9.0 * 2.0)  # 9 * each batch's unbiased var
    assert ema.module.norm.momentum == net.norm.momentum
    assert ema.module.frozen.running_mean.item() == 5.0  # a frozen part's statistics stay as loaded
    assert not ema.module.training


def test_ema_decay_outside_0_1_is_refused() -> None:
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ema_decay"):
            tiny_config(ema_decay=bad)
    assert CNNConfig().ema_decay is None  # off by default


def test_fold_saves_the_average_and_a_killed_fold_resumes_to_the_same_bits(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    cfg = tiny_config()
    straight, killed = ArtifactPaths(tmp_path / "straight"), ArtifactPaths(tmp_path / "killed")
    checkpoints: list[dict] = []

    def keep_last_checkpoint(fold: int, epoch: int) -> None:  # the final checkpoint is removed once DONE
        if epoch == cfg.epochs:
            checkpoints.append(torch.load(straight.cnn_fold(0).checkpoint, weights_only=False))

    train_cnn(root, root / "folds.csv", cfg, straight.root, folds_only=[0], on_epoch_end=keep_last_checkpoint)
    saved = load_weights(straight.cnn_fold(0).safetensors)
    ckpt = checkpoints[0]
    assert ckpt["ema"]["steps"] > 0
    for key, value in saved.items():  # model.safetensors holds the average, not the last step's weights
        assert torch.equal(value, ckpt["ema"]["module"][key]), key
    assert any(not torch.equal(value, ckpt["model"][key]) for key, value in saved.items() if value.is_floating_point())

    with pytest.raises(Crash):
        train_cnn(root, root / "folds.csv", cfg, killed.root, folds_only=[0], on_epoch_end=crash)
    assert killed.cnn_fold(0).checkpoint.exists()
    train_cnn(root, root / "folds.csv", cfg, killed.root, folds_only=[0])
    for key, value in load_weights(killed.cnn_fold(0).safetensors).items():
        assert torch.equal(value, saved[key]), key
    epochs = [read_json(art.cnn_fold(0).metrics)["epochs"] for art in (killed, straight)]
    for a, b in zip(*epochs, strict=True):  # validation watched the average: the same scores
        for key in ("train_loss", "val_pauc", "val_loss"):
            assert a[key] == b[key], key


def test_resuming_with_another_ema_decay_is_refused_naming_it(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    with pytest.raises(Crash):
        train_cnn(root, root / "folds.csv", tiny_config(ema_decay=None), tmp_path / "art",
                  folds_only=[0], on_epoch_end=crash)
    with pytest.raises(ResumeError, match="ema_decay"):
        train_cnn(root, root / "folds.csv", tiny_config(), tmp_path / "art", folds_only=[0])
