"""train-diagnosis end to end on tiny demo folders (HAM10000 and ISIC 2024 layouts), resume and reuse."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from lesionstack import pipeline
from lesionstack.config import ConfigError
from lesionstack.data.demo_tables import make_tables
from lesionstack.data.diagnosis_layouts import read_diagnosis
from lesionstack.data.synthetic import DemoSpec, write_demo_data, write_ham10000_demo
from lesionstack.files import read_json
from lesionstack.inference.diagnosis import DiagnosisPredictor
from lesionstack.inference.predictor import Predictor, read_image_file
from lesionstack.models import ModelConfig
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.run_config import load_run_config
from lesionstack.train import diagnosis as stage
from lesionstack.train.diagnosis import EpochSampler, class_weights
from lesionstack.train.diagnosis_config import DiagnosisConfig, load_diagnosis_config

REPO = Path(__file__).resolve().parents[1]
TINY = {"n_folds": 2, "epochs": 2, "image_size": 32, "batch_size": 16, "epoch_size": 48, "progress": False,
        "num_workers": 0, "cpu_threads": 1, "device": "cpu", "model": {"classifier": "resnet10t", "gate": "none"}}


@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ham") / "data"
    write_ham10000_demo(root, lesions=42, seed=1)  # every class gets its minimum of 6 lesions
    return root


def test_ham10000_demo_layout_reads_back(ham):
    data = read_diagnosis(ham)
    assert data.layout == "ham10000" and data.group_kind == "lesion"
    assert (data.counts() >= 6).all() and data.table["group"].nunique() < len(data.table)
    assert {p.name for p in ham.iterdir()} == {"HAM10000_metadata.csv", "HAM10000_images_part_1",
                                               "HAM10000_images_part_2", "lesionstack-synthetic.json"}
    assert data.images.read(data.table["isic_id"][0]).shape == (120, 160, 3)


def test_train_oof_rerun_and_config_check(ham, tmp_path):
    cfg = load_diagnosis_config(REPO / "configs" / "diagnosis" / "demo.yaml", **TINY)
    out = tmp_path / "art"
    summary = stage.train_diagnosis(ham, cfg, out)
    art = ArtifactPaths(out)
    oof = pd.read_parquet(art.oof_diagnosis)
    folds = pd.read_csv(art.diagnosis_folds)
    assert sorted(oof["isic_id"]) == sorted(folds["isic_id"])  # every image exactly once
    assert (oof.set_index("isic_id")["fold"] == folds.set_index("isic_id").loc[oof["isic_id"], "fold"].values).all()
    probs = oof[[c for c in oof.columns if c.startswith("prob_")]].to_numpy()
    assert probs.shape[1] == 7 and np.allclose(probs.sum(1), 1.0)
    assert 0 <= summary["balanced_accuracy"] <= 1 and len(summary["confusion_matrix"]) == 7
    assert cfg.keep == "last" and "nothing was picked" in read_json(art.diagnosis_cv)["selection"]
    assert np.array(summary["confusion_matrix"]).sum() == len(oof)
    for k in (0, 1):
        files = art.diagnosis_fold(k)
        assert files.safetensors.is_file() and files.done.is_file() and not files.checkpoint.exists()
    _predictor_matches_the_oof(out, ham, oof)
    again = stage.train_diagnosis(ham, cfg, out)  # all done: nothing retrained, nothing re-scored
    assert again["balanced_accuracy"] == summary["balanced_accuracy"]
    with pytest.raises(ConfigError, match="lr"):
        stage.train_diagnosis(ham, load_diagnosis_config(REPO / "configs/diagnosis/demo.yaml", **{**TINY, "lr": 0.1}),
                              out)


def test_keep_best_says_its_oof_figures_are_optimistic(ham, tmp_path, caplog):
    """keep: best picks each fold's epoch on the fold it scores: allowed, but warned and written in cv.json."""
    cfg = load_diagnosis_config(REPO / "configs" / "diagnosis" / "demo.yaml", **{**TINY, "keep": "best"})
    assert "optimistic" in caplog.text
    stage.train_diagnosis(ham, cfg, tmp_path / "art")
    assert "optimistic" in read_json(ArtifactPaths(tmp_path / "art").diagnosis_cv)["selection"]
    assert load_diagnosis_config(REPO / "configs" / "diagnosis" / "default.yaml").keep == "last"


