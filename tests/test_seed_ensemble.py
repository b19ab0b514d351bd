"""train-cnn with `seeds_per_fold`: each fold trains a model per seed (member 0 in the fold folder, member r in
`member_r/`), the fold scores with the mean logit of its members (OOF, test, Predictor), a member is the
same model a one-seed run with its seed trains, an unfinished member keeps the fold unfinished and
resumes alone, and a changed member count is refused. Tiny nets, 24 lesions in 2 folds, 1 epoch."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lesionstack.train.cnn as cnn_module
from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError, read_config_dict
from lesionstack.data.dataset import CropDataset
from lesionstack.inference.package import halve_cnn_weights
from lesionstack.inference.predictor import Predictor
from lesionstack.models import SeedEnsemble
from lesionstack.paths import ArtifactPaths
from lesionstack.resume import ResumeError
from lesionstack.runtime import DistContext, RunSettings, Runtime, load_weights, predict_logits, sigmoid
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.train.cnn_scores import scoring_model
from lesionstack.train.distill_config import DistillConfig
from lesionstack.trained.loaders import cnn_folds, load_cnn_fold

CPU = torch.device("cpu")


def tiny_config(**changes: object) -> CNNConfig:
    return tiny_cnn_config("freeze", **{"epochs": 1, **changes})


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CNNConfig]:
    """Both folds with two seeds each, two members at a time in their own processes."""
    root = make_cnn_data(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("art")
    cfg = tiny_config(seeds_per_fold=2, fold_workers=2)
    train_cnn(root, root / "folds.csv", cfg, out)
    return root, out, cfg


def member_logits(cfg: CNNConfig, weights: Path, ds: CropDataset) -> np.ndarray:
    rt = Runtime(RunSettings.pick(cfg), CPU, None, DistContext())
    return predict_logits(scoring_model(cfg, weights, CPU), ds, rt)


def test_each_member_is_the_model_a_one_seed_run_with_its_seed_trains(ensemble: tuple[Path, Path, CNNConfig],
                                                                       tmp_path: Path) -> None:
    root, out, cfg = ensemble
    for seed, member in ((42, 0), (43, 1)):
        alone = tmp_path / f"seed_{seed}"
        train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, seeds_per_fold=1, fold_workers=1, seed=seed),
                  alone)
        for k in (0, 1):
            files = ArtifactPaths(out).cnn_fold(k).member(member)
            assert read_config_dict(files.config)["seed"] == seed
            got, want = load_weights(files.safetensors), load_weights(ArtifactPaths(alone).cnn_fold(k).safetensors)
            assert all(torch.equal(got[key], want[key]) for key in want), (seed, k)
    first, second = (load_weights(ArtifactPaths(out).cnn_fold(0).member(r).safetensors) for r in (0, 1))
    assert not all(torch.equal(first[key], second[key]) for key in first)  # two seeds, two models


def test_scores_made_in_the_fold_pool_as_folds_finish_equal_those_of_one_run(
        ensemble: tuple[Path, Path, CNNConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fold 0 first; then fold 1's members in the pool, which scores fold 0 (done already) and then fold 1 as
    each finishes: the files hold the bits of the one run; a rerun with every fold done rescores nothing."""
    root, out, cfg = ensemble
    split = tmp_path / "split"
    train_cnn(root, root / "folds.csv", cfg, split, folds_only=[0])
    assert not ArtifactPaths(split).oof_cnn.exists()  # fold 1 is missing: nothing to score yet

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored after training, not in the fold pool")

    monkeypatch.setattr(cnn_module, "write_scores", refuse)
    train_cnn(root, root / "folds.csv", cfg, split, folds_only=[1])
    for name in ("oof_cnn", "test_cnn"):
        one_run, pooled = (pd.read_parquet(getattr(ArtifactPaths(a), name)) for a in (out, split))
        assert len(pooled) > 0 and pooled.equals(one_run), name
    monkeypatch.setattr(cnn_module, "save_scores", refuse)
    assert train_cnn(root, root / "folds.csv", cfg, split)["oof_pauc"] == train_cnn(root, root / "folds.csv",
                                                                                     cfg, out)["oof_pauc"]


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor:
        return self.logits[: len(x)]


def test_a_seed_ensemble_averages_logits_not_probabilities() -> None:
    pair = SeedEnsemble([FixedLogits([4.0, -2.0]), FixedLogits([0.0, 2.0])])
    assert torch.equal(pair(torch.zeros(2, 3, 8, 8)), torch.tensor([2.0, 0.0]))  # probabilities: 0.49, 0.5
    assert pair.segmenter is None and pair.mask(torch.zeros(2, 3, 8, 8)) is None
    with pytest.raises(ValueError, match="at least 2 members"):
        SeedEnsemble([FixedLogits([0.0])])


