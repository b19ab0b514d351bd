"""End to end: `lesionstack run` on a tiny demo data set, a resumed run after a crash, `predict` on the
real public test set, and the Kaggle kernel run offline on a fake /kaggle/input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import TINY_RUN
from lesionstack import provenance
from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.paths import ArtifactPaths
from lesionstack.pipeline import format_summary, run
from lesionstack.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_demo_data(root, DemoSpec(patients=16, lesions_per_patient=10, seed=3, positive_rate=0.1,
                                   mask_count=24))
    return root


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN))
    return path


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_config, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "artifacts"
    summary = run(tiny_data, out, load_run_config(tiny_config))
    return out, summary


def test_run_writes_every_artifact(trained):
    out, summary = trained
    art = ArtifactPaths(out)
    for path in (art.folds, art.oof_cnn, art.oof_stack, art.cv_json, art.submission, art.report_html,
                 art.run_config, art.segmenter.weights):
        assert path.is_file(), path
    assert set(summary["pauc"]) >= {"cnn", "tabular", "blend"}
    assert 0.0 <= summary["best_possible_pauc"] <= 0.2
    text = format_summary(summary)
    assert "stacked blend" in text and "best possible" in text and str(art.submission) in text
    sub = pd.read_csv(art.submission)
    assert list(sub.columns) == ["isic_id", "target"] and sub["target"].between(0, 1).all()
    # demo-data marked the folder and its masks/; the run recorded every stage as synthetic
    found = provenance.read(out)
    assert found["synthetic"] is True and sorted(found["stages"]) == ["cnn", "folds", "segmenter", "stack"]
    assert found["stages"]["segmenter"]["data"] == "masks"
    assert found["stages"]["cnn"]["marker"]["layout"] == "ISIC 2024 competition"


def test_submission_covers_the_test_set(trained, tiny_data):
    out, _ = trained
    sub = pd.read_csv(ArtifactPaths(out).submission)
    test_ids = pd.read_csv(tiny_data / "test-metadata.csv")["isic_id"]
    assert sub["isic_id"].tolist() == test_ids.tolist()


def test_killed_run_resumes_without_redoing_finished_work(tiny_data, tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "artifacts"
    cfg = load_run_config(tiny_config)
    import lesionstack.tabular.stack as stack

    real_train_stack = stack.train_stack

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during the stacker")

    monkeypatch.setattr(stack, "train_stack", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_data, out, cfg)
    art = ArtifactPaths(out)
    assert art.oof_cnn.is_file() and not art.cv_json.exists() and not art.submission.exists()
    stamps = {p: p.stat().st_mtime_ns for p in (art.folds, art.segmenter.weights, art.cnn_fold(0).safetensors,
                                                art.cnn_fold(1).safetensors, art.oof_cnn)}
    monkeypatch.setattr(stack, "train_stack", real_train_stack)
    run(tiny_data, out, load_run_config(tiny_config))
    assert art.submission.is_file() and art.cv_json.is_file()
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was redone"


@pytest.mark.parametrize(("change", "message"), [
    ({"folds": {"n_folds": 2, "seed": 1}}, "exists with different folds"),
    ({"stack": dict(TINY_RUN["stack"], n_rounds=21)}, "different config .*n_rounds"),
])
def test_run_refuses_to_mix_work_of_another_config(trained, tiny_data, tmp_path, change, message):
    out, _ = trained
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(dict(TINY_RUN, **change)))
    with pytest.raises(ValueError, match=message):
        run(tiny_data, out, load_run_config(path))


def test_predict_from_artifacts_matches_the_runs_submission(trained, tiny_data, tmp_path, capsys):
    """`run` scores the test set while training; `predict` (and the kernel) rescore it from the saved
    artifacts. Both paths must give the same submission."""
    from lesionstack.inference.submit import predict

    out, _ = trained
    path = tmp_path / "submission.csv"
    predict(tiny_data, out, path)
    assert f"warning: the models in {out} (cnn, folds, segmenter, stack) learnt from synthetic data" in \
        capsys.readouterr().err
    again, during_run = pd.read_csv(path), pd.read_csv(ArtifactPaths(out).submission)
    assert again["isic_id"].tolist() == during_run["isic_id"].tolist()
    assert np.allclose(again["target"], during_run["target"], atol=1e-5)


def test_every_predicting_path_pairs_stack_fold_k_with_cnn_fold_k(trained, tiny_data):
    """The run's predict stage and `Predictor.predict_table` (used by `predict` and the Kaggle kernel) both
    score the test rows with stack fold k on CNN fold k's test features, not on the mean of the CNN folds."""
    from lesionstack.data.metadata import read_metadata
    from lesionstack.inference.predictor import Predictor
    from lesionstack.tabular.pairing import PairingError
    from lesionstack.tabular.stack_predict import predict_stack

    out, _ = trained
    art = ArtifactPaths(out)
    test, fold_cnn = pd.read_parquet(art.features_test), pd.read_parquet(art.features_test_folds)
    run_scores = pd.read_parquet(art.test_stack)
    paired = predict_stack(test, art, fold_cnn=fold_cnn)
    mean = predict_stack(test, art, pairing="mean")
    np.testing.assert_allclose(run_scores["score"], paired["score"], rtol=0, atol=1e-12)
    cnn = pd.read_parquet(art.test_cnn)
    assert np.abs(cnn["score_fold_0"] - cnn["score_fold_1"]).max() > 1e-3  # the two CNN folds differ ...
    assert np.abs(mean["score"] - paired["score"]).max() > 1e-3  # ... so pairing changes the prediction
    p = Predictor.load(out, device="cpu", progress=False)
    meta = read_metadata(tiny_data / "test-metadata.csv", kind="test")
    scores = p.score_hdf5(tiny_data / "test-image.hdf5", meta["isic_id"], per_fold=True)
    table = p.predict_table(meta, scores)
    np.testing.assert_allclose(table["score"], paired["score"], rtol=0, atol=1e-5)
    with pytest.raises(PairingError, match="no per-fold CNN scores"):
        p.predict_table(meta, scores[["isic_id", "score"]])
    # the measured comparison: written by the predict stage, shown in the report
    shift = json.loads(art.score_shift.read_text())
    assert set(shift["features"]) == {c for c in test.columns if c.startswith("cnn_")}
    assert shift["features"]["cnn_score"]["test_paired"]["n"] == 2 * len(test)
    assert "Do test scores look like training scores?" in art.report_html.read_text()



