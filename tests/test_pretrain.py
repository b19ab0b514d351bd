"""Archive pretraining: the CNN trains on an `isic image download` folder once, and every fold starts from
those weights (tiny nets, 32-px crops, the synthetic archive of `demo-data --archive`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError, load_config
from lesionstack.data.archive import BENIGN, INDETERMINATE, MALIGNANT
from lesionstack.data.synthetic_archive import write_archive_demo
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.resume import ResumeError, file_digest
from lesionstack.runtime import load_weights
from lesionstack.train import cnn, cnn_fold
from lesionstack.train.cnn_config import ArchiveConfig, CNNConfig
from lesionstack.train.pretrain import archive_targets, pretrain_files


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "isic"
    write_archive_demo(out, images=24, seed=5)
    return out


def test_targets_and_config_checks() -> None:
    labels = np.array([BENIGN, MALIGNANT, INDETERMINATE, BENIGN])
    np.testing.assert_array_equal(archive_targets(labels, 0.3), np.array([0, 1, 0.3, 0], dtype=np.float32))
    with pytest.raises(ConfigError, match="^mode: expected one of pretrain; got 'positives'$"):
        ArchiveConfig(dir="x", mode="positives")
    with pytest.raises(ConfigError, match=r"^command line: archive.mode: expected one of pretrain; got 'positives'$"):
        load_config(CNNConfig, None, archive={"dir": "x", "mode": "positives"})
    with pytest.raises(ConfigError, match="indeterminate_target"):
        ArchiveConfig(dir="x", indeterminate_target=1.5)


def test_folds_fine_tune_from_the_archive_weights(archive: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    root = make_cnn_data(tmp_path / "data")
    out = tmp_path / "art"
    cfg = tiny_cnn_config(gate="none", epochs=1, archive=ArchiveConfig(dir=str(archive), epochs=1))
    started: list[bool] = []
    real = cnn_fold.load_init_weights  # where each fold's network is built

    def spy(model: torch.nn.Module, path: str) -> None:
        real(model, path)
        saved = load_weights(path)
        started.append(all(torch.equal(v.cpu(), saved[k]) for k, v in model.state_dict().items()))

    monkeypatch.setattr(cnn_fold, "load_init_weights", spy)
    summary = cnn.train_cnn(root, root / "folds.csv", cfg, out)
    files = pretrain_files(ArtifactPaths(out))
    assert files.done.is_file() and read_json(files.metrics)["n_images"] == 24
    assert started == [True, True]  # each fold's network began as the pretrained one
    weights = file_digest(files.safetensors)
    for k in (0, 1):
        assert read_json(ArtifactPaths(out).cnn_fold(k).inputs)["init_weights"] == weights
    assert "oof_pauc" in summary
    before = files.done.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lesionstack"):
        cnn.train_cnn(root, root / "folds.csv", cfg, out)
    assert files.done.stat().st_mtime_ns == before and any("pretraining: done before" in m for m in caplog.messages)
    other = dataclasses.replace(cfg, archive=ArchiveConfig(dir=str(archive), epochs=1, indeterminate_target=0.2))
    with pytest.raises(ResumeError, match="indeterminate_target"):
        cnn.train_cnn(root, root / "folds.csv", other, out)
    with pytest.raises(ConfigError, match="archive.dir"):
        cnn.train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, archive=ArchiveConfig()), tmp_path / "x")
