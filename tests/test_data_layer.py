"""The data layer against the real competition files and against each kind of bad input."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import simplejpeg
import torch

from lesionstack.data.dataset import CropDataset, ScoringCrops
from lesionstack.data.hdf5 import CorruptImageError, H5Images, decode_jpeg, list_ids, locate_crops
from lesionstack.data.metadata import MetadataError, check_images_cover, id_mismatch, read_metadata
from lesionstack.data.schema import NUMERIC_TEST_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS

# ---- the real files, as they are -------------------------------------------------------------------


def test_reads_real_public_test_set(public_test_dir):
    meta = read_metadata(public_test_dir / "test-metadata.csv", kind="test")
    assert list(meta.columns) == list(TEST_COLUMNS)
    assert meta["isic_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert all(meta[c].dtype == np.float64 for c in NUMERIC_TEST_COLUMNS)
    images = H5Images(public_test_dir / "test-image.hdf5")
    assert sorted(images.ids) == sorted(meta["isic_id"])
    check_images_cover(meta, set(images.ids), "test-metadata.csv", images.path)
    sizes = [images.read(i).shape for i in meta["isic_id"]]
    assert sizes == [(141, 141, 3), (125, 125, 3), (119, 119, 3)]
    assert images.read("ISIC_0015657").dtype == np.uint8


def test_reads_real_first_1000_rows(shared_data):
    meta = read_metadata(
        shared_data / "isic2024-real-metadata" / "train-metadata-first1000-no-target.csv", kind="test"
    )
    assert meta.shape == (1000, 43)  # image_type is absent in this copy: optional
    assert meta["patient_id"].nunique() == 514
    assert meta["age_approx"].isna().sum() > 0 and meta["sex"].isna().sum() > 0  # real missing values


def test_reads_real_training_rows_with_all_55_columns(shared_data):
    meta = read_metadata(shared_data / "isic2024-real-crops" / "train-metadata-5-rows.csv", kind="train")
    assert list(meta.columns) == list(TRAIN_COLUMNS)
    assert meta["target"].tolist() == [1, 0, 1, 1, 0]
    assert meta["iddx_1"].tolist()[:2] == ["Malignant", "Benign"]


def test_real_crops_decode(shared_data):
    for jpg in sorted((shared_data / "isic2024-real-crops").glob("*.jpg")):
        img = decode_jpeg(jpg.read_bytes(), jpg.stem)
        assert img.ndim == 3 and img.shape[0] == img.shape[1] and 60 <= img.shape[0] <= 240


def test_reduced_scale_decode_keeps_min_side(public_test_dir):
    images = H5Images(public_test_dir / "test-image.hdf5")
    small = images.read("ISIC_0015657", min_side=64)
    assert min(small.shape[:2]) >= 64 and small.shape[0] < 141


def test_reader_is_picklable_and_opens_lazily(public_test_dir):
    images = H5Images(public_test_dir / "test-image.hdf5")
    images.read("ISIC_0015657")  # open a handle in this process
    clone = pickle.loads(pickle.dumps(images))  # as a DataLoader worker receives it
    assert clone._h5 is None
    assert np.array_equal(clone.read("ISIC_0015740"), images.read("ISIC_0015740"))


# ---- bad inputs: each error names the file, the column or key, and the row ---------------------------


@pytest.fixture
def test_csv(tmp_path, public_test_dir) -> Path:
    dst = tmp_path / "test-metadata.csv"
    shutil.copy(public_test_dir / "test-metadata.csv", dst)
    return dst


def _edit(path: Path, fn) -> Path:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df)
    df.to_csv(path, index=False)
    return path


def test_missing_required_column(test_csv):
    """Training needs every column; a test file only its keys: an absent column is filled as missing and
    recorded (predict warns about it) so a submission is still written (issue 12.4)."""
    _edit(test_csv, lambda df: df.drop(columns=["tbp_lv_areaMM2"], inplace=True))
    test = read_metadata(test_csv, kind="test")
    assert test["tbp_lv_areaMM2"].isna().all() and test.attrs["absent_columns"] == ["tbp_lv_areaMM2"]
    _edit(test_csv, lambda df: df.drop(columns=["patient_id"], inplace=True))
    with pytest.raises(MetadataError, match=r"test-metadata.csv: missing required column\(s\) \['patient_id'\]"):
        read_metadata(test_csv, kind="test")


def test_test_file_read_as_training_data_says_so(test_csv):
    with pytest.raises(MetadataError, match=r"\['target'\] \(is this a test file"):
        read_metadata(test_csv, kind="train")


def test_non_numeric_value_names_column_line_and_id(test_csv):
    _edit(test_csv, lambda df: df.__setitem__("tbp_lv_areaMM2", ["3.1", "n/a", "2.0"]))
    with pytest.raises(MetadataError, match=r"column 'tbp_lv_areaMM2' line 3 \(isic_id ISIC_0015729\): "
                                            r"value 'n/a' is not a number"):
        read_metadata(test_csv, kind="test")


def test_duplicate_isic_id(test_csv):
    _edit(test_csv, lambda df: df.__setitem__("isic_id", ["ISIC_1", "ISIC_2", "ISIC_1"]))
    with pytest.raises(MetadataError, match=r"duplicate value 'ISIC_1' at lines \[2, 4\]"):
        read_metadata(test_csv, kind="test")


def test_empty_patient_id(test_csv):
    _edit(test_csv, lambda df: df.__setitem__("patient_id", ["IP_1", "", "IP_2"]))
    with pytest.raises(MetadataError, match=r"column 'patient_id' is empty at line 3"):
        read_metadata(test_csv, kind="test")


def test_bad_target(tmp_path, shared_data):
    path = _edit(Path(shutil.copy(shared_data / "isic2024-real-crops" / "train-metadata-5-rows.csv",
                                  tmp_path / "train-metadata.csv")),
                 lambda df: df.__setitem__("target", ["1", "0", "2", "1", "0"]))
    with pytest.raises(MetadataError, match=r"column 'target' line 4 .* is not 0 or 1"):
        read_metadata(path, kind="train")


def test_extra_columns_are_tolerated(test_csv):
    _edit(test_csv, lambda df: df.__setitem__("my_notes", ["a", "b", "c"]))
    assert "my_notes" in read_metadata(test_csv, kind="test").columns


def test_metadata_id_without_image(test_csv, public_test_dir):
    _edit(test_csv, lambda df: df.__setitem__("isic_id", ["ISIC_0015657", "ISIC_9999999", "ISIC_0015740"]))
    meta = read_metadata(test_csv, kind="test")
    images = H5Images(public_test_dir / "test-image.hdf5")
    with pytest.raises(MetadataError, match=r"isic_id 'ISIC_9999999' at line 3 has no image in .*test-image.hdf5"):
        check_images_cover(meta, set(images.ids), test_csv, images.path)


def test_missing_metadata_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_metadata(tmp_path / "nope.csv")


def test_corrupt_jpeg_names_isic_id(tmp_path):
    path = tmp_path / "images.hdf5"
    good = simplejpeg.encode_jpeg(np.full((64, 64, 3), 128, np.uint8))
    with h5py.File(path, "w") as h5:
        h5["ISIC_0000001"] = np.bytes_(good)
        h5["ISIC_0000002"] = np.bytes_(good[: len(good) // 3])  # truncated
        h5["ISIC_0000003"] = np.bytes_(b"not a jpeg at all")
    images = H5Images(path)
    assert images.read("ISIC_0000001").shape == (64, 64, 3)
    for bad in ("ISIC_0000002", "ISIC_0000003"):
        with pytest.raises(CorruptImageError, match=bad) as info:
            images.read(bad)
        assert info.value.isic_id == bad and "images.hdf5" in str(info.value)
    with pytest.raises(KeyError, match="ISIC_0000004"):
        images.read("ISIC_0000004")


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "train-image.hdf5"
    path.write_bytes(b"garbage")
    with pytest.raises(OSError, match="train-image.hdf5: not a readable HDF5 file"):
        _ = H5Images(path).ids


def mixed_layouts(path: Path) -> tuple[Path, bytes]:
    """One JPEG stored three ways: contiguous (the competition's), chunked + compressed, NUL-padded."""
    jpeg = simplejpeg.encode_jpeg(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    with h5py.File(path, "w") as h5:
        h5["contiguous"] = np.bytes_(jpeg)
        h5.create_dataset("chunked", data=np.frombuffer(jpeg, np.uint8), chunks=True, compression="gzip")
        h5.create_dataset("padded", data=np.array(jpeg + b"\0\0\0", dtype=f"S{len(jpeg) + 3}"))
    return path, jpeg


def test_fast_path_returns_exactly_what_h5py_returns(tmp_path, public_test_dir):
    """The pread fast path and h5py's own read agree, for the real file and for layouts it must skip."""
    real = H5Images(public_test_dir / "test-image.hdf5")
    with h5py.File(real.path, "r") as h5:
        for key in h5:
            assert real.read_bytes(key) == bytes(h5[key][()])
    path, jpeg = mixed_layouts(tmp_path / "mixed.hdf5")
    images = H5Images(path)
    for key in ("contiguous", "chunked", "padded"):
        assert images.read_bytes(key) == jpeg, key
        assert images.read_bytes(key) == jpeg, key  # second read: from the cached location


def test_pillow_fallback_decodes_the_same_image(monkeypatch, public_test_dir):
    """Where simplejpeg is not installed (a bare Kaggle image), Pillow decodes; corrupt data still names the id."""
    import lesionstack.data.decode as decode
    import lesionstack.data.hdf5 as hdf5

    images = H5Images(public_test_dir / "test-image.hdf5")
    fast = images.read("ISIC_0015657")
    monkeypatch.setattr(decode, "simplejpeg", None)
    slow = images.read("ISIC_0015657")
    assert slow.shape == fast.shape and np.abs(slow.astype(int) - fast).mean() < 2.0
    assert min(images.read("ISIC_0015657", min_side=64).shape[:2]) >= 64
    with pytest.raises(CorruptImageError, match="ISIC_X"):
        hdf5.decode_jpeg(b"junk", "ISIC_X")


def test_id_mismatch_names_each_kind_with_examples():
    assert id_mismatch(["b", "a", "c"], ["a", "b", "c"]) is None  # order does not matter
    assert id_mismatch(["a", "a", "x"], ["a", "b"]) == "1 missing (e.g. ['b']), 1 repeated (e.g. ['a']), " \
        "1 unexpected (e.g. ['x'])"
    five = id_mismatch([f"ISIC_{i}" for i in range(5)], [])
    assert five == "5 unexpected (e.g. ['ISIC_0', 'ISIC_1', 'ISIC_2'])"  # three examples, not the whole list


def test_crop_ranges_read_what_h5py_returns_and_hold_only_arrays(tmp_path, public_test_dir):
    """A scoring pass's reader (`list_ids` + `locate_crops`): the same bytes as h5py for every layout, the ids
    and byte ranges as numpy arrays, picklable without its handles, and a clear error for absent ids."""
    real = public_test_dir / "test-image.hdf5"
    ids = list_ids(real)
    assert ids.dtype.kind == "S" and ids.astype(str).tolist() == sorted(H5Images(real).ids)
    path, jpeg = mixed_layouts(tmp_path / "mixed.hdf5")
    crops = locate_crops(path, ["padded", "chunked", "contiguous", "padded"])  # any order, repeats allowed
    assert crops.offsets.dtype == np.int64 and crops.ids.dtype.kind == "S"
    assert crops.offsets[1] == -1 and (crops.offsets[[0, 2, 3]] > 0).all()  # chunked: read through h5py
    assert [crops.read_bytes(i) for i in range(4)] == [jpeg] * 4 and crops.id(1) == "chunked"
    clone = pickle.loads(pickle.dumps(crops))  # as a DataLoader worker receives it: no handle travels
    assert clone._fd is None and clone._h5 is None and clone.read_bytes(1) == jpeg and clone.read_bytes(0) == jpeg
    crops.close()
    clone.close()
    with pytest.raises(KeyError, match=r"mixed.hdf5: no crop for 2 id\(s\), e.g. \['ISIC_1', 'ISIC_2'\]"):
        locate_crops(path, np.array([b"contiguous", b"ISIC_1", b"ISIC_2"]))
    with pytest.raises(FileNotFoundError, match="absent.hdf5: image file not found"):
        list_ids(tmp_path / "absent.hdf5")


def test_a_scoring_pass_decodes_each_crop_as_the_training_reader_does(tmp_path, public_test_dir):
    """`ScoringCrops` (byte ranges) gives the same model input as `CropDataset` (H5Images), and a crop it
    cannot decode or read becomes a skipped item with the reason, never an exception."""
    real = public_test_dir / "test-image.hdf5"
    ids = list_ids(real)
    scoring, training = ScoringCrops(locate_crops(real, ids), 64), CropDataset(real, ids.astype(str).tolist(), None, 64)
    for i in range(len(ids)):
        assert scoring[i][1:] == (0.0, i, None) and torch.equal(scoring[i][0], training[i][0])
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as h5:
        h5["ISIC_0000001"] = np.bytes_(b"not a jpeg at all")
        h5["ISIC_0000002"] = np.bytes_(b"\xff\xd8 gone")
    bad = ScoringCrops(locate_crops(path, ["ISIC_0000001", "ISIC_0000002"]), 64)
    assert bad[0][0] is None and "not a decodable" in bad[0][3]
    os.close(bad.crops._fd)  # an I/O error on the read (EBADF here; EIO on a failing disk)
    assert bad[1][0] is None and bad[1][3].startswith("unreadable (")
    bad.crops._pid = None  # its handle is gone: nothing left to close
