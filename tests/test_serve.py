"""`serve`: the JSON API on every kind of bad input, access control, and the proof that an upload never
touches the disk; `score` on a folder with an unreadable file. A tiny trained bundle (conftest)."""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from helpers import big_jpeg, encode, open_files, post, real_crop, running, slow_upload  # noqa: E402
from lesionstack.inference.serve import Analyser, check_host, create_app, load_predictor  # noqa: E402
from lesionstack.inference.upload import Limits  # noqa: E402


@pytest.fixture(scope="module")
def analyser(tiny_bundle: Path) -> Analyser:
    return Analyser(load_predictor(tiny_bundle, device="cpu"))


@pytest.fixture(scope="module")
def client(analyser: Analyser) -> TestClient:
    return TestClient(create_app(analyser))


def skin(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 40 + np.array([170, 120, 100])).astype(np.uint8)
    image[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = (70, 40, 30)  # a dark lesion
    return image


def gray16() -> np.ndarray:
    """The skin picture as a 16-bit grayscale array (a PNG of it has Pillow mode I;16)."""
    return np.asarray(Image.fromarray(skin()).convert("L")).astype(np.uint16) * 257


# ---- good input ---------------------------------------------------------------------------------------


def test_a_real_crop_gets_every_part_of_the_answer(client, shared_data):
    r = post(client, real_crop(shared_data), age="55", sex="female", site="posterior torso", diameter_mm="4.2")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["rank"]["n_benign"] == 18 and body["rank"]["n_malignant"] == 6
    assert 0 <= body["rank"]["benign_percentile"] <= 100
    picture = base64.b64decode(body["overlay_image"].removeprefix("data:image/jpeg;base64,"))
    assert Image.open(io.BytesIO(picture)).size == (384, 384)  # the 139-px square crop, scaled for display
    assert body["gradcam_layer"] == "test_resnet: classifier.layer4 (last feature stage)"
    assert body["heatmap_image"] is None and "1 x 1 cell(s)" in body["gradcam_note"]  # 32 px: no Grad-CAM
    assert body["training_data"]["synthetic"] is True  # the tiny bundle learnt from generated crops
    assert body["model"]["kind"] == "fold ensemble" and body["model"]["folds"] == [0, 1]
    assert body["model"]["metadata_used"] is False and "tbp_lv_" in body["model"]["metadata_note"]
    assert body["metadata"] == {"age_approx": 55.0, "sex": "female", "anatom_site_general": "posterior torso",
                                "clin_size_long_diam_mm": 4.2}
    assert body["diagnosis"] is None and body["seconds"] > 0 and "Research use only" in body["notice"]


def test_nothing_of_the_image_reaches_the_log(client, shared_data, caplog):
    caplog.set_level("DEBUG")
    assert post(client, real_crop(shared_data)).status_code == 200
    assert post(client, b"\xff\xd8\xff" + b"JFIF" * 100).status_code == 422
    text = caplog.text
    assert "scored a 139x139 JPEG" in text and "refused an upload: 422" in text
    assert "data:image" not in text and "JFIF" not in text and len(text) < 5_000


def test_class_probabilities_appear_with_a_diagnosis_model(analyser, shared_data):
    class WithDiagnosis:  # the bundle's Predictor plus a diagnosis model (the `diagnosis` issue builds it)
        has_diagnosis = True
        diagnosis_classes = ["nevus", "melanoma", "basal cell carcinoma"]

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def diagnose(self, crops):
            return np.array([[0.2, 0.7, 0.1]] * len(crops))

    client = TestClient(create_app(Analyser(WithDiagnosis(analyser.predictor))))
    assert client.get("/healthz").json()["has_diagnosis"] is True
    assert post(client, real_crop(shared_data)).json()["diagnosis"] == [
        {"name": "melanoma", "probability": 0.7}, {"name": "nevus", "probability": 0.2},
        {"name": "basal cell carcinoma", "probability": 0.1}]


def test_the_score_is_the_fold_ensembles(client, analyser, shared_data):
    expected = analyser.predictor.score_crops([analyser.predictor.decode(real_crop(shared_data))])[0]
    assert post(client, real_crop(shared_data)).json()["probability"] == pytest.approx(expected, abs=1e-6)


def test_healthz_and_the_openapi_page_describe_the_service(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"]["n_models"] == 2 and health["reference"]["n_benign"] == 18
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(body["properties"]) == {"image", "age", "sex", "site", "diameter_mm"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert "Analyse" in page.text and "Research use only" in page.text
    assert "http" not in page.text.split("<script>")[1]  # no external script or asset


@pytest.mark.parametrize(("make", "note"), [
    (lambda: encode(Image.fromarray(skin()).convert("L")), "grayscale"),
    (lambda: encode(Image.fromarray(skin()).convert("CMYK"), "JPEG"), "CMYK converted"),
    (lambda: encode(Image.fromarray(skin()).convert("RGBA")), "transparency composited"),
    (lambda: encode(Image.fromarray(gray16())), "16-bit"),
])
def test_unusual_but_valid_images_are_converted_and_scored(client, make, note):
    r = post(client, make())
    assert r.status_code == 200, r.text
    assert any(note in n for n in r.json()["image"]["notes"])


def test_a_16_bit_png_keeps_its_contrast(analyser):
    from lesionstack.inference.upload import decode_upload

    decoded = decode_upload(encode(Image.fromarray(gray16())))
    assert decoded.mode == "I;16"
    assert np.abs(decoded.rgb[..., 0].astype(int) - gray16() // 257).max() <= 1  # scaled, not clipped to white


def test_a_large_phone_jpeg_is_decoded_at_a_reduced_scale(client):
    r = post(client, encode(Image.new("RGB", (4_500, 4_000), (180, 130, 110)), "JPEG", quality=80))
    assert r.status_code == 200, r.text
    info = r.json()["image"]
    assert info["width"] * info["height"] <= Limits().max_pixels < 4_500 * 4_000
    assert any("reduced scale from 4500x4000" in n for n in info["notes"])


def test_exif_rotation_is_applied(client):
    image = Image.fromarray(skin(96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the phone was held upright
    r = post(client, encode(image, "JPEG", exif=exif.tobytes()))
    assert r.status_code == 200, r.text
    info = r.json()["image"]
    assert (info["width"], info["height"]) == (64, 96)
    assert "EXIF orientation 6 applied" in info["notes"]


# ---- bad input: a clear 4xx, and the server keeps serving ----------------------------------------------


def _bomb() -> bytes:
    return encode(Image.new("L", (12_000, 12_000)))  # 144 M pixels in a few hundred kB


def _large_png() -> bytes:
    return encode(Image.new("RGB", (4_500, 4_000), (180, 130, 110)))  # 18 M pixels: over the decoded cap


BAD = {
    "not an image": (lambda: b"%PDF-1.7 this is a pdf, whatever the name says", 415, "not a JPEG or PNG"),
    "a text file named .jpg": (lambda: b"hello\n" * 100, 415, "not a JPEG or PNG"),
    "truncated JPEG, in its header": (lambda: encode(Image.fromarray(skin()), "JPEG")[:600], 422,
                                      "truncated or corrupt"),
    "truncated JPEG, in its pixels": (lambda: encode(Image.fromarray(skin(400, 400)), "JPEG")[:20_000], 422,
                                      "truncated or corrupt"),
    "empty": (lambda: b"", 400, "empty"),
    "decompression bomb": (_bomb, 413, "decompression bomb"),
    "PNG over the pixel cap": (_large_png, 413, "too large to decode"),
    "8x8 px": (lambda: encode(Image.fromarray(skin(8, 8))), 422, "at least 32 px"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_get_a_clear_4xx_and_the_server_keeps_serving(client, shared_data, case):
    make, status, message = BAD[case]
    r = post(client, make())
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert r.headers["cache-control"] == "no-store"
    assert post(client, real_crop(shared_data)).status_code == 200


def test_over_the_byte_cap_is_refused_before_decoding(analyser, shared_data):
    small = Analyser(analyser.predictor, Limits(max_bytes=2_000))
    client = TestClient(create_app(small))
    r = post(client, real_crop(shared_data))  # 3.3 kB: within the multipart allowance, over the image cap
    assert r.status_code == 413 and "bytes; the limit is 2,000" in r.json()["error"]
    r = post(client, b"\xff\xd8\xff" + bytes(200_000))  # the body itself passes the cap: refused unread
    assert r.status_code == 413 and "the request is" in r.json()["error"]
    ok = encode(Image.fromarray(skin()), "JPEG", quality=50)
    assert len(ok) < 2_000 and post(client, ok).status_code == 200


@pytest.mark.parametrize(("fields", "message"), [
    ({"age": "-3"}, "age must be between 0 and 120"),
    ({"age": "200"}, "age must be between 0 and 120"),
    ({"age": "old"}, "age must be a number"),
    ({"age": "nan"}, "age must be between"),
    ({"sex": "unknown"}, "sex must be one of"),
    ({"site": "elbow"}, "site must be one of"),
    ({"diameter_mm": "0"}, "diameter_mm must be between 0.1 and 100"),
    ({"diameter_mm": "1e9"}, "diameter_mm must be between"),
    ({"colour": "red"}, "unknown form field(s) ['colour']"),
])
def test_out_of_range_metadata_is_named(client, shared_data, fields, message):
    r = post(client, real_crop(shared_data), **fields)
    assert r.status_code == 422 and message in r.json()["error"]


def test_a_form_without_an_image_or_not_multipart_is_refused(client):
    r = client.post("/api/predict", data={"age": "50"})
    assert r.status_code in (400, 415) and "image" in r.json()["error"]
    r = client.post("/api/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


# ---- access -------------------------------------------------------------------------------------------


def test_a_non_loopback_host_needs_a_token():
    check_host("127.0.0.1", None)
    check_host("::1", None)
    check_host("localhost", None)
    with pytest.raises(ValueError, match="--token"):
        check_host("0.0.0.0", None)
    with pytest.raises(ValueError, match="--token"):
        check_host("192.168.1.20", None)
    check_host("0.0.0.0", "s3cret")


def test_with_a_token_every_request_needs_it(analyser, shared_data):
    client = TestClient(create_app(analyser, token="s3cret"))
    for path in ("/", "/healthz", "/openapi.json", "/docs"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert post(client, real_crop(shared_data)).status_code == 401
    assert client.get("/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/healthz", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    basic = base64.b64encode(b"anyone:s3cret").decode()
    assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    r = client.post("/api/predict", headers={"Authorization": "Bearer s3cret"},
                    files={"image": ("a.jpg", real_crop(shared_data), "image/jpeg")})
    assert r.status_code == 200


def test_the_cli_refuses_a_public_host_without_a_token(tiny_bundle):
    from typer.testing import CliRunner

    from lesionstack.cli import app

    result = CliRunner().invoke(app, ["serve", str(tiny_bundle), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output


# ---- privacy: an upload never touches the disk ---------------------------------------------------------


def test_a_5_mb_upload_never_creates_a_file(analyser, tmp_path, monkeypatch):
    spool = tmp_path / "tmp"  # where Python's tempfile (and so Starlette's spooling) would write
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    image = big_jpeg()
    during: list[set[str]] = []
    analyse = analyser.analyse

    def watched(*args: object, **kwargs: object) -> dict:
        during.append(open_files())  # the body is parsed and decoded: the whole upload is in the server
        return analyse(*args, **kwargs)

    monkeypatch.setattr(analyser, "analyse", watched)
    before_files, before_listing = open_files(), sorted(os.listdir(spool))
    with running(create_app(analyser)) as url:
        status = slow_upload(f"{url}/api/predict", image, during)
    assert status == 200
    assert len(during) > 15  # snapshots through the upload and during the analysis
    new = set().union(*during) - before_files
    assert not [f for f in new if f.startswith(str(spool)) or "(deleted)" in f], new
    assert sorted(os.listdir(spool)) == before_listing == []


def test_the_privacy_check_catches_starlettes_default_spooling(tmp_path, monkeypatch):
    """The same check on a plain Starlette form endpoint sees the temporary file: the test above can fail."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        form = await request.form()
        return {"size": len(await form["image"].read())}

    during: list[set[str]] = []
    before = open_files()
    with running(app) as url:
        assert slow_upload(f"{url}/upload", big_jpeg(), during) == 200
    new = set().union(*during) - before
    assert [f for f in new if f.startswith(str(spool)) or "(deleted)" in f]


# ---- score ----------------------------------------------------------------------------------------------


def test_score_writes_a_row_per_file_and_an_error_row_for_a_bad_one(tiny_bundle, shared_data, tmp_path):
    from lesionstack.inference.score import score

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    crops = sorted((shared_data / "isic2024-real-crops").glob("*.jpg"))[:3]
    for crop in crops:
        (folder / "sub" / crop.name).write_bytes(crop.read_bytes())
    (folder / "broken.jpg").write_bytes(crops[0].read_bytes()[:300])
    Image.fromarray(skin()).save(folder / "lesion.png")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    out = tmp_path / "probs.csv"
    table = score([folder, tmp_path / "missing.jpg"], tiny_bundle, out, device="cpu", progress=False)
    written = pd.read_csv(out, keep_default_na=False)
    assert list(written.columns[:3]) == ["path", "probability", "error"] and len(written) == 6
    bad = written.set_index("path").loc[[str(folder / "broken.jpg"), str(tmp_path / "missing.jpg")]]
    assert (bad["probability"] == "").all() and (bad["error"] != "").all()
    good = table[table["error"] == ""]
    assert len(good) == 4 and good["probability"].between(0, 1).all()
