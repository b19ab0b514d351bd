"""The built-in demo data: the competition's layout, determinism, and a label both halves can learn."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import simplejpeg
from PIL import Image

from lesionstack.config import ConfigError
from lesionstack.data import demo_images, demo_tables, schema
from lesionstack.data.demo_tables import make_tables
from lesionstack.data.synthetic import DemoDataError, DemoSpec, write_demo_data
from lesionstack.metrics import pauc
from lesionstack.paths import DataPaths

TINY = DemoSpec(patients=12, lesions_per_patient=20, seed=5, mask_count=15)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    out = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(out, TINY, workers=1)
    return DataPaths(out)


def _h5_bytes(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as h5:
        return {k: bytes(h5[k][()]) for k in h5}


def test_layout_and_exact_columns(demo: DataPaths) -> None:
    for path in (demo.train_metadata, demo.test_metadata, demo.train_images, demo.test_images,
                 demo.sample_submission, demo.demo_truth):
        assert path.is_file(), path
    train, test = pd.read_csv(demo.train_metadata), pd.read_csv(demo.test_metadata)
    assert tuple(train.columns) == schema.TRAIN_COLUMNS
    assert tuple(test.columns) == schema.TEST_COLUMNS
    assert len(train) == 12 * 20 and train["patient_id"].nunique() == 12
    assert not set(train["patient_id"]) & set(test["patient_id"])  # the test set holds other people
    assert train["isic_id"].is_monotonic_increasing and train["isic_id"].is_unique
    assert all(re.fullmatch(r"ISIC_\d{7}", i) for i in pd.concat([train["isic_id"], test["isic_id"]]))
    assert all(re.fullmatch(r"IP_\d{7}", i) for i in train["patient_id"])
    assert set(train["target"]) == {0, 1}
    assert (train["image_type"] == "TBP tile: close-up").all()


def test_values_are_realistic() -> None:
    tables = make_tables(DemoSpec(patients=300, lesions_per_patient=10, seed=2))
    train = tables.train
    for column, allowed in schema.CATEGORY_VALUES.items():
        assert set(train[column].dropna()) <= set(allowed), column
    for column in ("age_approx", "sex", "anatom_site_general"):  # missing as in the real data
        assert 0 < train[column].isna().mean() < 0.1, column
    assert train["age_approx"].dropna().between(15, 85).all()
    assert train.groupby("patient_id")[["sex", "attribution", "tbp_tile_type"]].nunique().max().max() == 1
    pos, neg = train[train["target"] == 1], train[train["target"] == 0]
    assert pos["lesion_id"].str.fullmatch(r"IL_\d{7}").all()
    assert pos["iddx_full"].str.startswith("Malignant::").all() and (pos["iddx_1"] == "Malignant").all()
    assert (neg["iddx_1"] != "Malignant").all() and (neg["iddx_full"] == "Benign").mean() > 0.9
    assert train["mel_thick_mm"].isna().mean() > 0.95
    assert np.allclose(train["tbp_lv_deltaL"], train["tbp_lv_L"] - train["tbp_lv_Lext"])
    assert np.allclose(train["tbp_lv_C"], np.hypot(train["tbp_lv_A"], train["tbp_lv_B"]))
    assert train["clin_size_long_diam_mm"].median() == pytest.approx(3.3, abs=0.6)  # real: 3.3
    assert (train["tbp_lv_minorAxisMM"] <= train["clin_size_long_diam_mm"] + 1e-9).all()
    counts = train["patient_id"].value_counts()
    assert counts.max() > 3 * counts.median()  # skewed lesion counts per patient
    assert 0.015 < train["target"].mean() < 0.045


def test_hdf5_structure_matches_the_real_file(demo: DataPaths, public_test_dir: Path) -> None:
    def structure(path: Path) -> set[tuple]:
        with h5py.File(path, "r") as h5:
            return {(type(h5[k][()]).__name__, h5[k].dtype.kind, h5[k].shape, len(h5[k].attrs)) for k in h5}

    assert structure(demo.train_images) == structure(public_test_dir / "test-image.hdf5")
    with h5py.File(demo.train_images, "r") as h5:
        assert isinstance(h5[next(iter(h5))][()], np.bytes_)


def test_images_decode_square_of_varying_size(demo: DataPaths) -> None:
    train, test = pd.read_csv(demo.train_metadata), pd.read_csv(demo.test_metadata)
    for path, frame in ((demo.train_images, train), (demo.test_images, test)):
        images = _h5_bytes(path)
        assert sorted(images) == sorted(frame["isic_id"])
        sizes = []
        for data in images.values():
            img = simplejpeg.decode_jpeg(data, colorspace="RGB")
            assert img.shape[0] == img.shape[1] and img.shape[2] == 3 and img.dtype == np.uint8
            sizes.append(img.shape[0])
        assert 60 <= min(sizes) and max(sizes) <= 240
    assert len(set(sizes)) > 5


def test_masks_match_their_images(demo: DataPaths) -> None:
    jpgs = sorted(demo.masks.glob("ISIC_*.jpg"))
    assert len(jpgs) == TINY.mask_count
    images = _h5_bytes(demo.train_images)
    for jpg in jpgs:
        assert jpg.read_bytes() == images[jpg.stem]  # the same crop as in train-image.hdf5
        mask = np.asarray(Image.open(jpg.with_name(f"{jpg.stem}_segmentation.png")))
        img = simplejpeg.decode_jpeg(jpg.read_bytes())
        assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
        inside, outside = img[mask == 255].mean(), img[mask == 0].mean()
        assert inside < outside  # the lesion is darker than the skin around it


def test_lesion_size_follows_metadata() -> None:
    tables = make_tables(DemoSpec(patients=4, lesions_per_patient=20, seed=8))
    r = tables.render_train
    px_area = []
    for i in range(len(r)):
        _, mask = demo_images.render_lesion(r.iloc[i].to_dict(), np.random.default_rng(i))
        px_area.append(mask.sum() * (demo_tables.CROP_MM / r["size_px"].iloc[i]) ** 2)  # mm^2
    corr = np.corrcoef(np.log(px_area), np.log(tables.train["tbp_lv_areaMM2"]))[0, 1]
    assert corr > 0.9


def test_sample_submission_and_truth(demo: DataPaths) -> None:
    train, test = pd.read_csv(demo.train_metadata), pd.read_csv(demo.test_metadata)
    sub = pd.read_csv(demo.sample_submission)
    assert list(sub.columns) == ["isic_id", "target"] and (sub["target"] == 0.3).all()
    assert list(sub["isic_id"]) == list(test["isic_id"])
    truth = pd.read_csv(demo.demo_truth)
    assert list(truth.columns) == ["isic_id", "split", "target", "probability"]
    assert truth["probability"].between(0, 1).all()
    merged = train.merge(truth, on="isic_id", suffixes=("", "_truth"))
    assert len(merged) == len(train) and (merged["split"] == "train").all()
    assert (merged["target"] == merged["target_truth"]).all()
    assert set(truth.loc[truth["split"] == "test", "isic_id"]) == set(test["isic_id"])


def test_same_seed_same_bytes_different_seed_differs(demo: DataPaths, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_images, "_CHUNK", 64)  # several chunks, so the two worker processes share them
    again = DataPaths(tmp_path / "again")
    write_demo_data(again.root, TINY, workers=2)
    for name in ("train_metadata", "test_metadata", "sample_submission", "demo_truth", "train_images",
                 "test_images"):
        assert getattr(again, name).read_bytes() == getattr(demo, name).read_bytes(), name
    assert sorted(p.name for p in again.masks.iterdir()) == sorted(p.name for p in demo.masks.iterdir())

    other = DataPaths(tmp_path / "other")
    write_demo_data(other.root, DemoSpec(patients=12, lesions_per_patient=20, seed=6, mask_count=0), workers=1)
    assert other.train_metadata.read_bytes() != demo.train_metadata.read_bytes()
    assert not set(_h5_bytes(other.train_images).values()) & set(_h5_bytes(demo.train_images).values())


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = DemoSpec(patients=2, lesions_per_patient=5, seed=1, mask_count=2)
    with pytest.raises(DemoDataError, match="not empty"):
        write_demo_data(out, spec, workers=1)
    assert (out / "keep.txt").read_text() == "mine"
    write_demo_data(out, spec, overwrite=True, workers=1)
    assert not (out / "keep.txt").exists() and DataPaths(out).train_images.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind


def test_bad_spec_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"^positive_rate: expected a number in \(0, 0.5\), got 0.7$"):
        DemoSpec(positive_rate=0.7)
    with pytest.raises(ConfigError, match=r"^patients: expected an integer >= 1, got 0$"):
        DemoSpec(patients=0)


def _blue_veil(image: np.ndarray, mask: np.ndarray) -> float:
    """A hand-made image feature: how blue the bluest tenth of the lesion is."""
    blue = image[..., 2].astype(np.float32) - image[..., 0]
    return float(np.percentile(blue[mask], 90)) if mask.any() else -255.0


def test_both_halves_carry_signal_and_truth_beats_both() -> None:
    tables = make_tables(DemoSpec(patients=150, lesions_per_patient=30, seed=11))
    train = tables.train
    y = train["target"].to_numpy()
    prob = tables.truth["probability"].to_numpy()[: len(train)]
    # tabular half: patient-normalised size, darkness, border and colour variation ("ugly duckling")
    feats = pd.DataFrame({
        "size": np.log(train["tbp_lv_areaMM2"]), "dark": -train["tbp_lv_deltaL"],
        "border": train["tbp_lv_norm_border"], "color": train["tbp_lv_color_std_mean"],
    })
    group = feats.groupby(train["patient_id"])
    relative = ((feats - group.transform("mean")) / (group.transform("std") + 1e-5)).fillna(0).sum(axis=1)
    raw = ((feats - feats.mean()) / feats.std()).sum(axis=1)
    # image half: a feature read off the rendered crops, for all positives and 400 negatives
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.flatnonzero(y == 1), rng.choice(np.flatnonzero(y == 0), 400, replace=False)])
    veil = []
    for i in rows:
        image, mask = demo_images.render_lesion(tables.render_train.iloc[i].to_dict(), np.random.default_rng(i))
        veil.append(_blue_veil(image, mask))
    ys = y[rows]
    tab, img, best = pauc(ys, relative.to_numpy()[rows]), pauc(ys, np.array(veil)), pauc(ys, prob[rows])
    assert tab > 0.06 and img > 0.06
    assert pauc(y, relative) > pauc(y, raw)  # the signal is relative to the patient
    assert best > max(tab, img) + 0.02
    metadata = train[list(schema.NUMERIC_TEST_COLUMNS)].to_numpy(dtype=float)
    cue = tables.truth["image_cue"].to_numpy()[: len(train)]
    assert np.nanmax(np.abs([np.corrcoef(c[~np.isnan(c)], cue[~np.isnan(c)])[0, 1] for c in metadata.T])) < 0.1


def test_cli_writes_demo(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lesionstack.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["demo-data", str(out), "--patients", "3", "--lesions-per-patient", "8"])
    assert result.exit_code == 0, result.output
    assert "24 lesions of 3 patients" in result.output
    assert len(pd.read_csv(DataPaths(out).train_metadata)) == 24
    again = CliRunner().invoke(app, ["demo-data", str(out), "--patients", "3"])
    assert again.exit_code == 2 and "not empty" in again.output  # a usage error, not a traceback


def test_data_layer_reads_the_demo(demo: DataPaths) -> None:
    from lesionstack.data.hdf5 import H5Images
    from lesionstack.data.metadata import read_metadata

    train = read_metadata(demo.train_metadata, kind="train")
    test = read_metadata(demo.test_metadata, kind="test")
    assert len(train) == 240 and len(test) > 0
    images = H5Images(demo.train_images)
    first = train["isic_id"].iloc[0]
    assert first in images and len(images) == len(train)
    img = images.read(first)
    assert img.ndim == 3 and img.shape[0] == img.shape[1] and img.dtype == np.uint8
    images.close()


def _crops_64(seed: int) -> tuple[object, np.ndarray, np.ndarray]:
    """The default demo's training crops rendered at 64 px, its labels and its hidden image cue."""
    import torch

    tables = make_tables(DemoSpec(seed=seed))
    render = tables.render_train.assign(size_px=64)
    crops = np.stack([demo_images.render_lesion(render.iloc[i].to_dict(), np.random.default_rng(i))[0]
                      for i in range(len(render))])
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - 128) / 40
    return x, tables.train["target"].to_numpy(), tables.truth["image_cue"].to_numpy()[: len(render)]


@pytest.mark.slow
def test_tiny_cnn_learns_the_image_cue_from_labels() -> None:
    """Labels only, 64 px, a few epochs of balanced draws: the CNN finds the veil, but not perfectly."""
    import torch

    torch.manual_seed(0)
    x, y, _ = _crops_64(seed=0)
    x_val, y_val, cue_val = _crops_64(seed=1)
    layers: list[torch.nn.Module] = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 32)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]
    net = torch.nn.Sequential(*layers, torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(net.parameters(), 3e-3)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(0)
    for _ in range(5):  # each epoch: all positives and three times as many fresh negatives
        draw = rng.permutation(np.concatenate([pos, rng.choice(neg, 3 * len(pos), replace=False)]))
        net.train()
        for batch in np.array_split(draw, len(draw) // 32):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(x[batch]).squeeze(1), torch.from_numpy(y[batch]).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        score = net(x_val).squeeze(1).numpy()
    assert pauc(y_val, score) > 0.04
    assert np.corrcoef(score, cue_val)[0, 1] > 0.3
    assert pauc(y_val, score) < 0.2
