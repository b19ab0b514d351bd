"""The Kaggle training notebook (`kaggle/train.py`) offline on a fake /kaggle/input: the tests' tiny demo data
as the competition, a weights dataset, the demo masks as the ISIC 2018 dataset, this checkout as the source
dataset. A session killed hard after the first CNN fold, resumed by the next session from its output
(attached as an input, as Kaggle does), ends with the same artifacts and bundle as an uninterrupted session.

Two interpreters: the Kaggle-image venv of `make kaggle-check` (KAGGLE_PYTHON; marker `kaggle`), and this
venv (marker `slow`). The notebook imports lesionstack from the source dataset in both, never from this venv.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import TINY_RUN
from lesionstack import provenance
from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.inference.package import Target, download_wheels, read_image, shipped_requirements
from lesionstack.paths import ArtifactPaths

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", ".kaggle-venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "demo",
              "artifacts")


def interpreter(kind: str) -> Path:
    if kind == "main":
        return Path(sys.executable)
    path = os.environ.get("KAGGLE_PYTHON")
    if not path or not Path(path).is_file():
        pytest.skip("KAGGLE_PYTHON must name the Kaggle-image venv's python (run `make kaggle-check`)")
    return Path(path)


@pytest.fixture(scope="module")
def kaggle_input(tmp_path_factory) -> Path:
    """A fake /kaggle/input with the notebook's four inputs."""
    import safetensors.torch

    from lesionstack._compat import ensure_timm_importable

    ensure_timm_importable()  # timm beside this venv's CPU-only torch
    import timm

    root = tmp_path_factory.mktemp("kaggle") / "input"
    competition = root / "isic-2024-challenge"
    write_demo_data(competition, DemoSpec(patients=16, lesions_per_patient=10, seed=3, positive_rate=0.1,
                                          mask_count=24))
    shutil.move(competition / "masks", root / "isic2018-task1")  # the masks come as their own dataset
    (root / "lesionstack-weights").mkdir()
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(),
                                root / "lesionstack-weights" / "test_resnet.safetensors")
    shutil.copytree(REPO, root / "lesionstack-source", ignore=shutil.ignore_patterns(*NOT_SOURCE))
    for py in ("3.11", "3.12"):  # simplejpeg for this machine's Pythons, as the docs have it downloaded
        download_wheels(shipped_requirements(read_image()), root / "lesionstack-source" / "wheels", Target(python=py))
    tiny = {**TINY_RUN, "report": False}
    (root / "lesionstack-source" / "configs" / "run" / "tiny-test.yaml").write_text(yaml.safe_dump(tiny))
    return root


