"""The Kaggle kernel on the Kaggle image's libraries (`make kaggle-check`, run by CI after `make test`).

A tiny model is trained and packaged here, then `kaggle/kernel.py` runs in a second venv that holds the
Kaggle image's versions of torch's neighbours, numpy, pandas, polars, scikit-learn and the GBDT libraries
(kaggle/image.yaml; KAGGLE_PYTHON names its interpreter), offline (`pip install --no-index`), on a fake
/kaggle/input holding the real public test files, twice: packaged for the venv's own Python (the simplejpeg
wheel installs; the submission equals this venv's `predict` to 1e-5) and for the image's Pythons (3.12, 3.13:
both wheels are skipped, Pillow decodes; equal within the tolerance measured below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import TINY_RUN
from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.inference.package import MANIFEST, Target, check_wheels, image_targets, package, read_image
from lesionstack.inference.submit import predict
from lesionstack.pipeline import run
from lesionstack.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.kaggle


@pytest.fixture(scope="module")
def kaggle_python() -> Path:
    path = os.environ.get("KAGGLE_PYTHON")
    if not path or not Path(path).is_file():
        pytest.fail("KAGGLE_PYTHON must name the Kaggle-image venv's python (run `make kaggle-check`)")
    return Path(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kaggle")
    write_demo_data(root / "data", DemoSpec(patients=16, lesions_per_patient=10, seed=3, positive_rate=0.1,
                                            mask_count=24))
    (root / "tiny.yaml").write_text(yaml.safe_dump({**TINY_RUN, "report": False}))
    run(root / "data", root / "artifacts", load_run_config(root / "tiny.yaml"))
    return root / "artifacts"


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its Python settings (PYTHONPATH would leak this checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def _versions(python: Path, names: list[str]) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; import sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True,
                         env=_clean_env())
    return json.loads(out.stdout)


def test_the_check_venv_holds_the_kaggle_images_versions(kaggle_python):
    image = read_image()
    expected = {n: str(v).split("+")[0] for n, v in {**image["packages"], **image["compat"]}.items()
                if v is not None and n not in ("torch", "torchvision")}
    assert _versions(kaggle_python, list(expected)) == expected
    probe = subprocess.run([str(kaggle_python), "-c", "import lesionstack"], capture_output=True, text=True,
                           env=_clean_env())
    assert probe.returncode != 0, "lesionstack must reach the check venv only through the packaged wheel"


def _python_of(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _run_kernel(kaggle_python: Path, trained: Path, public_test_dir: Path, root: Path,
                targets: list[Target] | None) -> tuple[str, pd.DataFrame, dict]:
    """Package `trained` for `targets` (default: the image's Pythons), run the kernel on a fake
    /kaggle/input in the check venv, offline; (its stdout, its submission, the bundle's manifest)."""
    kaggle_input = root / "input"
    bundle = package(trained, kaggle_input / "lesionstack-model", targets=targets)
    shutil.copytree(public_test_dir, kaggle_input / "isic-2024-challenge")
    working = root / "working"
    working.mkdir()
    env = _clean_env(LESIONSTACK_INPUT_ROOT=str(kaggle_input), LESIONSTACK_OUTPUT=str(working),
                     HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_FIND_LINKS="", OMP_NUM_THREADS="1")
    result = subprocess.run([str(kaggle_python), str(bundle / "kernel.py")], env=env, cwd=working,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {working / 'lesionstack-site' / 'lesionstack'}" in result.stdout
    submission = pd.read_csv(working / "submission.csv")
    return result.stdout, submission, json.loads((bundle / MANIFEST).read_text())


@pytest.fixture(scope="module")
def predicted(trained, public_test_dir, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("predict") / "predict.csv"
    predict(public_test_dir, trained, out)
    return pd.read_csv(out)


# Pillow against simplejpeg: the public test crops (141, 125, 119 px) wanted at the tiny model's 32 px
# decode at libjpeg's 2/8, 2/8, 3/8 scale; Pillow's draft takes 1/4, 1/4, 1/2, so the third crop's input
# differs after the resize (its CNN score moves by ~1e-4, tests/test_optional_deps.py). Measured 2026-12-07
# (Pillow 11.3.0 in the check venv): max |kernel - predict| 0.0 with the wheel and 0.0 without it (the
# stacker's trees absorb that move); the Pillow tolerance leaves room for a move that crosses a split.
SAME_DECODER_ATOL = 1e-5
PILLOW_ATOL = 1e-3


def test_kernel_with_the_simplejpeg_wheel_matches_predict(kaggle_python, trained, public_test_dir, predicted,
                                                           tmp_path):
    here = Target(python=_python_of(kaggle_python))  # packaged for the check venv's Python: the wheel fits
    stdout, kernel, manifest = _run_kernel(kaggle_python, trained, public_test_dir, tmp_path, [here])
    assert sorted(w.split("-")[0] for w in manifest["wheels"]) == ["lesionstack", "simplejpeg"]
    assert "installed simplejpeg-" in stdout and "JPEG decoder: simplejpeg " in stdout, stdout
    assert kernel["isic_id"].tolist() == predicted["isic_id"].tolist()
    print(f"kernel (simplejpeg) vs predict: max |diff| {np.abs(kernel['target'] - predicted['target']).max():.2e}")
    np.testing.assert_allclose(kernel["target"], predicted["target"], atol=SAME_DECODER_ATOL, rtol=0)


def test_kernel_with_the_simplejpeg_wheel_refused_falls_back_to_pillow(kaggle_python, trained, public_test_dir,
                                                                       predicted, tmp_path):
    py = _python_of(kaggle_python)
    stdout, kernel, manifest = _run_kernel(kaggle_python, trained, public_test_dir, tmp_path, None)
    shipped = sorted(manifest["wheels_by_python"])
    assert shipped == ["3.12", "3.13"] and py not in shipped  # the image's Pythons, not this venv's
    for version in shipped:
        tag = f"cp{version.replace('.', '')}"
        assert any(w.startswith("simplejpeg-") and f"-{tag}-" in w for w in manifest["wheels"]), manifest
        assert any(line.startswith("skipped simplejpeg-") and f"-{tag}-" in line for line in stdout.splitlines())
    assert "installed simplejpeg-" not in stdout and "JPEG decoder: Pillow " in stdout, stdout
    assert kernel["isic_id"].tolist() == predicted["isic_id"].tolist()
    assert kernel["target"].between(0, 1).all()
    print(f"kernel (Pillow) vs predict: max |difference| {np.abs(kernel['target'] - predicted['target']).max():.2e}")
    np.testing.assert_allclose(kernel["target"], predicted["target"], atol=PILLOW_ATOL, rtol=0)


def test_bundle_wheels_match_the_kaggle_image_and_ship_only_what_it_lacks(trained, tmp_path):
    image = read_image()
    bundle = package(trained, tmp_path / "bundle")
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    names = sorted(w.name.split("-")[0] for w in wheels)
    assert names == ["lesionstack", "simplejpeg", "simplejpeg"]  # the GBDT libraries, torch... are the image's
    by_python = json.loads((bundle / MANIFEST).read_text())["wheels_by_python"]
    for target in image_targets(image):
        check_wheels([bundle / "wheels" / name for name in by_python[target.python]], target)
        assert any(f"cp{target.python.replace('.', '')}" in w.name for w in wheels)


def test_fp16_bundle_halves_the_cnn_weights_and_scores_alike(trained, public_test_dir, tmp_path):
    full = package(trained, tmp_path / "fp32", ship=())
    half = package(trained, tmp_path / "fp16", ship=(), fp16=True)
    sizes = [json.loads((b / MANIFEST).read_text()) for b in (full, half)]
    assert [s["cnn_weights"] for s in sizes] == ["float32", "float16"]
    assert sizes[1]["bytes"]["cnn"] < 0.6 * sizes[0]["bytes"]["cnn"]
    scores = []
    for bundle in (full, half):
        predict(public_test_dir, bundle / "artifacts", bundle / "submission.csv")
        scores.append(pd.read_csv(bundle / "submission.csv")["target"].to_numpy())
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-3)  # fp16 rounding of the weights only
