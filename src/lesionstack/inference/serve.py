"""`lesionstack serve`: a local web page and JSON API that score one uploaded lesion photo and keep nothing.

* Models load once, at start-up (`Analyser`); a request only decodes, scores and draws.
* Which model scores: the bundle's CNN fold ensemble (with lesion outline, Grad-CAM and diagnosis), or the
  exported ONNX student run by ONNX Runtime (`ServedStudent`: `lesionstack export`'s folder, by default
  ARTIFACTS/export; no segmenter and no gradients, so no outline and no Grad-CAM). `pick_model` decides;
  every answer names it under `model` (`scorer`: torch or onnxruntime, and the file).
* Privacy: the request body is read into memory under a byte cap and parsed there (`upload.py`), never
  spooled to a temporary file; images and derived pictures go only into the response, never into logs;
  every response carries `Cache-Control: no-store`; the server keeps no history of requests.
* Access: 127.0.0.1 by default. Any other host needs `--token`, and then every request must carry it, as
  `Authorization: Bearer TOKEN` (API clients) or HTTP Basic with the token as password (browsers ask).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from lesionstack import provenance
from lesionstack.data.decode import decode_input
from lesionstack.files import read_json
from lesionstack.inference.explain import (
    Reference,
    display_copy,
    gradcam,
    heatmap,
    jpeg_data_url,
    layer_description,
    outline,
)
from lesionstack.inference.export import FP32_FILE, INT8_FILE, PREPROCESS_FILE, REPORT_FILE, OnnxStudent
from lesionstack.inference.predictor import Predictor
from lesionstack.inference.upload import (
    SITES,
    DecodedImage,
    Limits,
    UploadError,
    decode_upload,
    parse_metadata,
    parse_multipart,
)
from lesionstack.paths import ArtifactPaths

log = logging.getLogger(__name__)

NOTICE = ("Research use only. Not a medical device and not a diagnosis: a model's score on one photo can be "
          "wrong. Anyone worried about a skin lesion should see a doctor.")
METADATA_NOTE = (
    "The probability is the image model's alone. The stacker that adds clinical data was trained on the "
    "3D-TBP measurements of each lesion (the tbp_lv_* columns) and on features computed against the "
    "patient's other lesions (the within-patient 'ugly duckling' normalisation); one uploaded photo has "
    "neither, and filling them in would invent data. The age, sex, site and diameter entered are checked "
    "and returned with the result, but they do not change the score.")
STUDENT_NOTE = (
    "Scored by the image-only phone student (lesionstack distill), exported to ONNX and run by ONNX Runtime (the "
    "phone model): one fold's model, no flip TTA, no segmenter (no outline) and no Grad-CAM.")
MODEL_CHOICES = ("auto", "cnn", "student")
FORM_FIELDS = ("image", "age", "sex", "site", "diameter_mm")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small text fields


def load_predictor(artifacts: str | os.PathLike[str], device: str = "auto") -> Predictor:
    """The bundle's fold models, loaded once (no progress bars: `score` draws its own, `serve` logs)."""
    return Predictor.load(artifacts, device=device, progress=False)


class ServedStudent:
    """An exported student (`lesionstack export`'s folder: student.onnx, preprocess.json, export.json) run by
    ONNX Runtime on the CPU; its scores are ranked against the student's own OOF scores
    (ARTIFACTS/distill/NAME/oof.parquet) when the bundle has them."""

    def __init__(self, onnx: OnnxStudent, report: dict[str, Any], artifacts: ArtifactPaths) -> None:
        self.onnx, self.report, self.artifacts = onnx, report, artifacts

    @classmethod
    def load(cls, artifacts: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None,
             int8: bool = False) -> ServedStudent:
        art = ArtifactPaths(artifacts)
        folder = Path(directory) if directory is not None else art.export_dir
        onnx = OnnxStudent.load(folder, int8=int8)
        report_path = folder / REPORT_FILE
        report = read_json(report_path) if report_path.is_file() else {}
        return cls(onnx, report, art)

    @property
    def oof_scores(self) -> Path | None:
        name = self.report.get("student")
        return self.artifacts.distill_file(name, "oof.parquet") if name else None

    def score_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        return self.onnx.score_crops(crops)

    def model_info(self) -> dict[str, Any]:
        fold = self.report.get("fold")
        return {"kind": "ONNX student", "scorer": "onnxruntime", "file": str(self.onnx.path),
                "precision": "int8" if self.onnx.path.name == INT8_FILE else "fp32",
                "student": self.report.get("student"), "classifier": self.report.get("classifier"),
                "n_models": 1, "folds": [] if fold is None else [int(fold)], "image_size": self.onnx.image_size,
                "device": "cpu (ONNX Runtime)", "has_stacker": False, "note": STUDENT_NOTE}


