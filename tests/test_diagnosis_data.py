"""Diagnosis readers (ISIC 2024, HAM10000, ISIC Task 3) and lesion/patient-grouped folds, on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from lesionstack.config import ConfigError
from lesionstack.data.diagnosis import (
    HAM10000_METADATA,
    DiagnosisDataError,
    LabelMap,
    check_diagnosis_folds,
    diagnosis_folds,
)
from lesionstack.data.diagnosis_layouts import read_diagnosis, read_ham10000, read_ham10000_labels, read_task3

HAM_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}


@pytest.fixture(scope="module")
def ham_labels(shared_data) -> pd.DataFrame:
    return read_ham10000_labels(shared_data / "ham10000" / HAM10000_METADATA)


@pytest.fixture(scope="module")
def ham_folds(ham_labels) -> pd.DataFrame:
    return diagnosis_folds(ham_labels, n_folds=5, seed=42)


def test_real_ham10000_classes_and_lesion_folds(shared_data, ham_labels, ham_folds):
    assert len(ham_labels) == 10_015 and ham_labels["label"].value_counts().to_dict() == HAM_COUNTS
    lesions = pd.read_csv(shared_data / "ham10000" / HAM10000_METADATA).set_index("image_id")["lesion_id"]
    assert (ham_labels["group"].to_numpy() == lesions.loc[ham_labels["isic_id"]].to_numpy()).all()
    folds = ham_folds
    assert len(folds) == 10_015 and sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (folds.groupby("group")["fold"].nunique() == 1).all()  # no lesion in two folds
    assert folds["group"].nunique() < len(folds)  # (there are lesions with several images to split)
    per_fold = pd.crosstab(folds["label"], folds["fold"])
    assert (per_fold > 0).all().all()  # every class in every fold
    share = per_fold / per_fold.sum(axis=0)  # and stratified: each fold's class shares near the whole's
    overall = folds["label"].value_counts(normalize=True).reindex(share.index)
    assert (share.sub(overall, axis=0).abs() < 0.01).all().all()


def test_folds_refuse_a_leaked_lesion_and_a_missing_class(ham_folds):
    folds = ham_folds
    leaked = folds.copy()
    multi = leaked.groupby("group").filter(lambda g: len(g) > 1).index[0]
    leaked.loc[multi, "fold"] = (leaked.loc[multi, "fold"] + 1) % 5
    with pytest.raises(DiagnosisDataError, match="in more than one fold"):
        check_diagnosis_folds(leaked, 5)
    no_df = folds.copy()
    no_df.loc[(no_df["label"] == "df") & (no_df["fold"] == 3), "fold"] = 2
    with pytest.raises(DiagnosisDataError, match="'df' has no row in fold 3"):
        check_diagnosis_folds(no_df, 5)
    few = folds[folds["label"].isin(["nv", "vasc"])].copy()
    few = few[(few["label"] == "nv") | few["group"].isin(few.loc[few["label"] == "vasc", "group"].unique()[:3])]
    with pytest.raises(DiagnosisDataError, match=r"at least 5 groups; \{'vasc': 3\}"):
        diagnosis_folds(few, n_folds=5)


def test_ham10000_errors_name_file_column_line(shared_data, tmp_path):
    root = tmp_path / "ham"
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    meta = pd.read_csv(shared_data / "ham10000" / HAM10000_METADATA).head(40)
    for image_id in meta["image_id"]:
        (root / "HAM10000_images_part_1" / f"{image_id}.jpg").touch()
    meta.loc[6, "dx"] = "melanoma"
    meta.to_csv(root / HAM10000_METADATA, index=False)
    with pytest.raises(DiagnosisDataError, match=r"HAM10000_metadata.csv: column 'dx' line 8 .*'melanoma'"):
        read_ham10000(root)
    meta.loc[6, "dx"] = "mel"
    meta.to_csv(root / HAM10000_METADATA, index=False)
    (root / "HAM10000_images_part_1" / f"{meta['image_id'][4]}.jpg").unlink()
    with pytest.raises(DiagnosisDataError, match=rf"column 'image_id' line 6: '{meta['image_id'][4]}' has no image"):
        read_ham10000(root)


@pytest.fixture
def isic2024_dir(tmp_path, shared_data) -> Path:
    """The five real training rows (all 55 columns) and their real crops in an HDF5 file."""
    crops = shared_data / "isic2024-real-crops"
    shutil.copy(crops / "train-metadata-5-rows.csv", tmp_path / "train-metadata.csv")
    with h5py.File(tmp_path / "train-image.hdf5", "w") as h5:
        for isic_id in pd.read_csv(tmp_path / "train-metadata.csv")["isic_id"]:
            h5.create_dataset(isic_id, data=np.bytes_((crops / f"{isic_id}.jpg").read_bytes()))
    return tmp_path


# the five real rows hold no melanoma and no other malignant diagnosis: a map without those classes
REAL_MAP = LabelMap(classes=("benign", "basal cell carcinoma", "squamous cell carcinoma"), mapping={
    "Benign": "benign", "Indeterminate": "drop", "Malignant": "drop",
    "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma":
        "basal cell carcinoma",
    "Malignant::Malignant epidermal proliferations": "squamous cell carcinoma"})


def test_isic2024_real_iddx_paths_map_to_classes(isic2024_dir):
    data = read_diagnosis(isic2024_dir, label_map=REAL_MAP)
    assert data.layout == "isic2024" and data.group_kind == "patient"
    got = dict(zip(data.table["isic_id"], data.table["label"]))
    assert got == {"ISIC_0082829": "squamous cell carcinoma", "ISIC_0157465": "benign",
                   "ISIC_1885694": "squamous cell carcinoma", "ISIC_6776067": "basal cell carcinoma",
                   "ISIC_9153490": "benign"}
    assert data.table["group"].tolist()[:2] == ["IP_3249371", "IP_2331257"]
    assert data.images.read("ISIC_6776067").shape[2] == 3
    # the default five classes: melanoma and other malignant have no rows here, which is an error
    with pytest.raises(DiagnosisDataError, match=r"\['melanoma', 'other malignant'\] have no rows"):
        read_diagnosis(isic2024_dir)


def _set_iddx(path: Path, row: int, full: str | None, level1: str | None) -> None:
    meta = pd.read_csv(path)
    meta.loc[row, "iddx_full"], meta.loc[row, "iddx_1"] = full, level1
    meta.to_csv(path, index=False)


def test_isic2024_indeterminate_is_dropped_or_its_own_class(isic2024_dir):
    path = isic2024_dir / "train-metadata.csv"
    _set_iddx(path, 1, "Indeterminate::Indeterminate melanocytic proliferations::Atypical melanocytic "
              "neoplasm", "Indeterminate")
    dropped = read_diagnosis(isic2024_dir, label_map=REAL_MAP)
    assert "ISIC_0157465" not in set(dropped.table["isic_id"]) and len(dropped.table) == 4
    own = LabelMap(classes=(*REAL_MAP.classes, "indeterminate"),
                   mapping={**REAL_MAP.mapping, "Indeterminate": "indeterminate"})
    kept = read_diagnosis(isic2024_dir, label_map=own)
    assert kept.table.set_index("isic_id").loc["ISIC_0157465", "label"] == "indeterminate"


def test_isic2024_levels_without_iddx_full_and_errors(isic2024_dir, shared_data):
    path = isic2024_dir / "train-metadata.csv"
    meta = pd.read_csv(path).drop(columns=["iddx_full"])
    meta.to_csv(path, index=False)
    assert read_diagnosis(isic2024_dir, label_map=REAL_MAP).table["label"].tolist()[3] == "basal cell carcinoma"
    meta.loc[2, "iddx_1"] = "Surprising"
    meta.to_csv(path, index=False)
    with pytest.raises(DiagnosisDataError, match=r"train-metadata.csv: column 'iddx_full' line 4 "
                                                 r"\(isic_id ISIC_1885694\): diagnosis 'Surprising::"):
        read_diagnosis(isic2024_dir, label_map=REAL_MAP)
    shutil.copy(shared_data / "isic2024-real-crops" / "train-metadata-5-rows.csv", path)
    full = pd.read_csv(path)
    full["iddx_full"] = ["Benign", "Benign", "Benign", "Benign", "Benign"]
    full.to_csv(path, index=False)
    with pytest.raises(DiagnosisDataError, match=r"column 'iddx_1' line 2 .*'Malignant' disagrees"):
        read_diagnosis(isic2024_dir, label_map=REAL_MAP)


def test_label_map_longest_prefix_and_config_errors():
    m = LabelMap()
    assert m.class_of("Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ") == "melanoma"
    assert m.class_of("Malignant::Malignant dermal proliferations::Dermatofibrosarcoma") == "other malignant"
    assert m.class_of("Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell "
                      "carcinoma::Basal cell carcinoma, Nodular") == "basal cell carcinoma"
    assert m.class_of("Benign::Benign melanocytic proliferations::Nevus") == "benign"
    assert m.class_of("Indeterminate::Indeterminate epidermal proliferations") == "drop"
    assert m.class_of("Benignish") is None  # whole levels only
    # a label map is config: a class it maps to but does not declare is a config error (exit 3), not bad data
    with pytest.raises(ConfigError, match="not in labels.classes"):
        LabelMap(classes=("benign", "melanoma"), mapping={"Benign": "benign", "Malignant": "cancer"})


def _task3(root: Path, rows: list[list], columns: list[str]) -> Path:
    (root / "ISIC2018_Task3_Training_Input").mkdir(parents=True)
    pd.DataFrame(rows, columns=columns).to_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    for r in rows:
        (root / "ISIC2018_Task3_Training_Input" / f"{r[0]}.jpg").touch()
    return root


def test_task3_onehot_groups_and_errors(tmp_path):
    cols = ["image", "MEL", "NV", "BCC", "UNK"]
    rows = [["ISIC_1", 1.0, 0.0, 0.0, 0.0], ["ISIC_2", 0.0, 1.0, 0.0, 0.0], ["ISIC_3", 0.0, 0.0, 1.0, 0.0]]
    root = _task3(tmp_path / "t", rows, cols)
    data = read_diagnosis(root)
    assert data.layout == "task3" and data.classes == ("MEL", "NV", "BCC")  # UNK has no rows: left out
    assert data.table["label"].tolist() == ["MEL", "NV", "BCC"] and data.group_kind == "image"
    pd.DataFrame({"image": ["ISIC_1", "ISIC_2", "ISIC_3"], "lesion_id": ["L1", "L1", None]}).to_csv(
        root / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    grouped = read_task3(root)
    assert grouped.group_kind == "lesion" and grouped.table["group"].tolist() == ["L1", "L1", "image:ISIC_3"]
    rows[1][3] = 1.0
    truth = root / "ISIC2018_Task3_Training_GroundTruth.csv"
    truth.write_text(pd.DataFrame(rows, columns=cols).to_csv(index=False))
    with pytest.raises(DiagnosisDataError, match=r"GroundTruth.csv: line 3 \(image ISIC_2\): more than one"):
        read_task3(root)
    rows[1][3], rows[1][2] = 0.0, "yes"
    truth.write_text(pd.DataFrame(rows, columns=cols).to_csv(index=False))
    with pytest.raises(DiagnosisDataError, match=r"column 'NV' line 3 \(image ISIC_2\): value 'yes'"):
        read_task3(root)


def test_task3_2017_implicit_nevus(tmp_path):
    rows = [["ISIC_1", 1.0, 0.0], ["ISIC_2", 0.0, 1.0], ["ISIC_3", 0.0, 0.0]]
    root = _task3(tmp_path / "t", rows, ["image_id", "melanoma", "seborrheic_keratosis"])
    with pytest.raises(DiagnosisDataError, match=r"line 4 \(image_id ISIC_3\): no class column is 1"):
        read_task3(root)  # the zero row has no class unless one is named
    data = read_task3(root, implicit_class="nevus")
    assert data.classes == ("melanoma", "seborrheic_keratosis", "nevus")
    assert data.table["y"].tolist() == [0, 1, 2]


def test_no_layout_found(tmp_path):
    with pytest.raises(DiagnosisDataError, match="no diagnosis layout found"):
        read_diagnosis(tmp_path)


def test_folder_images_decode_as_the_hdf5_crops_do(tmp_path):
    """JPEG and PNG files go through `decode_image`: the same DCT scaling, `max_side`, pixel limits and
    errors naming the file as the competition's HDF5 crops (a PNG used to bypass the pixel limit)."""
    import io
    import struct
    import zlib

    import simplejpeg
    from PIL import Image

    from lesionstack.data.decode import CorruptImageError, ImageTooLargeError
    from lesionstack.data.diagnosis import FolderImages

    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    (tmp_path / "a.jpg").write_bytes(simplejpeg.encode_jpeg(rgb, quality=95))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    (tmp_path / "b.png").write_bytes(buf.getvalue())
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    # a PNG whose header claims 20,000 x 20,000 px: refused from the header, never decoded
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    (tmp_path / "d.png").write_bytes(bomb)
    images = FolderImages.scan([tmp_path], tmp_path)
    assert images.ids == ["a", "b", "c", "d"]
    assert images.read("a").shape == (300, 200, 3)
    assert images.read("a", min_side=50).shape == (75, 50, 3)  # libjpeg's 1/4 scale keeps both sides >= 50
    assert np.array_equal(images.read("b"), rgb)
    assert images.read("b", max_side=60).shape == (60, 40, 3)
    with pytest.raises(CorruptImageError, match="c.jpg"):
        images.read("c")
    with pytest.raises(ImageTooLargeError, match="d.png"):
        images.read("d")