def session(python: Path, kaggle_input: Path, working: Path, *, stop_when: Path | None = None,
            budget_h: float | None = None) -> subprocess.CompletedProcess | None:
    """One notebook session writing to `working`. `stop_when`: kill it and everything it started with
    SIGKILL as soon as that file exists (Kaggle's hard stop), and return None."""
    working.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(LESIONSTACK_INPUT_ROOT=str(kaggle_input), LESIONSTACK_OUTPUT=str(working), PYTHONNOUSERSITE="1",
               LESIONSTACK_RUN_CONFIG="configs/run/tiny-test.yaml", LESIONSTACK_DATASET_ID="me/tiny-model",
               HF_HUB_OFFLINE="1", PIP_NO_INDEX="1")
    if budget_h is not None:
        env["LESIONSTACK_TIME_BUDGET_H"] = str(budget_h)
    cmd = [str(python), str(REPO / "kaggle" / "train.py")]
    if stop_when is None:
        return subprocess.run(cmd, env=env, cwd=working, capture_output=True, text=True, timeout=1200)
    with (working.parent / f"{working.name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=working, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1200
        while not stop_when.exists():
            assert proc.poll() is None, f"the session ended before {stop_when} appeared"
            assert time.monotonic() < deadline, f"no {stop_when} after 20 min"
            time.sleep(0.2)
        for pid in [proc.pid, *descendants(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    return None


def descendants(pid: int) -> list[int]:
    """Every process started by `pid`, children first (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [q for c in map(int, children) for q in (c, *descendants(c))]


def _attach(previous: Path, kaggle_input: Path) -> None:
    """The previous version's output as this notebook's input (Kaggle mounts it read-only, by the kernel's slug)."""
    target = kaggle_input / "lesionstack-train"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(previous, target)


@pytest.mark.parametrize("kind", [pytest.param("kaggle", marks=[pytest.mark.kaggle, pytest.mark.slow]),
                                  pytest.param("main", marks=pytest.mark.slow)])
def test_a_killed_session_resumes_to_the_same_artifacts(kind, kaggle_input, tmp_path):
    python = interpreter(kind)
    straight = session(python, kaggle_input, tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    assert "finished:" in straight.stdout and "previous output: none attached" in straight.stdout

    first = tmp_path / "first"
    session(python, kaggle_input, first, stop_when=first / "artifacts" / "cnn" / "fold_0" / "DONE")
    killed = ArtifactPaths(first / "artifacts")
    assert killed.cnn_fold(0).done.is_file() and not killed.cv_json.exists()
    fold0 = killed.cnn_fold(0).safetensors.read_bytes()

    _attach(first, kaggle_input)
    try:
        second = session(python, kaggle_input, tmp_path / "second")
    finally:
        shutil.rmtree(kaggle_input / "lesionstack-train")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout and "finished:" in second.stdout
    resumed, full = ArtifactPaths(tmp_path / "second" / "artifacts"), ArtifactPaths(tmp_path / "straight" / "artifacts")
    assert resumed.cnn_fold(0).safetensors.read_bytes() == fold0  # the finished fold was not trained again
    for name in ("oof_cnn", "test_cnn", "oof_stack"):
        a, b = pd.read_parquet(getattr(resumed, name)), pd.read_parquet(getattr(full, name))
        assert a.columns.tolist() == b.columns.tolist() and a["isic_id"].tolist() == b["isic_id"].tolist()
        np.testing.assert_allclose(a["score"], b["score"], rtol=0, atol=1e-6, err_msg=name)
    got, want = pd.read_csv(resumed.submission), pd.read_csv(full.submission)
    assert got["isic_id"].tolist() == want["isic_id"].tolist()
    np.testing.assert_allclose(got["target"], want["target"], rtol=0, atol=1e-6)
    cv_a, cv_b = json.loads(resumed.cv_json.read_text()), json.loads(full.cv_json.read_text())
    assert set(cv_a["models"]) == set(cv_b["models"]) and cv_a["blend"] == cv_b["blend"]
    for name, entry in cv_b["models"].items():
        assert cv_a["models"][name]["pauc"] == pytest.approx(entry["pauc"], abs=1e-9), name

    bundle = tmp_path / "second" / "lesionstack-model"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert [w.split("-")[0] for w in manifest["wheels"]] == ["lesionstack"]
    assert json.loads((bundle / "dataset-metadata.json").read_text())["id"] == "me/tiny-model"
    assert provenance.read(bundle / "artifacts")["synthetic"] is True  # the demo data said so, through Kaggle
    config = yaml.safe_load((tmp_path / "second" / "run-config.yaml").read_text())
    assert config["masks_dir"] == str(kaggle_input / "isic2018-task1")
    assert config["cnn"]["model"]["classifier_weights"].endswith("lesionstack-weights/test_resnet.safetensors")
    assert config["segmenter"]["encoder_weights"] == config["cnn"]["model"]["classifier_weights"]


@pytest.mark.parametrize("kind", [pytest.param("kaggle", marks=pytest.mark.kaggle),
                                  pytest.param("main", marks=pytest.mark.slow)])
def test_the_time_budget_stops_the_run_and_the_session_ends_cleanly(kind, kaggle_input, tmp_path):
    result = session(interpreter(kind), kaggle_input, tmp_path / "w", budget_h=2 / 3600)  # 2 s
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "time budget of 0.0 h reached" in result.stdout and "finished:" not in result.stdout
    assert not (tmp_path / "w" / "lesionstack-model").exists()


@pytest.mark.kaggle
def test_the_run_the_notebook_starts_imports_with_the_images_libraries(kaggle_input, tmp_path):
    """After the notebook's own setup (`use_source`: lesionstack from the source dataset, its simplejpeg wheel
    installed offline), every stage `lesionstack run` may reach imports with the image's libraries, optuna's
    tuning included, at the version kaggle/image.yaml records. (The 2-second budget test may stop the run
    before its imports are done.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(LESIONSTACK_INPUT_ROOT=str(kaggle_input), LESIONSTACK_OUTPUT=str(tmp_path), PYTHONNOUSERSITE="1",
               HF_HUB_OFFLINE="1", PIP_NO_INDEX="1")
    code = ("import importlib.util as u, sys; spec = u.spec_from_file_location('kaggle_train', sys.argv[1]); "
            "train = u.module_from_spec(spec); spec.loader.exec_module(train); train.use_source(); "
            "import optuna, lesionstack, lesionstack.pipeline, lesionstack.tabular.tune, lesionstack.cli; "
            "print(optuna.__version__, lesionstack.__file__)")
    result = subprocess.run([str(interpreter("kaggle")), "-c", code, str(REPO / "kaggle" / "train.py")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    version, where = result.stdout.split()[-2:]
    assert version == read_image()["packages"]["optuna"] and where.startswith(str(tmp_path / "lesionstack-src"))


def test_the_notebooks_metadata_names_the_inputs_it_reads(monkeypatch):
    import importlib.util

    for name in [k for k in os.environ if k.startswith("LESIONSTACK_")]:
        monkeypatch.delenv(name)
    spec = importlib.util.spec_from_file_location("kaggle_train", REPO / "kaggle" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)  # importing it does nothing but name the paths
    meta = json.loads((REPO / "kaggle" / "train-metadata.json").read_text())
    assert meta["code_file"] == "train.py" and meta["kernel_type"] == "script"
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True
    assert meta["competition_sources"] == [train.COMPETITION.name] == ["isic-2024-challenge"]
    assert sorted(d.split("/")[1] for d in meta["dataset_sources"]) == sorted(
        p.name for p in (train.WEIGHTS, train.MASKS, train.SOURCE))
    assert meta["id"].split("/")[1] == train.PREVIOUS.name  # its own output mounts under its slug
    assert train.INPUT_ROOT == Path("/kaggle/input") and train.OUTPUT == Path("/kaggle/working")
