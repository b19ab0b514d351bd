"""export: ONNX parity with torch (dynamic batch), int8 accuracy on the validation crops, the preprocessing JSON
and the ONNX Runtime loader, on a tiny trained student (timm's test_resnet, 32 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lesionstack.data.augment import IMAGENET_MEAN, normalize, to_float
from lesionstack.data.dataset import CropDataset
from lesionstack.folds import read_folds
from lesionstack.inference.export import (
    FP32_FILE,
    INT8_FILE,
    INT8_PAUC_TOL,
    PARITY_TOL,
    OnnxStudent,
    preprocess,
    preprocess_spec,
    quantize_int8,
    simulated_logits,
)
from lesionstack.trained.loaders import load_student


@pytest.fixture(scope="module")
def exported(exported_student: tuple[Path, Path, Path, dict]) -> tuple[Path, Path, Path, dict]:
    return exported_student


def test_fp32_onnx_matches_torch_and_has_a_dynamic_batch(exported: tuple[Path, Path, Path, dict]) -> None:
    root, art, out, report = exported
    assert report["fp32"]["max_abs_diff_vs_torch"] < PARITY_TOL
    assert report["export"]["exporter"] in ("dynamo", "torchscript") and report["export"]["opset"] >= 17
    model = onnx.load(str(out / FP32_FILE))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    net, cfg = load_student(Path(art) / "distill" / "tiny" / "fold_0")
    student = OnnxStudent.load(out, int8=False)
    x = torch.rand(5, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        expected = net(normalize(x)).numpy()
    got = student.logits(normalize(x).numpy())
    np.testing.assert_allclose(got, expected, atol=PARITY_TOL)


def test_int8_is_smaller_and_as_accurate(exported: tuple[Path, Path, Path, dict]) -> None:
    _, _, out, report = exported
    assert (out / INT8_FILE).is_file()
    assert abs(report["int8"]["pauc_minus_fp32"]) <= INT8_PAUC_TOL and report["int8"]["within_tolerance"]
    ops = {n.op_type for n in onnx.load(str(out / INT8_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # static QDQ
    assert report["int8"]["bytes"] < report["fp32"]["bytes"]


def test_the_u8s8_and_a16w8_recipes_quantise_activations_as_named(exported, tmp_path) -> None:
    root, art, out, _ = exported
    folds = read_folds(Path(art) / "folds.csv")
    ds = CropDataset(root / "train-image.hdf5", folds["isic_id"][:8], None, 32)
    calibration = preprocess([ds.load(i) for i in range(8)], preprocess_spec(32))
    model = onnx.load(str(quantize_int8(out / FP32_FILE, tmp_path / "u8.onnx", calibration, "u8s8")))
    zero_points = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("_zero_point")}
    kinds = set(zero_points.values())
    assert onnx.TensorProto.UINT8 in kinds and onnx.TensorProto.INT8 in kinds  # u8 activations, s8 weights
    a16 = onnx.load(str(quantize_int8(out / FP32_FILE, tmp_path / "a16.onnx", calibration, "a16w8")))
    kinds = {i.data_type for i in a16.graph.initializer if i.name.endswith("_zero_point")}
    assert onnx.TensorProto.UINT16 in kinds and onnx.TensorProto.INT8 in kinds  # u16 activations, s8 weights
    assert max(int(np.abs(w.astype(int)).max()) for w in _weights(a16)) == 127  # no int16 step: 8-bit weights
    x = preprocess([ds.load(i) for i in range(8)], preprocess_spec(32))
    fp32 = OnnxStudent.load(out).logits(x)
    a16_logits = simulated_logits(tmp_path / "a16.onnx", x)
    assert np.abs(a16_logits - fp32).max() < np.abs(simulated_logits(tmp_path / "u8.onnx", x) - fp32).max()
    with pytest.raises(ValueError, match="recipe"):
        quantize_int8(out / FP32_FILE, tmp_path / "x.onnx", calibration, "u8u8")


def _weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """The int8 weight tensors of a QDQ model (the inputs of its weights' DequantizeLinear nodes)."""
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [init[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in init and init[n.input[0]].dtype == np.int8
            and init[n.input[0]].ndim >= 2]


def test_weights_are_7_bit_by_default_so_avx2_kernels_cannot_saturate(exported, tmp_path) -> None:
    """vpmaddubsw (x86 int8 without VNNI) saturates its int16 pair sums with full-range weights: 7-bit weights
    (|w| <= 64) are the default; 8 bits is the option for phones and VNNI CPUs; anything else is refused."""
    root, art, out, report = exported
    assert report["int8"]["weight_bits"] == 7
    default = _weights(onnx.load(str(out / INT8_FILE)))
    assert default and max(int(np.abs(w.astype(int)).max()) for w in default) <= 64
    folds = read_folds(Path(art) / "folds.csv")
    ds = CropDataset(root / "train-image.hdf5", folds["isic_id"][:8], None, 32)
    calibration = preprocess([ds.load(i) for i in range(8)], preprocess_spec(32))
    full = _weights(onnx.load(str(quantize_int8(out / FP32_FILE, tmp_path / "w8.onnx", calibration, weight_bits=8))))
    assert max(int(np.abs(w.astype(int)).max()) for w in full) == 127
    with pytest.raises(ValueError, match="weight bits"):
        quantize_int8(out / FP32_FILE, tmp_path / "x.onnx", calibration, weight_bits=6)


def test_int8_report_tells_quantisation_error_from_kernel_error(exported) -> None:
    """export.json gives the int8 logits' correlation with fp32 from this CPU's kernels and from the QDQ
    arithmetic simulated in float; the simulation of a model without QDQ nodes is the fp32 model itself."""
    root, art, out, report = exported
    q = report["int8"]
    assert 0.5 < q["simulated_logit_corr_with_fp32"] <= 1 and -1 <= q["logit_corr_with_fp32"] <= 1
    assert 0 <= q["simulated_pauc"] <= 0.2
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    fp32 = OnnxStudent.load(out).logits(x)
    np.testing.assert_allclose(simulated_logits(out / FP32_FILE, x), fp32, atol=1e-5)
    assert np.abs(simulated_logits(out / INT8_FILE, x) - fp32).max() > 0  # the QDQ nodes do round


def test_preprocessing_json_reproduces_the_training_input(exported: tuple[Path, Path, Path, dict]) -> None:
    """An app following preprocess.json feeds the model what training fed it (resize, scale, mean/std)."""
    root, art, out, _ = exported
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["input_size"] == [32, 32] and spec["channel_order"] == "RGB" and spec["mean"] == list(IMAGENET_MEAN)
    folds = read_folds(Path(art) / "folds.csv")
    ds = CropDataset(root / "train-image.hdf5", folds["isic_id"][:4], None, 32)
    crops = [ds.load(i) for i in range(4)]
    training = normalize(to_float(torch.stack([torch.from_numpy(c.transpose(2, 0, 1).copy()) for c in crops])))
    np.testing.assert_allclose(preprocess(crops, spec), training.numpy(), atol=1e-6)
    big = ds.images.read(folds["isic_id"][0])  # the original 40-px crop: resized by the loader
    assert preprocess([big], preprocess_spec(32)).shape == (1, 3, 32, 32)


def test_loader_scores_crops_of_any_size(exported: tuple[Path, Path, Path, dict]) -> None:
    _, _, out, _ = exported
    student = OnnxStudent.load(out, int8=True)
    assert student.path.name == INT8_FILE and student.image_size == 32
    crops = [np.full((s, s, 3), 120, np.uint8) for s in (20, 32, 75)]
    p = student.score_crops(crops)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    with pytest.raises(ValueError, match="crop 0"):
        student.score_crops([np.zeros((10, 10), np.uint8)])
    with pytest.raises(FileNotFoundError, match="preprocess.json"):
        OnnxStudent.load(out.parent)
