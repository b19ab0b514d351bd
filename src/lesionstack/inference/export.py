"""Export a distilled student to ONNX (fp32, and int8 for phones) with its preprocessing written beside it,
and load it again with ONNX Runtime alone (`OnnxStudent`), without torch or timm.

    lesionstack export -a ARTIFACTS --out DIR [--int8] [--student NAME] [--fold K]

DIR holds `student.onnx` (fp32), `student.int8.onnx` (with --int8), `preprocess.json` (everything an app
needs to turn a photo into the model's input) and `export.json` (the checks and the pAUC of each model on the
fold's validation crops). The graph takes `image` (B, 3, S, S) float32, ImageNet-normalised RGB, any batch
size, and returns `logit` and `probability` (B,).

The exporter: torch's dynamo exporter first; its output is compared with torch on real crops (it has had
wrong-output bugs), and the TorchScript exporter is used instead when the two differ by more than the
tolerance or the export fails. The int8 model is ONNX Runtime's static QDQ quantisation, per channel
(int8 activations, int8 weights using 7 bits: see WEIGHT_BITS; or 16-bit activations, `a16w8`), calibrated
on a few hundred crops of the fold's training rows (dynamic quantisation barely shrinks a conv net: its cost
is in the convolutions' activations). The student is scored without flip TTA here, as on a phone.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lesionstack.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lesionstack.files import read_json, write_json
from lesionstack.paths import ArtifactPaths, DataPaths

log = logging.getLogger(__name__)

FP32_FILE = "student.onnx"
INT8_FILE = "student.int8.onnx"
PREPROCESS_FILE = "preprocess.json"
REPORT_FILE = "export.json"
PARITY_TOL = 1e-4  # fp32 ONNX vs torch, max |logit difference|
INT8_PAUC_TOL = 0.005  # int8 vs fp32, pAUC on the validation crops
OPSET = 18


class ExportError(RuntimeError):
    """An export that fails its checks (parity with torch, int8 accuracy)."""


# ---- preprocessing (numpy + Pillow only: what an app reimplements) ------------------------------------


def preprocess_spec(image_size: int) -> dict[str, Any]:
    """The model's input contract, written to preprocess.json."""
    return {
        "input_name": "image", "outputs": ["logit", "probability"], "layout": "NCHW", "channel_order": "RGB",
        "dtype": "float32", "input_size": [image_size, image_size],
        "resize": {"method": "bilinear", "what": "the whole lesion crop, squashed to input_size (no crop, no pad)",
                   "training_note": "training decoded each JPEG at the smallest DCT scale (1/2, 1/4, 1/8) whose "
                                    "short side is >= input_size before this resize; a plain bilinear resize of "
                                    "the full image is close to it, not bit-identical"},
        "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "formula": "x = (rgb_uint8 / 255 - mean) / std per channel",
        "probability": "1 / (1 + exp(-logit)); higher means more likely malignant",
    }


