"""The ISIC Archive reader (`isic image download` layout) and the synthetic archive `demo-data` writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lesionstack.data.archive import BENIGN, INDETERMINATE, MALIGNANT, read_archive
from lesionstack.data.diagnosis import DiagnosisDataError
from lesionstack.data.synthetic_archive import write_archive_demo


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "isic"
    write_archive_demo(out, images=40, seed=3)
    return out


def _copy_with(src: Path, dst: Path, meta: pd.DataFrame) -> Path:
    dst.mkdir()
    for f in src.glob("*.JPG"):
        (dst / f.name).write_bytes(f.read_bytes())
    meta.to_csv(dst / "metadata.csv", index=False)
    return dst


def test_demo_archive_has_isic_cli_layout(archive: Path) -> None:
    meta = pd.read_csv(archive / "metadata.csv")
    assert list(meta.columns[:3]) == ["isic_id", "attribution", "copyright_license"]
    rest = list(meta.columns[3:])
    assert rest == sorted(rest)  # isic-cli writes the record fields sorted by name
    assert {"diagnosis_1", "benign_malignant"} <= set(rest)
    assert all((archive / f"{i}.JPG").is_file() for i in meta["isic_id"])
    assert set(meta["diagnosis_1"]) == {"Benign", "Malignant", "Indeterminate"}


def test_reader_maps_diagnosis_1_to_three_classes(archive: Path) -> None:
    data = read_archive(archive)
    meta = pd.read_csv(archive / "metadata.csv").set_index("isic_id")
    expect = {"Benign": BENIGN, "Malignant": MALIGNANT, "Indeterminate": INDETERMINATE}
    got = data.table.set_index("isic_id")["label"]
    assert (got == meta.loc[got.index, "diagnosis_1"].map(expect)).all()
    assert len(data.table) == 40 and data.images.read(got.index[0]).ndim == 3


def test_benign_malignant_fills_rows_without_diagnosis_1(archive: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(archive / "metadata.csv")
    meta.loc[0, "diagnosis_1"] = None
    meta.loc[0, "benign_malignant"] = "indeterminate/malignant"
    meta.loc[1, ["diagnosis_1", "benign_malignant"]] = None  # no class: left out
    data = read_archive(_copy_with(archive, tmp_path / "a", meta))
    labels = data.table.set_index("isic_id")["label"]
    assert labels[meta["isic_id"][0]] == INDETERMINATE
    assert meta["isic_id"][1] not in labels.index and len(labels) == 39


@pytest.mark.parametrize("column, value, line", [("diagnosis_1", "Malignent", 5), ("benign_malignant", "bad", 3)])
def test_unknown_value_names_file_column_line(archive: Path, tmp_path: Path, column: str, value: str,
                                              line: int) -> None:
    meta = pd.read_csv(archive / "metadata.csv")
    meta.loc[line - 2, column] = value
    folder = _copy_with(archive, tmp_path / "a", meta)
    with pytest.raises(DiagnosisDataError, match=rf"metadata.csv: column '{column}' line {line} .*'{value}'"):
        read_archive(folder)


def test_duplicate_id_missing_image_and_missing_columns(archive: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(archive / "metadata.csv")
    dup = meta.copy()
    dup.loc[6, "isic_id"] = dup.loc[2, "isic_id"]
    with pytest.raises(DiagnosisDataError, match=r"column 'isic_id' has duplicate value .* lines \[4, 8\]"):
        read_archive(_copy_with(archive, tmp_path / "dup", dup))
    folder = _copy_with(archive, tmp_path / "noimg", meta)
    (folder / f"{meta['isic_id'][9]}.JPG").unlink()
    with pytest.raises(DiagnosisDataError, match=rf"column 'isic_id' line 11: '{meta['isic_id'][9]}' has no image"):
        read_archive(folder)
    bare = meta.drop(columns=["diagnosis_1", "benign_malignant"])
    with pytest.raises(DiagnosisDataError, match=r"metadata.csv: missing column 'diagnosis_1'"):
        read_archive(_copy_with(archive, tmp_path / "nodx", bare))
    with pytest.raises(DiagnosisDataError, match=r"archive metadata file not found"):
        read_archive(tmp_path / "noimg" / "..")  # a folder without metadata.csv


def test_demo_data_archive_option_writes_a_readable_archive(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lesionstack.cli import app

    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "isic"), "--archive", "20", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "isic image download" in result.output
    assert len(read_archive(tmp_path / "isic").table) == 20