def has_student(artifacts: str | os.PathLike[str]) -> bool:
    """Whether the bundle ships an exported ONNX student in ARTIFACTS/export."""
    folder = ArtifactPaths(artifacts).export_dir
    return (folder / FP32_FILE).is_file() and (folder / PREPROCESS_FILE).is_file()


def pick_model(artifacts: str | os.PathLike[str], model: str = "auto", student_dir: str | os.PathLike[str] | None = None
               ) -> str:
    """"cnn" or "student". auto: the CNN fold ensemble when the bundle has one (the stronger model, with
    outline and Grad-CAM), else the ONNX student in ARTIFACTS/export (or `student_dir`) when there is one."""
    if model not in MODEL_CHOICES:
        raise ValueError(f"--model must be one of {MODEL_CHOICES}, got {model!r}")
    if model != "auto":
        return model
    art = ArtifactPaths(artifacts)
    if any(art.cnn_dir.glob("fold_*/DONE")):
        return "cnn"
    if student_dir is not None or has_student(art.root):
        return "student"
    return "cnn"  # Predictor.load says what is missing


class Analyser:
    """A loaded bundle and what a request needs from it: the CNN fold ensemble (`predictor`) or the ONNX
    student (`student`). One analysis at a time (`lock`): Grad-CAM hooks the shared models, and on a CPU the
    models already use every core."""

    def __init__(self, predictor: Predictor | None, limits: Limits = Limits(),
                 student: ServedStudent | None = None) -> None:
        if (predictor is None) == (student is None):
            raise ValueError("Analyser needs exactly one of a CNN predictor and an ONNX student")
        self.predictor, self.student, self.limits = predictor, student, limits
        if student is not None:
            self.art = student.artifacts
            self.reference = Reference.load(self.art, student.oof_scores) if student.oof_scores else None
            self.gradcam_layer = None
        else:
            assert predictor is not None
            self.art = predictor.artifacts
            self.reference = Reference.load(self.art)
            self.gradcam_layer = layer_description(predictor.models[0])
        self.training_data = provenance.describe(self.art.root)  # a demo bundle says so on every answer
        self.lock = threading.Lock()

    @property
    def has_diagnosis(self) -> bool:
        return self.predictor is not None and bool(getattr(self.predictor, "has_diagnosis", False))

    def model_info(self) -> dict[str, Any]:
        info = {"metadata_used": False, "metadata_note": METADATA_NOTE}
        if self.student is not None:
            return {**self.student.model_info(), **info}
        p = self.predictor
        assert p is not None
        return {"kind": getattr(p, "kind", "fold ensemble"), "scorer": "torch", "n_models": len(p.models),
                "folds": [int(k) for k in p.folds], "image_size": int(p.image_size), "device": str(p.device),
                "has_stacker": bool(p.has_stacker), **info}

    def health(self) -> dict[str, Any]:
        ref = self.reference
        return {"status": "ok", "artifacts": str(self.art.root), "model": self.model_info(),
                "gradcam_layer": self.gradcam_layer, "has_diagnosis": self.has_diagnosis,
                "training_data": self.training_data,
                "reference": None if ref is None else {"n_benign": len(ref.benign), "n_malignant": len(ref.malignant)},
                "limits": asdict(self.limits), "sites": list(SITES)}

    def model_input(self, image: DecodedImage) -> np.ndarray:
        """The upload's bytes as the model's (S, S, 3) input, made as `score` and `predict` make theirs
        (`decode_input`): the same file gets the same probability from all three."""
        if self.student is not None:
            return decode_input(image.data, self.student.onnx.image_size, max_pixels=self.limits.max_pixels,
                                where="upload")
        assert self.predictor is not None
        return self.predictor.decode(image.data, "upload", max_pixels=self.limits.max_pixels)

    def analyse(self, image: DecodedImage, metadata: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        crop = self.model_input(image)
        with self.lock:
            if self.student is not None:
                probability, masks, diagnosis = float(self.student.score_crops([crop])[0]), None, None
                cam, cam_note = None, "No Grad-CAM: the ONNX student runs without gradients."
            else:
                p = self.predictor
                assert p is not None
                probability = float(p.score_crops([crop])[0])
                masks = p.masks([crop])
                cam, cam_note = gradcam(p.models, p.preprocess([crop]))
                diagnosis = self._diagnose(image, crop)
        photo = display_copy(image.rgb)
        rank = None if self.reference is None else _finite(self.reference.rank(probability))
        return {
            "probability": probability,
            "rank": rank,
            "overlay_image": None if masks is None else jpeg_data_url(outline(photo, masks[0])),
            "heatmap_image": None if cam is None else jpeg_data_url(heatmap(photo, cam[0])),
            "gradcam_layer": self.gradcam_layer,
            "gradcam_note": cam_note,
            "training_data": self.training_data,
            "model": self.model_info(),
            "metadata": metadata,
            "image": {"width": int(image.rgb.shape[1]), "height": int(image.rgb.shape[0]), "format": image.format,
                      "mode": image.mode, "notes": image.notes},
            "diagnosis": diagnosis,
            "seconds": round(time.perf_counter() - start, 4),
            "notice": NOTICE,
        }

    def _diagnose(self, image: DecodedImage, crop: np.ndarray) -> list[dict[str, Any]] | None:
        """Class probabilities, most likely first, when the bundle has a diagnosis model (fed the upload
        decoded at its own input size, not the CNN's `crop`)."""
        if not self.has_diagnosis:
            return None
        p = self.predictor
        assert p is not None
        own = p.diagnosis_input(image.data, crop, "upload", max_pixels=self.limits.max_pixels)
        probs = np.asarray(p.diagnose([own]))[0]
        pairs = sorted(zip(p.diagnosis_classes, probs.tolist()), key=lambda kv: -kv[1])
        return [{"name": str(name), "probability": float(prob)} for name, prob in pairs]


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}