def test_the_fold_scores_with_the_mean_logit_of_its_members(ensemble: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = ensemble
    art = ArtifactPaths(out)
    oof, test = pd.read_parquet(art.oof_cnn), pd.read_parquet(art.test_cnn)
    test_ds = CropDataset(root / "test-image.hdf5", test["isic_id"], None, cfg.image_size)
    for k in (0, 1):
        rows = oof[oof["fold"] == k]
        val_ds = CropDataset(root / "train-image.hdf5", rows["isic_id"], None, cfg.image_size)
        members = art.cnn_fold(k).members(2)
        for ds, scores in ((val_ds, rows["score"]), (test_ds, test[f"score_fold_{k}"])):
            logits = [member_logits(cfg, m.safetensors, ds) for m in members]
            assert not np.allclose(logits[0], logits[1], atol=1e-4)
            np.testing.assert_allclose(scores, sigmoid((logits[0] + logits[1]) / 2), rtol=1e-5, atol=1e-6)
    predictor = Predictor.load(out, device="cpu", progress=False)
    assert predictor.folds == [0, 1] and len(predictor.models) == 4  # Grad-CAM sees every member
    by_fold = predictor.score_hdf5(root / "test-image.hdf5", ids=test["isic_id"].tolist(), per_fold=True)
    np.testing.assert_allclose(by_fold["score_fold_1"], test["score_fold_1"], rtol=1e-5, atol=1e-6)


def test_an_unfinished_member_keeps_its_fold_unfinished_and_resumes_alone(ensemble: tuple[Path, Path, CNNConfig],
                                                                          tmp_path: Path) -> None:
    root, out, cfg = ensemble
    copy = tmp_path / "art"
    shutil.copytree(out, copy)
    art = ArtifactPaths(copy)
    member = art.cnn_fold(1).member(1)
    before = load_weights(member.safetensors)
    member.done.unlink()
    with pytest.raises(FileNotFoundError, match=r"CNN fold\(s\) \[1\] did not finish"):
        cnn_folds(art)
    with pytest.raises(FileNotFoundError, match="member_1/DONE"):
        load_cnn_fold(art.cnn_fold(1), read_config_dict(art.cnn_fold(1).config))
    others = [art.cnn_fold(k).member(r).done for k, r in ((0, 0), (0, 1), (1, 0))]
    untouched = [p.stat().st_mtime_ns for p in others]
    train_cnn(root, root / "folds.csv", cfg, copy)
    assert member.done.is_file() and [p.stat().st_mtime_ns for p in others] == untouched
    after = load_weights(member.safetensors)
    assert all(torch.equal(before[key], after[key]) for key in before)  # retrained to the same bits
    pd.testing.assert_frame_equal(pd.read_parquet(art.oof_cnn), pd.read_parquet(ArtifactPaths(out).oof_cnn))
    assert isinstance(load_cnn_fold(art.cnn_fold(0), read_config_dict(art.cnn_fold(0).config)), SeedEnsemble)


def test_a_changed_number_of_seeds_is_refused_naming_the_key(ensemble: tuple[Path, Path, CNNConfig],
                                                              tmp_path: Path) -> None:
    root, out, cfg = ensemble
    copy = tmp_path / "two"
    shutil.copytree(out, copy)
    with pytest.raises(ResumeError, match="seeds_per_fold: saved=2 now=1"):
        train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, seeds_per_fold=1), copy)
    one = tmp_path / "one"  # an artifacts folder of one seed per fold, then a config with two
    train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, seeds_per_fold=1, fold_workers=1), one)
    with pytest.raises(ResumeError, match="seeds_per_fold: saved=1 now=2"):
        train_cnn(root, root / "folds.csv", cfg, one)
    assert not list((one / "cnn").glob("fold_*/member_*"))  # refused before any member trained


def test_fp16_bundle_weights_reach_every_member(ensemble: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    _, out, _ = ensemble
    shutil.copytree(ArtifactPaths(out).cnn_dir, tmp_path / "cnn", ignore=shutil.ignore_patterns("checkpoint.pt"))
    assert halve_cnn_weights(tmp_path / "cnn") == 4
    member = load_weights(tmp_path / "cnn" / "fold_1" / "member_1" / "model.safetensors")
    assert all(v.dtype == torch.float16 for v in member.values() if v.is_floating_point())


def test_seeds_per_fold_must_be_positive_and_a_student_has_one() -> None:
    with pytest.raises(ConfigError, match="seeds_per_fold: expected an integer >= 1, got 0"):
        tiny_config(seeds_per_fold=0)
    with pytest.raises(ConfigError, match=r"seeds_per_fold: expected 1 \(a student fold is one model\), got 2"):
        DistillConfig(seeds_per_fold=2)
