"""One file, one probability: `predict` (HDF5 crops), `score` (files) and `serve` (uploads) make the model's
input from the same bytes with the same function, so they agree; and reading an upload's header and EXIF
costs bounded time and memory, whatever size the file declares. A tiny trained bundle (conftest)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lesionstack.data.decode import decode_image, decode_input  # noqa: E402
from lesionstack.inference.score import score  # noqa: E402
from lesionstack.inference.serve import Analyser, create_app, load_predictor  # noqa: E402
from lesionstack.inference.upload import UploadError, decode_upload  # noqa: E402


def test_predict_score_and_serve_agree_on_the_same_bytes(tiny_bundle: Path, shared_data: Path, tmp_path: Path):
    crops = sorted((shared_data / "isic2024-real-crops").glob("*.jpg"))
    assert len(crops) >= 10
    h5 = tmp_path / "test-image.hdf5"
    with h5py.File(h5, "w") as f:  # the competition's layout: one bytes scalar per isic_id
        for crop in crops:
            f[crop.stem] = np.bytes_(crop.read_bytes())
    predictor = load_predictor(tiny_bundle, device="cpu")
    predicted = predictor.score_hdf5(h5).set_index("isic_id")["score"]  # what `predict` feeds the stacker
    scored = score(crops, tiny_bundle, tmp_path / "probs.csv", device="cpu", progress=False)
    scored = pd.Series(scored["probability"].to_numpy(), index=[Path(p).stem for p in scored["path"]])
    client = TestClient(create_app(Analyser(predictor)))
    served = {}
    for crop in crops:
        r = client.post("/api/predict", files={"image": (crop.name, crop.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        served[crop.stem] = r.json()["probability"]
    served = pd.Series(served)
    ids = [c.stem for c in crops]
    np.testing.assert_allclose(scored[ids], predicted[ids], rtol=0, atol=1e-6)
    np.testing.assert_allclose(served[ids], predicted[ids], rtol=0, atol=1e-6)
    # the test can fail: decoding at full size and resizing (what `serve` did) moves these scores
    full = predictor.score_crops([decode_image(c.read_bytes()) for c in crops])
    assert np.abs(full - predicted[ids].to_numpy()).max() > 1e-5


def test_the_model_input_is_the_reduced_scale_decode_resized(shared_data: Path):
    data = (shared_data / "isic2024-real-crops" / "ISIC_0015670.jpg").read_bytes()
    x = decode_input(data, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    full = decode_image(data)
    assert min(decode_image(data, min_side=32).shape[:2]) < min(full.shape[:2])  # a reduced JPEG scale


# ---- a PNG declaring 12,000 x 12,000 px ------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(side: int = 12_000, channels: int = 1, exif_after_pixels: bytes = b"") -> bytes:
    """A valid all-black PNG of side x side px, built row by row (the test itself never holds its pixels):
    a few hundred kB on disk, 144 M pixels declared."""
    z = zlib.compressobj(9)
    row = bytes(side * channels + 1)
    pixels = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    kind = {1: 0, 3: 2}[channels]
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, kind, 0, 0, 0))
            + _chunk(b"IDAT", pixels) + (_chunk(b"eXIf", exif_after_pixels) if exif_after_pixels else b"")
            + _chunk(b"IEND", b""))


# The peak resident memory of this process alone: VmHWM starts afresh at exec (ru_maxrss would start at the
# parent's peak: pytest's, with torch loaded)
MEASURE = """
import json, sys, time
from pathlib import Path
from lesionstack.inference.upload import UploadError, decode_upload
def peak_mb():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
data = Path(sys.argv[1]).read_bytes()
try:  # warm up: the first call imports Pillow's plugins
    decode_upload(Path(sys.argv[2]).read_bytes())
except UploadError:
    pass
before = peak_mb()
start = time.perf_counter()
try:
    decode_upload(data)
    status, message = 200, ""
except UploadError as err:
    status, message = err.status, str(err)
seconds = time.perf_counter() - start
grown = peak_mb() - before
print(json.dumps({"status": status, "message": message, "seconds": seconds, "mb": grown}))
"""

# a little-endian TIFF header with one IFD entry: Orientation (0x0112) = 6
EXIF_6 = b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(("channels", "exif"), [(1, b""), (3, b""), (1, EXIF_6)], ids=["gray", "rgb", "exif"])
def test_a_png_declaring_12000_px_is_refused_fast_and_small(tmp_path: Path, shared_data: Path, channels, exif):
    """In a fresh process, so the peak resident memory is this refusal's: Pillow's `getexif` on a PNG
    decoded all 144 M pixels first (1.1-1.8 s and 137 MB for the gray one, 3 times that for RGB)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("the peak-memory figure is read from Linux's /proc/self/status")
    png = tmp_path / "declared.png"
    png.write_bytes(declared_png(channels=channels, exif_after_pixels=exif))
    assert png.stat().st_size < 1_000_000
    warm = shared_data / "isic2024-real-crops" / "ISIC_0015670.jpg"
    out = subprocess.run([sys.executable, "-c", MEASURE, str(png), str(warm)], capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 413 and "12000x12000 px" in result["message"], result
    assert result["seconds"] < 0.2, result
    assert result["mb"] < 100, result


def test_a_png_orientation_is_read_from_its_exif_chunk_without_decoding():
    from PIL import Image

    img = Image.new("RGB", (96, 64), (180, 120, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="PNG", exif=exif)
    decoded = decode_upload(buffer.getvalue())
    assert decoded.rgb.shape == (96, 64, 3) and "EXIF orientation 6 applied" in decoded.notes
    with pytest.raises(UploadError) as err:
        decode_upload(declared_png(side=200, exif_after_pixels=b"not a tiff at all")[:-30])
    assert err.value.status == 422