# ---- access -------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} is reachable from other machines: give --token (every request must "
                         "then carry it), or keep the default 127.0.0.1")


def token_matches(header: str, token: str) -> bool:
    """`Bearer TOKEN`, or HTTP Basic with TOKEN as the password (any user name)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


# ---- the app ------------------------------------------------------------------------------------------


def page_html() -> str:
    return resources.files("lesionstack.inference").joinpath("static/index.html").read_text(encoding="utf-8")


async def read_body(request: Request, cap: int) -> bytes:
    """The whole request body in memory, refused (413) as soon as it passes `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise UploadError(413, f"the request is {int(declared):,} bytes; the limit is {cap:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise UploadError(413, f"the request passed {cap:,} bytes, the limit")
    return bytes(body)


PREDICT_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "a JPEG or PNG photo of one lesion"},
            "age": {"type": "number", "minimum": 0, "maximum": 120, "description": "years (optional)"},
            "sex": {"type": "string", "enum": ["male", "female"], "description": "optional"},
            "site": {"type": "string", "enum": list(SITES), "description": "anatomical site (optional)"},
            "diameter_mm": {"type": "number", "minimum": 0.1, "maximum": 100,
                            "description": "long diameter in mm (optional)"},
        }}}},
}


def create_app(analyser: Analyser, token: str | None = None) -> FastAPI:
    app = FastAPI(title="lesionstack serve", version="1",
                  description="Scores one lesion photo with a trained lesionstack bundle. Research use only. "
                              "Uploads are processed in memory and never stored.")
    page = page_html()

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if token and not token_matches(request.headers.get("authorization", ""), token):
            response: Any = JSONResponse({"error": "a valid token is required (Authorization: Bearer TOKEN)"},
                                         status_code=401, headers={"WWW-Authenticate": 'Basic realm="lesionstack"'})
        else:
            response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(UploadError)
    async def refuse(_request: Request, err: UploadError) -> JSONResponse:
        log.info("refused an upload: %d %s", err.status, err)
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        csp = "default-src 'none'; img-src 'self' data: blob:; style-src 'unsafe-inline'; " \
              "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'"
        return HTMLResponse(page, headers={"Content-Security-Policy": csp})

    @app.get("/healthz", summary="What is loaded")
    def healthz() -> dict[str, Any]:
        return analyser.health()

    @app.post("/api/predict", summary="Score one lesion photo", openapi_extra={"requestBody": PREDICT_BODY},
              responses={400: {"description": "empty file or malformed form"},
                         413: {"description": "over the byte or pixel cap"},
                         415: {"description": "not a JPEG or PNG"},
                         422: {"description": "undecodable image, too small, or out-of-range metadata"}})
    async def predict(request: Request) -> dict[str, Any]:
        """Multipart form: `image` (JPEG/PNG) and optional `age`, `sex`, `site`, `diameter_mm`. Returns the
        malignancy probability, its rank among the training set's out-of-fold scores, the lesion outline
        and Grad-CAM pictures as JPEG data URLs, the model used, the time taken, and class probabilities
        when the bundle has a diagnosis model (`diagnosis`, else null)."""
        start = time.perf_counter()
        body = await read_body(request, analyser.limits.max_bytes + MULTIPART_OVERHEAD)
        parts = parse_multipart(body, request.headers.get("content-type", ""))
        del body
        unknown = sorted(set(parts) - set(FORM_FIELDS))
        if unknown:
            raise UploadError(422, f"unknown form field(s) {unknown}; accepted: {list(FORM_FIELDS)}")
        image = parts.get("image")
        if image is None or image.filename is None:
            raise UploadError(400, "no file in the form field 'image'")
        metadata = parse_metadata({k: bytes(v.data).decode("utf-8", "replace") for k, v in parts.items()
                                   if k != "image"})
        decoded = await run_in_threadpool(decode_upload, bytes(image.data), analyser.limits)
        result = await run_in_threadpool(analyser.analyse, decoded, metadata)
        result["seconds"] = round(time.perf_counter() - start, 4)  # parsing and decoding included
        log.info("scored a %dx%d %s in %.3f s", decoded.rgb.shape[1], decoded.rgb.shape[0], decoded.format,
                 result["seconds"])
        return result

    return app


def load_analyser(artifacts: str | os.PathLike[str], model: str = "auto", student_dir: str | os.PathLike[str] | None
                  = None, int8: bool = False, device: str = "auto", limits: Limits = Limits()) -> Analyser:
    """The model `pick_model` chooses, loaded once: the CNN fold ensemble, or the ONNX student."""
    if pick_model(artifacts, model, student_dir) == "student":
        return Analyser(None, limits, student=ServedStudent.load(artifacts, student_dir, int8=int8))
    return Analyser(load_predictor(artifacts, device=device), limits)


def serve(artifacts: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          device: str = "auto", limits: Limits = Limits(), model: str = "auto",
          student_dir: str | os.PathLike[str] | None = None, int8: bool = False) -> None:
    """Load the bundle once, then serve until interrupted."""
    import uvicorn

    check_host(host, token)
    if not logging.getLogger().handlers:  # one line per request: size and time, never pixels
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    analyser = load_analyser(artifacts, model, student_dir, int8, device, limits)
    log.info("loaded %s: %s", artifacts, analyser.model_info()["kind"])
    uvicorn.run(create_app(analyser, token), host=host, port=port, log_level="info")


def launch(artifacts: str | os.PathLike[str], port: int, device: str = "auto", output: Any = None,
           timeout: float = 300.0) -> subprocess.Popen:
    """`lesionstack serve -a ARTIFACTS --port PORT` in a child process, returned once /healthz answers (for
    the browser test, the load benchmark, and scripts). `output`: where its stdout and stderr go."""
    import httpx

    cmd = [sys.executable, "-m", "lesionstack.cli", "serve", "--artifacts", str(artifacts), "--port", str(port),
           "--device", device]
    proc = subprocess.Popen(cmd, stdout=output or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s")