def _predictor_matches_the_oof(out: Path, ham: Path, oof: pd.DataFrame) -> None:
    """The inference loader: with fold 0's model alone it reproduces fold 0's OOF probabilities."""
    predictor = DiagnosisPredictor.load(out, device="cpu")
    assert predictor.classes == read_diagnosis(ham).classes and len(predictor.models) == 2
    rows = oof[oof["fold"] == 0].head(6)
    images = read_diagnosis(ham).images
    crops = [images.read(i, min_side=predictor.image_size) for i in rows["isic_id"]]  # as the training loader
    both = predictor.predict_proba(crops)
    assert both.shape == (6, 7) and np.allclose(both.sum(1), 1)
    predictor.models = predictor.models[:1]
    expected = rows[[c for c in rows.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(predictor.predict_proba(crops), expected, atol=1e-5)
    table = predictor.predict_table(crops, list(rows["isic_id"]))
    assert list(table["predicted"]) == [predictor.classes[k] for k in expected.argmax(1)]
    _bundle_predictor_gives_class_probabilities(out, ham, rows)


def _bundle_predictor_gives_class_probabilities(out: Path, ham: Path, rows: pd.DataFrame) -> None:
    """`score` and `serve` go through the bundle's Predictor: with a diagnosis stage it has the classes, and
    score_files gives one prob_<class> column each, equal to the diagnosis predictor's on the same files."""
    bundle, alone = Predictor.load(out, device="cpu", progress=False), DiagnosisPredictor.load(out, device="cpu")
    assert bundle.has_diagnosis and bundle.diagnosis_classes == alone.classes
    files = sorted(ham.rglob("*.jpg"))[:4] + [ham / "missing.jpg"]
    table = bundle.score_files(files)
    assert list(table.columns) == ["path", "probability", *[f"prob_{c}" for c in alone.classes], "error"]
    assert table["error"].iloc[-1] and table.iloc[-1, 2:-1].isna().all()  # the unreadable file: a row, no crash
    crops = [read_image_file(f, alone.image_size) for f in files[:4]]
    assert np.allclose(table.iloc[:4, 2:-1].to_numpy(dtype=float), alone.predict_proba(crops), atol=1e-6)
    assert table["probability"].isna().all()  # no malignancy CNN in a diagnosis-only bundle


def test_score_and_serve_feed_each_model_its_own_input_size(ham, tiny_bundle, tmp_path):
    """A bundle with a 32-px CNN and a 48-px diagnosis model: `score` and `serve` decode each model's input
    at its own training size, as its training crops were, not the diagnosis model from the CNN's 32-px input."""
    import shutil

    from lesionstack.inference.serve import Analyser
    from lesionstack.inference.upload import decode_upload

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    stage.train_diagnosis(ham, DiagnosisConfig(**{**TINY, "image_size": 48,
                                                  "model": ModelConfig(classifier="resnet10t", gate="none")}), out)
    bundle, alone = Predictor.load(out, device="cpu", progress=False), DiagnosisPredictor.load(out, device="cpu")
    assert (bundle.input_size, alone.image_size) == (32, 48)
    files = sorted(ham.rglob("*.jpg"))[:4]
    own = alone.predict_proba([read_image_file(f, 48) for f in files])
    via_cnn_input = alone.predict_proba([read_image_file(f, 32) for f in files])  # what they were fed before
    assert np.abs(own - via_cnn_input).max() > 1e-4  # far above the 1e-6 below: the test tells the two apart
    table = bundle.score_files(files)
    assert np.allclose(table[[f"prob_{c}" for c in alone.classes]].to_numpy(dtype=float), own, atol=1e-6)
    cnn = bundle.score_crops([read_image_file(f, 32) for f in files])  # the CNN keeps its own 32-px input
    assert np.allclose(table["probability"].to_numpy(), cnn, atol=1e-6)
    answer = Analyser(bundle).analyse(decode_upload(files[0].read_bytes()), {})  # serve: the same file uploaded
    served = {d["name"]: d["probability"] for d in answer["diagnosis"]}
    assert np.allclose([served[c] for c in alone.classes], own[0], atol=1e-6)
    assert np.isclose(answer["probability"], cnn[0], atol=1e-6)


def test_a_killed_fold_resumes_from_its_checkpoint(ham, tmp_path, monkeypatch, caplog):
    cfg = DiagnosisConfig(**{**TINY, "model": ModelConfig(classifier="resnet10t", gate="none")})
    keep = stage._keep

    def crash_in_epoch_2(state, row, *args, **kwargs):
        if row["epoch"] == 2:
            raise KeyboardInterrupt("killed")
        keep(state, row, *args, **kwargs)

    monkeypatch.setattr(stage, "_keep", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        stage.train_diagnosis(ham, cfg, tmp_path, folds_only=[0])
    files = ArtifactPaths(tmp_path).diagnosis_fold(0)
    assert files.checkpoint.is_file() and not files.done.exists()
    monkeypatch.setattr(stage, "_keep", keep)
    with caplog.at_level("INFO"):
        metrics = stage.train_diagnosis(ham, cfg, tmp_path, folds_only=[0])["folds"][0]
    assert "resuming after epoch 1" in caplog.text
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2] and files.done.is_file()


def test_isic2024_layout_with_diagnosis_cues(tmp_path):
    spec = DemoSpec(patients=24, lesions_per_patient=12, seed=4, positive_rate=0.3, mask_count=0,
                    diagnosis_cues=True)
    write_demo_data(tmp_path / "data", spec, workers=1)
    run_cfg = load_run_config(REPO / "configs" / "run" / "demo.yaml")  # as `lesionstack run` would
    assert run_cfg.diagnosis_stage is False and run_cfg.diagnosis.labels.classes[1] == "melanoma"
    assert "skipped" in str(pipeline._diagnosis(run_cfg, DataPaths(tmp_path / "data"), ArtifactPaths(tmp_path / "art")))
    run_cfg.diagnosis_stage = True
    run_cfg.diagnosis = load_diagnosis_config(REPO / "configs/diagnosis/demo.yaml", **{**TINY, "epochs": 1})
    line = pipeline._diagnosis(run_cfg, DataPaths(tmp_path / "data"), ArtifactPaths(tmp_path / "art"))
    assert line.startswith("OOF balanced accuracy")
    summary = read_json(ArtifactPaths(tmp_path / "art").diagnosis_cv)
    assert summary["classes"] == ["benign", "melanoma", "basal cell carcinoma", "squamous cell carcinoma"]
    assert summary["group_kind"] == "patient" and summary["n"] > 0


def test_diagnosis_cues_change_only_the_malignant_crops(tmp_path):
    base = DemoSpec(patients=6, lesions_per_patient=10, seed=2, positive_rate=0.3, mask_count=0)
    write_demo_data(tmp_path / "plain", base, workers=1)
    write_demo_data(tmp_path / "cues", DemoSpec(**{**base.__dict__, "diagnosis_cues": True}), workers=1)
    for name in ("train-metadata.csv", "test-metadata.csv"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "cues" / name).read_bytes()
    train = make_tables(base).train
    plain, cues = tmp_path / "plain" / "train-image.hdf5", tmp_path / "cues" / "train-image.hdf5"
    with h5py.File(plain) as a, h5py.File(cues) as b:
        same = np.array([a[i][()] == b[i][()] for i in train["isic_id"]])
    assert (same == (train["iddx_1"] != "Malignant").to_numpy()).all()  # each malignant crop shows its cue


def test_sampler_and_class_weights():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = EpochSampler(labels, balanced=True, seed=0, size=3000)
    drawn = np.bincount(labels[list(s)], minlength=3) / 3000
    assert np.allclose(drawn, 1 / 3, atol=0.04) and list(s) == list(s)  # balanced, and the same each time
    plain = EpochSampler(labels, balanced=False, seed=0)
    assert sorted(plain) == list(range(100))
    w = class_weights(labels, 3)
    assert np.allclose((w.numpy() * np.bincount(labels)), 100 / 3)  # each class the same total weight


def test_gated_k_class_model_and_segmenter_option(tmp_path):
    import torch

    from lesionstack.models import ModelConfig, build_model

    model = build_model(ModelConfig(classifier="test_resnet", segmenter_encoder="test_resnet", gate="train"),
                        num_classes=4)
    logits, mask = model.forward_with_mask(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4) and mask is not None and mask.shape == (2, 1, 32, 32)
    with pytest.raises(ConfigError, match="model.gate is 'none'"):
        load_diagnosis_config(REPO / "configs/diagnosis/demo.yaml", segmenter=tmp_path / "model.pt")


def test_cli_writes_a_ham10000_demo_folder(tmp_path):
    from typer.testing import CliRunner

    from lesionstack.cli import app

    result = CliRunner().invoke(app, ["demo-data", str(tmp_path / "ham"), "--ham10000", "42", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "HAM10000 layout" in result.output and "best possible balanced accuracy 1.0" in result.output
    assert read_diagnosis(tmp_path / "ham").layout == "ham10000"
