"""Every command checks what it will need before its first stage: each missing or mismatched piece is one
line naming the file, a non-zero exit within seconds, and nothing written (the artifacts root not even made)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from lesionstack.cli import main
from lesionstack.data.synthetic import DemoSpec, write_demo_data

TINY = {"folds": {"n_folds": 2},
        "cnn": {"model": {"classifier": "test_resnet", "segmenter_encoder": "test_resnet", "gate": "train"},
                "image_size": 32, "epochs": 1, "num_workers": 0, "progress": False},
        "segmenter": {"encoder": "test_resnet", "image_size": 32, "epochs": 1},
        "stack": {"seeds": [0], "n_rounds": 5}, "report": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preflight") / "data"
    write_demo_data(root, DemoSpec(patients=8, lesions_per_patient=6, seed=1, positive_rate=0.2, mask_count=6))
    return root


def copy_without(demo: Path, tmp_path: Path, *missing: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    for name in missing:
        target = data / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return data


def config(tmp_path: Path, **cnn: object) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["cnn"].update(cnn)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def refused(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, float]:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return int(stopped.value.code), err[-2] if len(err) >= 2 else "\n".join(err), time.perf_counter() - start


@pytest.mark.parametrize(("missing", "command", "code", "named"), [
    ("test-image.hdf5", "run", 20, "test-image.hdf5: test images (HDF5) not found"),
    ("test-image.hdf5", "train-cnn", 20, "test-image.hdf5: test images (HDF5) not found"),
    ("test-image.hdf5", "features", 20, "test-image.hdf5: test images (HDF5) not found"),
    ("test-metadata.csv", "run", 20, "test-metadata.csv: test metadata not found"),
    ("train-image.hdf5", "run", 20, "train-image.hdf5: train images (HDF5) not found"),
    ("train-metadata.csv", "run", 20, "train-metadata.csv: train metadata not found"),
    ("train-metadata.csv", "folds", 20, "train-metadata.csv: train metadata not found"),
])
def test_a_missing_data_file_is_refused_before_anything_is_written(demo: Path, tmp_path: Path, capsys, missing: str,
                                                                   command: str, code: int, named: str) -> None:
    data, art = copy_without(demo, tmp_path, missing), tmp_path / "art"
    extra = ["--config", config(tmp_path)] if command == "run" else []
    if command == "train-cnn":
        extra = ["--folds", tmp_path / "folds.csv"]
        pd.DataFrame({"isic_id": ["x"], "patient_id": ["p"], "target": [0], "fold": [0]}).to_csv(extra[1])
    got, line, seconds = refused(capsys, command, data, "-a", art, *extra)
    assert got == code and named in line and str(data) in line, line
    assert not art.exists()
    assert seconds < 30  # imports included, on a shared 2-core machine


def test_ids_that_disagree_between_metadata_and_hdf5_are_refused(demo: Path, tmp_path: Path, capsys) -> None:
    data = copy_without(demo, tmp_path)
    with h5py.File(data / "test-image.hdf5", "a") as h5:
        gone = sorted(h5.keys())[0]
        del h5[gone]
    code, line, _ = refused(capsys, "run", data, "-a", tmp_path / "art", "--config", config(tmp_path))
    assert code == 4 and gone in line and "test-image.hdf5" in line
    assert not (tmp_path / "art").exists()


def test_masks_weights_and_fold_file_are_checked_up_front(demo: Path, tmp_path: Path, capsys) -> None:
    art = tmp_path / "art"
    data = copy_without(demo, tmp_path, "masks")
    code, line, _ = refused(capsys, "run", data, "-a", art, "--config", config(tmp_path, untrained_segmenter="refuse"))
    assert code == 3 and "masks" in line and not art.exists()
    (data / "masks").mkdir()
    code, line, _ = refused(capsys, "run", data, "-a", art, "--config", config(tmp_path))
    assert code == 12 and "masks" in line and not art.exists()  # a masks folder with no pairs
    weights = {"classifier": "test_resnet", "gate": "none", "classifier_weights": "nowhere.safetensors"}
    code, line, _ = refused(capsys, "run", demo, "-a", art, "--config", config(tmp_path, model=weights))
    assert code == 3 and "nowhere.safetensors" in line and not art.exists()
    other = tmp_path / "other-folds.csv"
    pd.DataFrame({"isic_id": ["ISIC_0"], "patient_id": ["IP_0"], "target": [0], "fold": [0]}).to_csv(other,
                                                                                                   index=False)
    code, line, _ = refused(capsys, "train-cnn", demo, "-a", art, "--folds", other)
    assert code == 6 and "other-folds.csv" in line and not art.exists()


def test_an_artifacts_root_that_cannot_be_made_is_refused(demo: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, line, _ = refused(capsys, "run", demo, "-a", blocker / "art", "--config", config(tmp_path))
    assert code == 20 and str(blocker) in line


def test_a_refused_run_leaves_a_finished_folder_as_it_was(demo: Path, tmp_path: Path, capsys) -> None:
    art = tmp_path / "art"
    art.mkdir()
    before = {"source.json": '{"data_dir": "/the/first/data"}', "config.yaml": "report: true\n", "run.json": "{}"}
    for name, text in before.items():
        (art / name).write_text(text)
    data = copy_without(demo, tmp_path, "test-image.hdf5")
    refused(capsys, "run", data, "-a", art, "--config", config(tmp_path))
    assert {p.name: p.read_text() for p in art.iterdir()} == before


def test_run_prints_its_plan(demo: Path, tmp_path: Path) -> None:
    from lesionstack.folds import make_folds_file
    from lesionstack.paths import ArtifactPaths, DataPaths
    from lesionstack.preflight import check_run
    from lesionstack.run_config import load_run_config

    art = ArtifactPaths(tmp_path / "art")
    plan = {s.stage: s.action for s in check_run(DataPaths(demo), art, load_run_config(config(tmp_path)))}
    assert plan == {"folds": "run", "segmenter": "run", "cnn": "run", "features": "run", "tune": "skip",
                    "stack": "run", "predict": "run", "diagnosis": "skip", "report": "skip"}
    make_folds_file(demo, art.folds, n_folds=2, seed=0, method="greedy")
    plan = {s.stage: s.action for s in check_run(DataPaths(demo), art, load_run_config(config(tmp_path)))}
    assert plan["folds"] == "reuse" and plan["cnn"] == "run"


@pytest.mark.parametrize(("argv", "code", "named"), [
    (["score", "{tmp}/nowhere.jpg", "-a", "{art}"], 20, "nowhere.jpg: no such file or folder"),
    (["serve", "-a", "{tmp}"], 20, "no trained model"),
    (["serve", "-a", "{data}"], 20, "a data folder, not an artifacts folder"),
    (["predict", "{tmp}/nowhere", "-a", "{art}"], 20, "nowhere: data folder not found"),
    (["folds", "{tmp}/nowhere", "-a", "{tmp}/art"], 20, "nowhere: data folder not found"),
    (["predict", "{data}", "-a", "{tmp}"], 20, "no trained stacker"),
])
def test_wrong_paths_are_one_line_before_any_model_loads(demo: Path, tmp_path: Path, capsys, argv: list[str],
                                                        code: int, named: str) -> None:
    art = tmp_path / "trained"
    (art / "cnn" / "fold_0").mkdir(parents=True)
    (art / "cnn" / "fold_0" / "DONE").write_text("")
    args = [a.format(tmp=tmp_path, art=art, data=demo) for a in argv]
    got, line, _ = refused(capsys, *args)
    assert got == code and named in line, line
    assert not (tmp_path / "art").exists()
