"""The bundle knows where its data came from: demo-data marks its folders, training records the folder in
ARTIFACTS/training_data.json, and `score` and `serve` say plainly when a model learnt from synthetic data;
Grad-CAM only from a map of at least 4 x 4 cells. (`run`, `predict` and `package`: tests/test_pipeline.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lesionstack import provenance
from lesionstack.data.synthetic import write_ham10000_demo
from lesionstack.data.synthetic_archive import write_archive_demo
from lesionstack.inference.explain import gradcam
from lesionstack.inference.score import score
from lesionstack.inference.serve import load_predictor


def test_every_demo_data_layout_is_marked_synthetic(tmp_path: Path):
    write_ham10000_demo(tmp_path / "ham", lesions=20, seed=1)
    write_archive_demo(tmp_path / "archive", images=10, seed=1)
    for folder, layout in (("ham", "HAM10000"), ("archive", "ISIC Archive download")):
        marker = json.loads((tmp_path / folder / provenance.DATA_MARKER).read_text())
        assert marker["synthetic"] is True and marker["layout"] == layout
        assert marker["generator"] == "lesionstack demo-data" and marker["settings"]["seed"] == 1
    # the competition layout (and its masks/) is checked on the run's own demo data in test_pipeline.py


def test_a_stage_on_other_data_replaces_only_its_own_entry(tmp_path: Path):
    demo, real, art = tmp_path / "demo", tmp_path / "isic2024", tmp_path / "artifacts"
    demo.mkdir(), real.mkdir(), art.mkdir()
    provenance.mark_synthetic(demo, "ISIC 2024 competition", seed=0)
    assert provenance.read(art) is None and provenance.describe(art)["recorded"] is False
    provenance.record(art, demo, ("folds", "cnn", "stack"))
    assert provenance.synthetic_stages(provenance.read(art)) == ["cnn", "folds", "stack"]
    provenance.record(art, real, ("cnn",))  # train-cnn again, on real data
    found = provenance.read(art)
    assert found["stages"]["cnn"] == {"data": "isic2024", "synthetic": False, "marker": None}
    assert found["synthetic"] is True and provenance.synthetic_stages(found) == ["folds", "stack"]
    provenance.record(art, real, ("folds", "stack"))
    assert provenance.read(art)["synthetic"] is False and provenance.synthetic_warning(art) is None
    assert str(tmp_path) not in (art / provenance.ARTIFACTS_FILE).read_text()  # no home path in a bundle


def test_train_cnn_records_its_data_and_score_warns_on_stderr(tiny_bundle: Path, shared_data: Path,
                                                              tmp_path: Path, capsys):
    found = provenance.read(tiny_bundle)
    assert found["synthetic"] is True and found["stages"]["cnn"]["marker"]["layout"] == "test crops"
    crop = shared_data / "isic2024-real-crops" / "ISIC_0015670.jpg"
    score([crop], tiny_bundle, tmp_path / "probs.csv", device="cpu", progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    warning = [line for line in err if line.startswith("warning: ")]
    assert warning == [f"warning: the models in {tiny_bundle} (cnn) {provenance.SYNTHETIC_NOTE}"]
    real = tmp_path / "real-bundle"
    shutil.copytree(tiny_bundle, real)
    (tmp_path / "isic2024").mkdir()
    provenance.record(real, tmp_path / "isic2024", ("cnn",))
    score([crop], real, tmp_path / "probs-real.csv", device="cpu", progress=False)
    assert "synthetic" not in capsys.readouterr().err


def test_the_page_and_the_api_say_synthetic(tiny_bundle: Path, shared_data: Path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lesionstack.inference.serve import Analyser, create_app, page_html

    client = TestClient(create_app(Analyser(load_predictor(tiny_bundle, device="cpu"))))
    health = client.get("/healthz").json()["training_data"]
    assert health == {"recorded": True, "synthetic": True, "synthetic_stages": ["cnn"],
                      "note": f"This model {provenance.SYNTHETIC_NOTE}."}
    crop = (shared_data / "isic2024-real-crops" / "ISIC_0015670.jpg").read_bytes()
    body = client.post("/api/predict", files={"image": ("a.jpg", crop, "image/jpeg")}).json()
    assert body["training_data"] == health
    # at 32 px the classifier's last map is 1 x 1: no heatmap, and the page is told why
    assert body["heatmap_image"] is None and body["overlay_image"]
    assert "32 px input" in body["gradcam_note"] and "1 x 1 cell(s)" in body["gradcam_note"]
    assert "128 px" in body["gradcam_note"]
    page = page_html()
    assert 'id="synthetic"' in page and "r.gradcam_note" in page and "Demo model: " in page


def test_gradcam_needs_a_map_of_4_by_4_cells(tiny_bundle: Path):
    models = load_predictor(tiny_bundle, device="cpu").models
    torch.manual_seed(0)
    small, note = gradcam(models, torch.randn(1, 3, 32, 32))
    assert small is None and "1 x 1 cell(s)" in note
    mid, note = gradcam(models, torch.randn(1, 3, 96, 96))  # 3 x 3: still too coarse
    assert mid is None and "3 x 3 cell(s)" in note
    cam, note = gradcam(models, torch.randn(2, 3, 128, 128))  # 4 x 4 cells
    assert note is None and cam.shape == (2, 128, 128)
    assert 0 <= cam.min() and cam.max() <= 1 and (cam.reshape(2, -1).std(axis=1) > 0).all()  # not one wash
