"""The Predictor: the same scores as training's OOF/test scoring, each crop decoded once for all folds,
crops, files and masks scored alike, and an undecodable crop scored NaN (logged), never a stop.
Tiny nets (timm's test_resnet) on the tiny CNN data set, both folds trained once for the module."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.data.dataset import CropDataset, ScoringCrops
from lesionstack.data.hdf5 import list_ids, locate_crops
from lesionstack.folds import read_folds
from lesionstack.inference.predictor import Predictor, PredictorError
from lesionstack.paths import ArtifactPaths
from lesionstack.runtime import RunSettings, Runtime, predict_logits, sigmoid
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.train.cnn_scores import scoring_model
from lesionstack.trained.loaders import cnn_folds

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CNNConfig]:
    root = make_cnn_data(tmp_path_factory.mktemp("data"), n_test=6)
    out = tmp_path_factory.mktemp("art")
    cfg = tiny_cnn_config("train", epochs=1, eval_batch_size=4, warmup_epochs=1.0)
    train_cnn(root, root / "folds.csv", cfg, out)
    return root, out, cfg


def test_scores_equal_trainings_oof_and_test_scores(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = trained
    art, folds = ArtifactPaths(out), read_folds(root / "folds.csv")
    oof = pd.read_parquet(art.oof_cnn)
    for k in (0, 1):  # one fold's model on its own validation rows is exactly its OOF score
        rows = oof[oof["fold"] == k]
        one = Predictor.load(out, device="cpu", progress=False, folds=[k]).score_hdf5(root / "train-image.hdf5",
                                                                                      rows["isic_id"])
        assert one["isic_id"].tolist() == rows["isic_id"].tolist()
        np.testing.assert_allclose(one["score"], rows["score"], rtol=0, atol=1e-6)
    p = Predictor.load(out, device="cpu", progress=False, folds=[0, 1])
    test = p.score_hdf5(root / "test-image.hdf5")
    written = pd.read_parquet(art.test_cnn)
    assert test["isic_id"].tolist() == written["isic_id"].tolist()
    np.testing.assert_allclose(test["score"], written["score"], rtol=0, atol=1e-6)
    # and against the per-fold path training used before the Predictor existed: one loader per fold model
    rt = Runtime(RunSettings.pick(cfg), CPU, None)
    dataset = CropDataset(root / "test-image.hdf5", test["isic_id"], None, cfg.image_size)
    models = [scoring_model(cfg, art.cnn_fold(k).safetensors, CPU) for k in (0, 1)]
    per_fold = [sigmoid(predict_logits(model, dataset, rt)) for model in models]
    np.testing.assert_allclose(test["score"], np.mean(per_fold, axis=0), rtol=0, atol=1e-6)
    assert len(folds) == len(oof)
    # test_cnn.parquet also holds each fold model's score (the stacker pairs stack fold k with CNN fold k)
    assert list(written.columns) == ["isic_id", "score", "score_fold_0", "score_fold_1"]
    for k in (0, 1):
        np.testing.assert_allclose(written[f"score_fold_{k}"], per_fold[k], rtol=0, atol=1e-6)


def test_per_fold_scores_average_to_the_mean_score(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = trained
    p = Predictor.load(out, device="cpu", progress=False)
    table = p.score_hdf5(root / "test-image.hdf5", per_fold=True)
    assert list(table.columns) == ["isic_id", "score", "score_fold_0", "score_fold_1"]
    assert list(p.score_hdf5(root / "test-image.hdf5").columns) == ["isic_id", "score"]  # callers unchanged
    folds = table[["score_fold_0", "score_fold_1"]].to_numpy()
    assert np.abs(folds[:, 0] - folds[:, 1]).max() > 1e-4  # two distinct models, so pairing matters
    np.testing.assert_allclose(folds.mean(axis=1), table["score"], rtol=0, atol=1e-12)
    for k in (0, 1):  # each column is that fold model's own score
        one = Predictor.load(out, device="cpu", progress=False, folds=[k]).score_hdf5(root / "test-image.hdf5")
        np.testing.assert_allclose(table[f"score_fold_{k}"], one["score"], rtol=0, atol=1e-12)
    dataset = CropDataset(root / "test-image.hdf5", table["isic_id"], None, cfg.image_size)
    crops = [dataset.load(i) for i in range(len(dataset))]
    by_fold = p.score_crops_by_fold(crops)
    assert by_fold.shape == (6, 2) and p.score_crops_by_fold([]).shape == (0, 2)
    np.testing.assert_allclose(by_fold.mean(axis=1), p.score_crops(crops), rtol=0, atol=1e-12)
    np.testing.assert_allclose(by_fold, folds, rtol=0, atol=1e-6)


def test_each_crop_is_decoded_once_for_all_folds(trained: tuple[Path, Path, CNNConfig],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, out, _ = trained
    root = trained[0]
    calls: list[int] = []
    real = ScoringCrops.__getitem__
    monkeypatch.setattr(ScoringCrops, "__getitem__", lambda self, i: calls.append(i) or real(self, i))
    p = Predictor.load(out, device="cpu", progress=False)
    assert p.folds == [0, 1] and len(p.models) == 2 and p.device == CPU and p.image_size == 32
    p.score_hdf5(root / "test-image.hdf5")
    assert sorted(calls) == list(range(6))  # 6 crops, 2 fold models: 6 decodes


def test_crops_files_and_hdf5_give_the_same_scores(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, out, cfg = trained
    p = Predictor.load(out, device="cpu", progress=False)
    from_h5 = p.score_hdf5(root / "test-image.hdf5")
    dataset = CropDataset(root / "test-image.hdf5", from_h5["isic_id"], None, cfg.image_size)
    crops = [dataset.load(i) for i in range(len(dataset))]
    assert p.preprocess(crops).shape == (6, 3, 32, 32)
    np.testing.assert_allclose(p.score_crops(crops), from_h5["score"], rtol=0, atol=1e-6)
    paths = []
    with h5py.File(root / "test-image.hdf5", "r") as h5:
        for isic_id in from_h5["isic_id"]:
            paths.append(tmp_path / f"{isic_id}.jpg")
            paths[-1].write_bytes(bytes(h5[isic_id][()]))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    files = p.score_files([*paths, tmp_path / "broken.jpg", tmp_path / "absent.png"])
    assert list(files.columns) == ["path", "probability", "error"]
    np.testing.assert_allclose(files["probability"][:6], from_h5["score"], rtol=0, atol=1e-6)
    assert files["error"][:6].isna().all() and files["probability"][6:].isna().all()
    assert "not a decodable JPEG" in files["error"][6] and "No such file" in files["error"][7]
    masks = p.masks(crops)
    assert masks.shape == (6, 32, 32) and 0 <= masks.min() and masks.max() <= 1


def test_an_undecodable_crop_is_nan_and_named(trained: tuple[Path, Path, CNNConfig], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    root, out, _ = trained
    images = tmp_path / "test-image.hdf5"
    with h5py.File(root / "test-image.hdf5", "r") as src, h5py.File(images, "w") as dst:
        for isic_id in src:
            dst[isic_id] = np.bytes_(b"not a jpeg" if isic_id == "ISIC_9000002" else bytes(src[isic_id][()]))
    p = Predictor.load(out, device="cpu", progress=False)
    with caplog.at_level(logging.WARNING):
        scores = p.score_hdf5(images).set_index("isic_id")["score"]
    assert "ISIC_9000002" in caplog.text and np.isnan(scores["ISIC_9000002"])
    clean = p.score_hdf5(root / "test-image.hdf5").set_index("isic_id")["score"]
    # float32 models: a batch one crop shorter may take other CPU kernels (seen on AVX-512: 1e-9 apart)
    np.testing.assert_allclose(scores.drop("ISIC_9000002"), clean.drop("ISIC_9000002"), rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="ISIC_X"):
        p.score_hdf5(images, ids=["ISIC_X"])


def test_folds_must_be_finished_and_consistent(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    import shutil

    _, out, _ = trained
    copy = tmp_path / "art"
    shutil.copytree(out, copy)
    assert cnn_folds(ArtifactPaths(copy)) == [0, 1]  # no folds.csv nor cv.json: the fold folders
    config = ArtifactPaths(copy).cnn_fold(1).config
    config.write_text(config.read_text().replace("image_size: 32", "image_size: 48"))
    with pytest.raises(PredictorError, match="fold_1.*image_size 48 differs from fold 0's 32"):
        Predictor.load(copy, device="cpu")
    ArtifactPaths(copy).cnn_fold(1).done.unlink()
    with pytest.raises(FileNotFoundError, match=r"CNN fold\(s\) \[1\] did not finish"):
        Predictor.load(copy, device="cpu")
    empty = Predictor.load(tmp_path / "nothing", device="cpu")
    assert empty.folds == [] and not empty.has_stacker
    with pytest.raises(PredictorError, match="no trained CNN fold models"):
        empty.score_crops([np.zeros((8, 8, 3), np.uint8)])


def test_streaming_by_byte_range_scores_as_the_crop_dataset_does(trained: tuple[Path, Path, CNNConfig],
                                                                  tmp_path: Path) -> None:
    """`stream_hdf5` (byte ranges, ids as a numpy array; h5py for a crop stored chunked and compressed) gives
    bit-identical scores to batches of `CropDataset` items (the reader scoring used before), in the same order."""
    root, out, cfg = trained
    mixed = tmp_path / "test-image.hdf5"
    with h5py.File(root / "test-image.hdf5", "r") as src, h5py.File(mixed, "w") as dst:
        for n, isic_id in enumerate(src):
            data = bytes(src[isic_id][()])
            if n == 1:
                dst.create_dataset(isic_id, data=np.frombuffer(data, np.uint8), chunks=True, compression="gzip")
            else:
                dst[isic_id] = np.bytes_(data)
    p = Predictor.load(out, device="cpu", progress=False)
    ids = list_ids(mixed)
    assert locate_crops(mixed, ids).offsets[1] == -1  # the fallback is exercised
    streamed = list(p.stream_hdf5(mixed, ids))
    dataset = CropDataset(root / "test-image.hdf5", ids.astype(str).tolist(), None, cfg.image_size)
    step = p.rt.settings.eval_batch_size
    expected = [p._score_batch(p._ready(torch.stack([dataset[i][0] for i in range(s, min(s + step, len(ids)))])))
                for s in range(0, len(ids), step)]
    assert [index.tolist() for index, _ in streamed] == [list(range(s, min(s + step, len(ids))))
                                                         for s in range(0, len(ids), step)]
    np.testing.assert_array_equal(np.concatenate([s for _, s in streamed]), np.concatenate(expected))
    table = p.score_hdf5(mixed, per_fold=True)
    assert table["isic_id"].tolist() == ids.astype(str).tolist()
    np.testing.assert_array_equal(table["score_fold_0"], np.concatenate(expected)[:, 0])
