"""`serve` with the exported ONNX student: which model a bundle serves with (`pick_model`), the answer scored by
ONNX Runtime and saying so, its rank against the student's own OOF scores, int8 on request, and the same
no-storage guarantee as the CNN. A tiny distilled student (tests/helpers.py) exported into ARTIFACTS/export."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from helpers import big_jpeg, open_files, post, real_crop, running, slow_upload  # noqa: E402
from lesionstack.data.decode import decode_input  # noqa: E402
from lesionstack.inference.export import FP32_FILE, INT8_FILE, OnnxStudent  # noqa: E402
from lesionstack.inference.serve import (  # noqa: E402
    Analyser,
    ServedStudent,
    create_app,
    load_analyser,
    pick_model,
)


@pytest.fixture(scope="module")
def student_bundle(exported_student: tuple[Path, Path, Path, dict]) -> Path:
    """Artifacts with a distilled student (2 folds, OOF scores) and its export in ARTIFACTS/export; no CNN."""
    return exported_student[1]


@pytest.fixture(scope="module")
def analyser(student_bundle: Path) -> Analyser:
    return load_analyser(student_bundle)


@pytest.fixture(scope="module")
def client(analyser: Analyser) -> TestClient:
    return TestClient(create_app(analyser))


def test_a_bundle_without_a_cnn_serves_its_onnx_student(student_bundle, tmp_path):
    assert pick_model(student_bundle) == "student"
    assert pick_model(student_bundle, "cnn") == "cnn"
    both = tmp_path / "both"  # a CNN fold model and an export: auto keeps the (stronger) CNN
    (both / "cnn" / "fold_0").mkdir(parents=True)
    (both / "cnn" / "fold_0" / "DONE").touch()
    (both / "export").symlink_to(student_bundle / "export")
    assert pick_model(both) == "cnn" and pick_model(both, "student") == "student"
    assert pick_model(tmp_path / "empty") == "cnn"  # nothing to serve: the CNN loader names what is missing
    with pytest.raises(ValueError, match="--model"):
        pick_model(student_bundle, "phone")


def test_the_answer_is_the_onnx_students_and_names_it(client, analyser, student_bundle, shared_data):
    r = post(client, real_crop(shared_data))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    student = OnnxStudent.load(student_bundle / "export")
    # the student's input is made from the bytes as every command makes it (reduced JPEG scale, then resized)
    expected = student.score_crops([decode_input(real_crop(shared_data), student.image_size)])[0]
    assert body["probability"] == pytest.approx(expected, abs=1e-6)
    model = body["model"]
    assert model["kind"] == "ONNX student" and model["scorer"] == "onnxruntime" and model["precision"] == "fp32"
    assert Path(model["file"]) == student_bundle / "export" / FP32_FILE
    assert model["student"] == "tiny" and model["folds"] == [0] and model["image_size"] == 32
    assert model["metadata_used"] is False
    assert body["overlay_image"] is None and body["heatmap_image"] is None and body["gradcam_layer"] is None
    assert body["diagnosis"] is None
    oof = pd.read_parquet(student_bundle / "distill" / "tiny" / "oof.parquet").merge(
        pd.read_csv(student_bundle / "folds.csv", dtype={"isic_id": str}), on="isic_id")
    assert body["rank"]["n_benign"] == int((oof["target"] == 0).sum())
    assert body["rank"]["n_malignant"] == int((oof["target"] == 1).sum())
    health = client.get("/healthz").json()
    assert health["model"]["scorer"] == "onnxruntime" and health["gradcam_layer"] is None


def test_the_int8_file_on_request(student_bundle, shared_data):
    client = TestClient(create_app(load_analyser(student_bundle, "student", int8=True)))
    model = post(client, real_crop(shared_data)).json()["model"]
    assert model["precision"] == "int8" and Path(model["file"]).name == INT8_FILE


def test_an_export_folder_elsewhere_and_without_oof_scores(student_bundle, tmp_path, shared_data):
    """--student-onnx DIR outside the bundle; with no distill/NAME/oof.parquet there is no rank, not an error."""
    bare = tmp_path / "bare"
    bare.mkdir()
    served = ServedStudent.load(bare, student_bundle / "export")
    body = post(TestClient(create_app(Analyser(None, student=served))), real_crop(shared_data)).json()
    assert body["rank"] is None and 0 < body["probability"] < 1
    with pytest.raises(ValueError, match="exactly one"):
        Analyser(None)
    with pytest.raises(FileNotFoundError, match="preprocess.json"):
        ServedStudent.load(bare)  # bare/export does not exist


def test_a_5_mb_upload_to_the_student_never_creates_a_file(analyser, tmp_path, monkeypatch):
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    during: list[set[str]] = []
    analyse = analyser.analyse

    def watched(*args: object, **kwargs: object) -> dict:
        during.append(open_files())
        return analyse(*args, **kwargs)

    monkeypatch.setattr(analyser, "analyse", watched)
    before = open_files()
    with running(create_app(analyser)) as url:
        assert slow_upload(f"{url}/api/predict", big_jpeg(), during) == 200
    new = set().union(*during) - before
    assert not [f for f in new if f.startswith(str(spool)) or "(deleted)" in f], new
    assert os.listdir(spool) == []