def test_package_refuses_a_stack_whose_folds_are_not_the_cnns(trained, tmp_path):
    from lesionstack.inference.package import package
    from lesionstack.tabular.pairing import PairingError

    out, _ = trained
    other = tmp_path / "other"
    shutil.copytree(out, other)
    record = ArtifactPaths(other).cnn_fold(1).inputs
    record.write_text(json.dumps(dict(json.loads(record.read_text()), folds="0" * 64)))
    with pytest.raises(PairingError, match="different fold files"):
        package(other, tmp_path / "bundle", ship=())
    assert not (tmp_path / "bundle").exists()


def test_predict_on_the_real_public_test_set(trained, public_test_dir, tmp_path):
    from lesionstack.inference.submit import predict

    out, _ = trained
    path = tmp_path / "submission.csv"
    predict(public_test_dir, out, path)
    sub = pd.read_csv(path)
    assert sub["isic_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert sub["target"].between(0, 1).all()


def corrupt_crop(images: Path, isic_id: str) -> None:
    """Replace one crop's bytes by a truncated JPEG header (decoding it fails)."""
    with h5py.File(images, "r+") as h5:
        del h5[isic_id]
        h5[isic_id] = np.bytes_(b"\xff\xd8\xff\xe0 truncated")


def test_predict_with_a_corrupt_test_crop_scores_its_row_tabular_only(trained, public_test_dir, tmp_path, capsys,
                                                                      caplog):
    from lesionstack.data.metadata import read_metadata
    from lesionstack.inference.submit import predict, validate_submission
    from lesionstack.tabular.features import build_features
    from lesionstack.tabular.stack_predict import predict_stack

    out, _ = trained
    data = tmp_path / "test"
    shutil.copytree(public_test_dir, data)
    corrupt_crop(data / "test-image.hdf5", "ISIC_0015729")
    with caplog.at_level("WARNING"):
        predict(data, out, tmp_path / "submission.csv", progress=False)
    assert "ISIC_0015729" in caplog.text
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "predict: 3 test rows, 2 CNN-scored with 2 fold models" in summary
    assert "1 unreadable crop(s) scored tabular-only" in summary
    sub = pd.read_csv(tmp_path / "submission.csv")
    meta = read_metadata(data / "test-metadata.csv", kind="test")
    validate_submission(sub, meta["isic_id"].tolist())
    # the tabular-only models never see CNN features: whatever fills the missing score, they score the same
    features = build_features(meta, pd.DataFrame({"isic_id": meta["isic_id"], "score": 0.5}))
    tabular = predict_stack(features, ArtifactPaths(out), variant="tabular").set_index("isic_id")["score"]
    assert sub.set_index("isic_id")["target"]["ISIC_0015729"] == pytest.approx(tabular["ISIC_0015729"], abs=1e-7)


def test_kaggle_kernel_runs_offline_on_a_fake_kaggle_input(trained, public_test_dir, tmp_path):
    from lesionstack.inference.package import package

    out, _ = trained
    kaggle_input = tmp_path / "kaggle" / "input"
    dataset = package(out, kaggle_input / "lesionstack-model", ship=())
    meta = (dataset / "dataset-metadata.json").read_text()
    assert '"id": "your-kaggle-username/lesionstack-model"' in meta
    assert list((dataset / "wheels").glob("lesionstack-*.whl"))
    shutil.copytree(public_test_dir, kaggle_input / "isic-2024-challenge")
    corrupt_crop(kaggle_input / "isic-2024-challenge" / "test-image.hdf5", "ISIC_0015740")  # still a submission
    working = tmp_path / "kaggle" / "working"
    working.mkdir()
    env = dict(os.environ, LESIONSTACK_INPUT_ROOT=str(kaggle_input), LESIONSTACK_OUTPUT=str(working),
               HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(REPO / "kaggle" / "kernel.py")], env=env, cwd=working,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # the kernel imported lesionstack from the packaged wheel, not from this checkout
    assert f"from {working / 'lesionstack-site' / 'lesionstack'}" in result.stdout
    assert "1 unreadable crop(s) scored tabular-only, stack fold k on CNN fold k's scores" in result.stdout
    sub = pd.read_csv(working / "submission.csv")
    assert sub["isic_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    # the bundle carries the run's provenance, and the kernel's log says the models learnt from synthetic data
    assert provenance.read(dataset / "artifacts") == provenance.read(out)
    assert "learnt from synthetic data" in result.stderr
    assert sub["target"].between(0, 1).all()


def test_the_bundle_holds_no_pickle_and_converts_old_cnn_weights(trained, public_test_dir, tmp_path):
    """Fold CNNs are safetensors; a fold kept as `model.pt` by an older release is still scored, and the
    Kaggle bundle gets it as safetensors (same scores), so nothing in the bundle is a pickle."""
    from lesionstack.inference.package import package
    from lesionstack.inference.predictor import Predictor
    from lesionstack.runtime import load_weights
    from lesionstack.tabular.gbdt import find_pickles

    out, _ = trained
    old = tmp_path / "old"
    shutil.copytree(out, old)
    fold0 = ArtifactPaths(old).cnn_fold(0)
    torch.save(load_weights(fold0.safetensors), fold0.weights)  # what releases before safetensors kept
    fold0.safetensors.unlink()
    images = public_test_dir / "test-image.hdf5"
    expected = Predictor.load(out, device="cpu", progress=False).score_hdf5(images)
    legacy = Predictor.load(old, device="cpu", progress=False).score_hdf5(images)
    np.testing.assert_allclose(legacy["score"], expected["score"], rtol=0, atol=1e-7)
    bundle = package(old, tmp_path / "bundle", ship=())
    assert find_pickles(bundle) == []
    packed = ArtifactPaths(bundle / "artifacts").cnn_fold(0)
    assert packed.safetensors.is_file() and not packed.weights.exists()
    shipped = Predictor.load(bundle / "artifacts", device="cpu", progress=False).score_hdf5(images)
    np.testing.assert_allclose(shipped["score"], expected["score"], rtol=0, atol=1e-7)


def test_a_moved_artifacts_folder_resumes_and_predicts(trained, tiny_data, tiny_config, tmp_path):
    """Copy a finished run elsewhere, hide the original, rerun: nothing retrains, and predict works."""
    out, _ = trained
    moved = tmp_path / "elsewhere" / "artifacts"
    shutil.copytree(out, moved)
    weights = {p: p.stat().st_mtime_ns for p in moved.rglob("*") if p.suffix in (".pt", ".safetensors", ".txt", ".cbm")
               or p.name == "DONE"}
    cfg = load_run_config(tiny_config)
    cfg.report = False  # the report is redrawn on every run; the other stages must reuse their work
    hidden = out.with_name(out.name + ".hidden")
    out.rename(hidden)  # the copy must not lean on the original (e.g. an absolute segmenter path)
    try:
        run(tiny_data, moved, cfg)
    finally:
        hidden.rename(out)
    assert {p: p.stat().st_mtime_ns for p in weights} == weights, "a stage retrained in the moved folder"
    assert os.path.relpath(ArtifactPaths(moved).submission, moved) == \
        json.loads((moved / "run.json").read_text())["submission"]
    result = subprocess.run([sys.executable, "-m", "lesionstack.cli", "predict", str(tiny_data), "--artifacts",
                             str(moved), "--out", str(tmp_path / "sub.csv")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    again, before = pd.read_csv(tmp_path / "sub.csv"), pd.read_csv(ArtifactPaths(out).submission)
    assert np.allclose(again["target"], before["target"], atol=1e-5)


def test_predict_names_test_columns_that_moved_the_scores(trained, tiny_data, tmp_path, capsys):
    """Unseen categories and all-missing columns are counted in predict's summary, by column and rows."""
    from lesionstack.inference.submit import predict

    out, _ = trained
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    test = pd.read_csv(data / "test-metadata.csv")
    test.loc[:1, "anatom_site_general"] = "tail"
    test["age_approx"] = np.nan
    test.to_csv(data / "test-metadata.csv", index=False)
    scores = predict(data, out, tmp_path / "submission.csv", progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert "2 input warning(s) above" in lines[-1]
    assert any("'anatom_site_general': 2 row(s) hold categories never seen in training (e.g. ['tail'])" in line
               for line in lines)
    assert any(f"'age_approx' is missing in all {len(test)} rows" in line for line in lines)
    assert len(scores.attrs["input_warnings"]) == 2


def test_segmenter_hand_off_is_a_pure_function(tmp_path):
    """The trained segmenter becomes a NEW CNN config (weights and decoder widths); the run config is
    left as it was, and a skipped segmenter leaves the CNN config unchanged."""
    from lesionstack.pipeline import Skipped, cnn_config_with
    from lesionstack.train.segmenter import SegmenterResult

    cfg = load_run_config(None)
    seg = SegmenterResult(tmp_path / "segmenter" / "model.pt", "resnet18", (32, 16, 16, 8, 8), 0.9, 0.8, 3, 4,
                          10, 2, 1.0)
    new = cnn_config_with(cfg.cnn, seg)
    assert new.model.segmenter_weights == str((tmp_path / "segmenter" / "model.pt").resolve())
    assert new.model.segmenter_decoder_channels == (32, 16, 16, 8, 8)
    assert cfg.cnn.model.segmenter_weights is None and cfg.cnn.model.segmenter_decoder_channels is None
    assert cnn_config_with(cfg.cnn, Skipped("no masks")) is cfg.cnn


def test_a_failing_run_leaves_a_finished_folder_as_it_was(trained, tiny_data, tiny_config, tmp_path, capsys):
    """A corrupt training crop in the data, the run pointed at a finished folder: it stops (the CNN folds were
    made from other crops) and every file there, source.json and config.yaml included, is as it was."""
    from lesionstack.cli import main

    out = tmp_path / "artifacts"
    shutil.copytree(trained[0], out)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    corrupt_crop(data / "train-image.hdf5", pd.read_csv(data / "train-metadata.csv")["isic_id"].iloc[5])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit) as stopped:
        main(["run", str(data), "-a", str(out), "--config", str(tiny_config)])
    assert stopped.value.code == 3 and "train_images changed" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lesionstack.lock"}
    assert after == {p: b for p, b in before.items() if p.name != ".lesionstack.lock"}