def preprocess(crops: Sequence[np.ndarray], spec: dict[str, Any]) -> np.ndarray:
    """(H, W, 3) uint8 RGB crops of any size -> (B, 3, S, S) float32 as preprocess.json describes."""
    h, w = spec["input_size"]
    out = np.empty((len(crops), 3, h, w), dtype=np.float32)
    mean = np.asarray(spec["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(3, 1, 1)
    for i, crop in enumerate(crops):
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crop {i}: expected (H, W, 3) uint8 RGB, got {crop.shape} {crop.dtype}")
        if crop.shape[:2] != (h, w):
            crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
        out[i] = (crop.transpose(2, 0, 1).astype(np.float32) * np.float32(spec["scale"]) - mean) / std
    return out


# ---- the loader `serve` uses --------------------------------------------------------------------------


class OnnxStudent:
    """An exported student run by ONNX Runtime: `OnnxStudent.load(dir).score_crops(crops)`."""

    def __init__(self, session: Any, spec: dict[str, Any], path: Path) -> None:
        self.session, self.spec, self.path = session, spec, path
        self.image_size = int(spec["input_size"][0])

    @classmethod
    def load(cls, directory: str | os.PathLike[str], int8: bool = False, threads: int = 1) -> OnnxStudent:
        """The model in `directory` (an `export` output): fp32 by default, since on x86 servers without VNNI
        the int8 model is the slower one (docs/serving.md); `int8=True` for student.int8.onnx."""
        import onnxruntime as ort

        directory = Path(directory)
        spec_path = directory / PREPROCESS_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(f"{spec_path}: not an exported student (run `lesionstack export`)")
        path = directory / (INT8_FILE if int8 else FP32_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model in {directory}")
        return cls(session(path, threads, ort), read_json(spec_path), path)

    def logits(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Logits of preprocessed (B, 3, S, S) float32 input."""
        return batched_logits(self.session, x, batch_size)

    def score_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(B,) probabilities of (H, W, 3) uint8 RGB crops of any size."""
        return 1.0 / (1.0 + np.exp(-self.logits(preprocess(crops, self.spec))))


def batched_logits(sess: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """An ONNX Runtime session's `logit` output over `x`, `batch_size` rows at a time, as float64."""
    parts = [sess.run(["logit"], {"image": x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float64) if parts else np.empty(0)


def session(path: Path, threads: int, ort: Any = None, optimize: bool = True) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads (1: one core, as on a phone's little core);
    `optimize=False` turns graph optimisations off (see `simulated_logits`)."""
    if ort is None:
        import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---- export -------------------------------------------------------------------------------------------


def _graph(model: Any) -> Any:
    """The student with a probability output beside its logit."""
    import torch

    class StudentGraph(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logit = self.net(image)
            return logit, torch.sigmoid(logit)

    return StudentGraph(model).eval()


def export_onnx(model: Any, path: Path, probe: np.ndarray, opset: int = OPSET) -> dict[str, Any]:
    """Write `model` as ONNX with a dynamic batch: the dynamo exporter when its output on `probe` matches
    torch within PARITY_TOL (and in batches of 1 and all of them), else the TorchScript exporter."""
    import torch

    graph = _graph(model)
    example = torch.from_numpy(probe[:2])
    with torch.no_grad():
        expected = graph(torch.from_numpy(probe))[0].numpy()
    tried: dict[str, Any] = {}
    for exporter in ("dynamo", "torchscript"):
        try:
            _export(graph, example, path, opset, exporter)
            diff = parity(path, probe, expected)
        except Exception as err:  # noqa: BLE001 - any exporter failure means: try the other one
            tried[exporter] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            log.warning("ONNX %s exporter: %s", exporter, tried[exporter])
            continue
        tried[exporter] = diff
        if diff < PARITY_TOL:
            return {"exporter": exporter, "opset": opset, "max_abs_diff_probe": diff, "tried": tried}
        log.warning("ONNX %s exporter: max |diff| %.2e vs torch >= %.0e; trying the next", exporter, diff, PARITY_TOL)
    raise ExportError(f"no ONNX exporter matched torch within {PARITY_TOL}: {tried}")


def _export(graph: Any, example: Any, path: Path, opset: int, exporter: str) -> None:
    import torch

    path.unlink(missing_ok=True)
    names = {"input_names": ["image"], "output_names": ["logit", "probability"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(graph, (example,), str(path), dynamo=True, opset_version=opset,
                              dynamic_shapes={"image": {0: batch}}, external_data=False, **names)
        else:
            torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                              dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"},
                                            "probability": {0: "batch"}}, **names)


def parity(path: Path, x: np.ndarray, expected: np.ndarray) -> float:
    """Max |ONNX logit - expected| over `x`, run as one batch and one image at a time (the dynamic batch)."""
    sess = session(path, threads=1)
    whole = sess.run(["logit"], {"image": x})[0]
    single = np.concatenate([sess.run(["logit"], {"image": x[i:i + 1]})[0] for i in range(min(len(x), 4))])
    return float(max(np.abs(whole - expected).max(), np.abs(single - expected[:len(single)]).max()))


class CropReader:
    """ONNX Runtime's calibration reader over preprocessed crops, a batch at a time."""

    def __init__(self, x: np.ndarray, batch_size: int = 32) -> None:
        self.batches: Iterator[np.ndarray] = iter([x[i:i + batch_size] for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}

    def rewind(self) -> None:  # not needed by MinMax, which reads once
        pass


# int8 recipes: the activation type of the QDQ model (weights are always signed int8, per channel). S8S8 is ONNX
# Runtime's default and what phones (ARMv8.2 dot-product) and VNNI CPUs run fast; U8S8 is what x86 CPUs without
# VNNI (AVX2 only, like the development box) run fast. A16W8 keeps int8 weights (the file is as small) but
# 16-bit activations: 8-bit activations cost these small students' logits 0.03-0.07 correlation with fp32
# (docs/experiments, int8 export); Qualcomm's QNN HTP and Arm's TOSA int16 profile run it natively, ONNX
# Runtime's CPU provider in float.
INT8_RECIPES = ("s8s8", "u8s8", "a16w8")
# Weights are quantised to 7 bits by default for the 8-bit activation recipes. x86 int8 kernels without VNNI
# (AVX2, AVX-512F: the development box) multiply u8 x s8 pairs with vpmaddubsw, whose int16 sum saturates when
# both operands are near full range: the students' int8 logits correlated 0.09-0.74 with fp32 where the same QDQ
# model computed without saturation gave 0.93-0.97, and the check lost up to 0.044 pAUC. 7-bit weights cannot
# overflow it (ONNX Runtime's `reduce_range`, OpenVINO's documented workaround). Phones (ARM dot-product), VNNI
# CPUs and A16W8 accumulate without that int16 step: 8 bits is safe there (`weight_bits=8`).
WEIGHT_BITS = (7, 8)
ACTIVATIONS = {"s8s8": "int8 activations", "u8s8": "uint8 activations", "a16w8": "uint16 activations"}


def default_weight_bits(recipe: str) -> int:
    return 8 if recipe == "a16w8" else 7


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, recipe: str = "s8s8",
                  weight_bits: int | None = None) -> Path:
    """Static QDQ quantisation, per-channel int8 weights, MinMax calibration; `recipe` s8s8 (signed int8
    activations, the default), u8s8 (unsigned) or a16w8 (16-bit activations); `weight_bits` 7 (the default with
    8-bit activations: correct on every CPU) or 8 (full range). See docs/serving.md, Export."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe not in INT8_RECIPES:
        raise ValueError(f"int8 recipe must be one of {INT8_RECIPES}, got {recipe!r}")
    weight_bits = weight_bits or default_weight_bits(recipe)
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"int8 weight bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
    activations = {"s8s8": QuantType.QInt8, "u8s8": QuantType.QUInt8, "a16w8": QuantType.QUInt16}[recipe]
    prepared = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        quantize_static(str(prepared), str(out), CropReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=weight_bits == 7, activation_type=activations,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)
    return out


def simulated_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of a QDQ model computed as its quantise/dequantise arithmetic says, in float (ONNX Runtime's graph
    optimisations off, so no int8 kernel runs): what any int8 CPU without saturation computes, up to float
    rounding. Compared with the kernels' logits it tells quantisation error from kernel saturation."""
    return batched_logits(session(path, threads=1, optimize=False), x)


def load_crops(dataset: Any, indices: Sequence[int]) -> list[np.ndarray]:
    """(S, S, 3) uint8 crops of a CropDataset, as the student's training loader resized them."""
    return [dataset.load(int(i)) for i in indices]


def export_student(data_dir: str | os.PathLike[str], artifacts: str | os.PathLike[str], out: str | os.PathLike[str],
                   name: str | None = None, fold: int = 0, int8: bool = False, calibration_crops: int = 300,
                   seed: int = 0, int8_recipe: str = "s8s8", int8_weight_bits: int | None = None) -> dict[str, Any]:
    """Export student NAME's fold model to OUT; check it; returns (and writes) export.json."""
    import torch

    from lesionstack.data.dataset import CropDataset
    from lesionstack.data.schema import ID_COLUMN, TARGET_COLUMN
    from lesionstack.folds import read_folds
    from lesionstack.metrics import pauc
    from lesionstack.trained.loaders import load_student

    art, out = ArtifactPaths(artifacts), Path(out)
    name = name or only_student(art.root)
    net, cfg = load_student(art.distill_fold(name, fold).dir)
    size = int(cfg["image_size"])
    spec = preprocess_spec(size)
    folds = read_folds(art.folds)
    val, train = folds[folds["fold"] == fold], folds[folds["fold"] != fold]
    images = DataPaths(data_dir).train_images
    val_ds = CropDataset(images, val[ID_COLUMN], val[TARGET_COLUMN], size)
    x_val = preprocess(load_crops(val_ds, range(len(val_ds))), spec)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"student": name, "fold": fold, "classifier": cfg["model"]["classifier"],
                              "image_size": size, "n_val": len(val_ds)}
    with torch.no_grad():
        torch_logits = np.concatenate([net(torch.from_numpy(x_val[i:i + 256])).numpy()
                                       for i in range(0, len(x_val), 256)]).astype(np.float64)
    report["export"] = export_onnx(net, out / FP32_FILE, x_val[:16])
    fp32_logits = OnnxStudent(session(out / FP32_FILE, 1), spec, out / FP32_FILE).logits(x_val)
    y = val_ds.labels
    report["fp32"] = {"max_abs_diff_vs_torch": float(np.abs(fp32_logits - torch_logits).max()),
                      "pauc": pauc(y, fp32_logits), "bytes": (out / FP32_FILE).stat().st_size}
    report["torch"] = {"pauc": pauc(y, torch_logits)}
    if report["fp32"]["max_abs_diff_vs_torch"] >= PARITY_TOL:
        raise ExportError(f"{out / FP32_FILE}: max |logit diff| vs torch {report['fp32']['max_abs_diff_vs_torch']:.2e}"
                          f" on the validation crops of fold {fold} (tolerance {PARITY_TOL})")
    if int8:
        options = Int8Options(int8_recipe, int8_weight_bits, calibration_crops, seed)
        calibration = calibration_input(CropDataset(images, train[ID_COLUMN], train[TARGET_COLUMN], size), spec,
                                        options)
        report["int8"] = _int8(out, x_val, y, fp32_logits, calibration, options)
    write_json(out / PREPROCESS_FILE, spec)
    write_json(out / REPORT_FILE, report)
    return report


@dataclass(frozen=True)
class Int8Options:
    recipe: str = "s8s8"  # INT8_RECIPES
    weight_bits: int | None = None  # WEIGHT_BITS; None: default_weight_bits(recipe)
    calibration_crops: int = 300
    seed: int = 0


def calibration_input(train: Any, spec: dict[str, Any], options: Int8Options) -> np.ndarray:
    """Preprocessed crops of the training rows (never the validation fold the int8 model is checked on)."""
    n = min(options.calibration_crops, len(train))
    pick = np.sort(np.random.default_rng(options.seed).choice(len(train), size=n, replace=False))
    return preprocess(load_crops(train, pick), spec)


def _int8(out: Path, x_val: np.ndarray, y: np.ndarray, fp32_logits: np.ndarray, calibration: np.ndarray,
          options: Int8Options) -> dict[str, Any]:
    """Quantise, then score the validation crops with this CPU's int8 kernels and with the QDQ arithmetic
    simulated in float; the check is the kernels' pAUC against fp32's."""
    from lesionstack.metrics import pauc

    bits = options.weight_bits or default_weight_bits(options.recipe)
    path = quantize_int8(out / FP32_FILE, out / INT8_FILE, calibration, options.recipe, bits)
    logits = batched_logits(session(path, 1), x_val)
    simulated = simulated_logits(path, x_val)
    fp32_pauc, int8_pauc = pauc(y, fp32_logits), pauc(y, logits)
    report = {"pauc": int8_pauc, "pauc_minus_fp32": int8_pauc - fp32_pauc,
              "logit_corr_with_fp32": float(np.corrcoef(logits, fp32_logits)[0, 1]),
              "simulated_pauc": pauc(y, simulated),
              "simulated_logit_corr_with_fp32": float(np.corrcoef(simulated, fp32_logits)[0, 1]),
              "bytes": path.stat().st_size, "calibration_crops": len(calibration),
              "calibration_rows": "training folds of the exported fold", "recipe": options.recipe,
              "weight_bits": bits,
              "format": f"QDQ, per-channel {bits}-bit weights (int8), {ACTIVATIONS[options.recipe]}"}
    report["within_tolerance"] = abs(report["pauc_minus_fp32"]) <= INT8_PAUC_TOL
    if not report["within_tolerance"]:
        log.warning("int8 pAUC differs from fp32 by %+.4f (tolerance %.3f; the QDQ arithmetic without this CPU's "
                    "kernels: %+.4f): prefer %s, or try --int8-recipe a16w8 (16-bit activations)",
                    report["pauc_minus_fp32"], INT8_PAUC_TOL, report["simulated_pauc"] - fp32_pauc, FP32_FILE)
    return report


def only_student(artifacts: Path) -> str:
    """The student to export when none is named: the only finished one."""
    done = sorted(p.parent.parent.name for p in (artifacts / "distill").glob("*/fold_*/DONE"))
    names = sorted(set(done))
    if len(names) != 1:
        raise ExportError(f"{artifacts / 'distill'}: name the student to export with --student; found {names}")
    return names[0]


@dataclass(frozen=True)
class ExportOptions:
    """What `export` writes: the student and fold, where to, and the int8 model's options."""

    out: Path | None = None  # default: ARTIFACTS/export
    student: str | None = None  # default: the only one under ARTIFACTS/distill
    fold: int = 0
    int8: bool = False
    int8_options: Int8Options = field(default_factory=Int8Options)


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote (`export.json`'s content in `report`) and where."""

    out: Path
    report: Any  # export.json as a read-only mapping
    int8_recipe: str

    def __str__(self) -> str:
        r = self.report
        lines = [f"{r['student']} fold {r['fold']} ({r['classifier']}, {r['image_size']} px) via the "
                 f"{r['export']['exporter']} exporter, opset {r['export']['opset']}",
                 f"  torch pAUC {r['torch']['pauc']:.4f} on {r['n_val']} validation crops (no TTA)",
                 f"  fp32  pAUC {r['fp32']['pauc']:.4f}, max |logit diff| vs torch "
                 f"{r['fp32']['max_abs_diff_vs_torch']:.1e}, {r['fp32']['bytes'] / 1e6:.2f} MB"]
        if "int8" in r:
            q = r["int8"]
            lines.append(f"  int8  pAUC {q['pauc']:.4f} ({q['pauc_minus_fp32']:+.4f} vs fp32), logit corr with fp32 "
                         f"{q['logit_corr_with_fp32']:.3f}, {q['bytes'] / 1e6:.2f} MB, {self.int8_recipe}, "
                         f"{q['weight_bits']}-bit weights ({'within' if q['within_tolerance'] else 'OUTSIDE'} the "
                         f"0.005 tolerance)")
        return "\n".join([*lines, f"-> {self.out}"])


def export_stage(data: DataPaths, art: ArtifactPaths, opts: ExportOptions) -> ExportResult:
    """The `export` stage: see `export_student`."""
    from types import MappingProxyType

    out = opts.out or art.export_dir
    q = opts.int8_options
    report = export_student(data.root, art.root, out, name=opts.student, fold=opts.fold, int8=opts.int8,
                            calibration_crops=q.calibration_crops, seed=q.seed, int8_recipe=q.recipe,
                            int8_weight_bits=q.weight_bits)
    return ExportResult(Path(out), MappingProxyType(report), q.recipe)
