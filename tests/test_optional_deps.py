"""The Kaggle kernel's import path runs without the optional libraries (simplejpeg above all: its wheel is
refused on a Python the bundle was not built for), and the Pillow fallback decodes real crops like
simplejpeg: identical pixels where both decode at the same DCT scale, a stated tolerance where Pillow's
draft (1/2, 1/4, 1/8 only) takes a larger scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import lesionstack
from lesionstack.data import decode
from lesionstack.data.dataset import resize_square

OPTIONAL = ("simplejpeg", "fastapi", "starlette", "uvicorn", "onnx", "onnxruntime", "selenium", "matplotlib")
# Every module `kaggle/kernel.py` reaches through `inference.submit.predict`, lazy imports included.
KERNEL_PATH = ("lesionstack.inference.submit", "lesionstack.inference.predictor", "lesionstack.inference.package",
               "lesionstack.inference.diagnosis", "lesionstack.tabular.features", "lesionstack.tabular.pairing",
               "lesionstack.tabular.stack", "lesionstack.tabular.gbdt", "lesionstack.trained.loaders",
               "lesionstack.trained.scorer")
# A fresh interpreter where each optional library is absent: a None in sys.modules makes `import x` raise
# ModuleNotFoundError and `importlib.util.find_spec(x)` answer None, as when it is not installed (torch
# probes some of them with find_spec).
HIDE = f"""
import sys
sys.modules.update(dict.fromkeys({OPTIONAL!r}))
"""
# Real crops wanted at these model sizes (the mean over crops of the mean |difference| in grey levels,
# after the resize to the model's input, Pillow against simplejpeg), measured on the 15 real crops with
# Pillow 13.0 and simplejpeg 1.9.0: 0.61 / 0.88 / 0.48 at 32 / 64 / 128 px, 0 at 224 (full scale).
MEAN_GREY_TOLERANCE = 1.0
# Per-crop CNN score (sigmoid) difference, Pillow against simplejpeg, with the tiny test bundle (32 px);
# measured max 7.5e-5 on the 15 real crops (test_resnet, one epoch: a weak model moves little).
SCORE_TOLERANCE = 1e-3


def _run_hidden(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    src = str(Path(lesionstack.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_the_kernels_import_path_needs_no_optional_library():
    code = (f"import importlib, json, sys\n"
            f"for name in {KERNEL_PATH!r}: importlib.import_module(name)\n"
            "from lesionstack.data.decode import jpeg_decoder\n"
            "print(json.dumps({'decoder': jpeg_decoder(), 'loaded': sorted(m for m in sys.modules "
            "if sys.modules[m] is not None and m.split('.')[0] in " + repr(OPTIONAL) + ")}))")
    result = _run_hidden(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["decoder"].startswith("Pillow ")


def test_hiding_works():
    """The hiding itself must fail an import (else the test above could not fail)."""
    result = _run_hidden("import lesionstack.inference.serve")
    assert result.returncode != 0 and "ModuleNotFoundError: import of fastapi halted" in result.stderr


def _crops(shared_data: Path) -> list[Path]:
    crops = sorted((shared_data / "isic2024-real-crops").glob("ISIC_*.jpg"))
    assert len(crops) == 15
    return crops


@pytest.mark.parametrize("size", [32, 64, 128, 224])
def test_pillow_decodes_real_crops_like_simplejpeg(shared_data, monkeypatch, size):
    crops = [p.read_bytes() for p in _crops(shared_data)]
    fast = [decode.decode_image(b, min_side=size) for b in crops]
    monkeypatch.setattr(decode, "simplejpeg", None)
    slow = [decode.decode_image(b, min_side=size) for b in crops]
    same_scale = [i for i, (a, b) in enumerate(zip(fast, slow, strict=True)) if a.shape == b.shape]
    assert same_scale, "Pillow's draft never matched libjpeg's scale"
    for i in same_scale:  # one library underneath (libjpeg-turbo): the same pixels
        np.testing.assert_array_equal(slow[i], fast[i])
    grey = [np.abs(resize_square(a, size).astype(int) - resize_square(b, size)).mean()
            for a, b in zip(fast, slow, strict=True)]
    assert np.mean(grey) <= MEAN_GREY_TOLERANCE, grey


def test_predictor_scores_real_crops_without_simplejpeg(shared_data, tiny_bundle, tmp_path):
    h5 = tmp_path / "crops.hdf5"
    with h5py.File(h5, "w") as f:
        for path in _crops(shared_data):
            f[path.stem] = np.bytes_(path.read_bytes())
    code = ("import json\nfrom lesionstack.inference.predictor import Predictor\n"
            "from lesionstack.data.decode import jpeg_decoder\n"
            f"p = Predictor.load({str(tiny_bundle)!r}, device='cpu', progress=False, num_workers=0)\n"
            f"t = p.score_hdf5({str(h5)!r})\n"
            "print(json.dumps({'decoder': jpeg_decoder(), 'scores': dict(zip(t.isic_id, t.score))}))")
    result = _run_hidden(code)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["decoder"].startswith("Pillow ")
    from lesionstack.inference.predictor import Predictor

    here = Predictor.load(tiny_bundle, device="cpu", progress=False, num_workers=0).score_hdf5(h5)
    pillow = np.array([report["scores"][i] for i in here["isic_id"]])
    assert np.isfinite(pillow).all()
    np.testing.assert_allclose(pillow, here["score"].to_numpy(), atol=SCORE_TOLERANCE, rtol=0)
