"""`decode_image`: every format and mode a crop may come in, EXIF rotation, and the pixel caps; and the
memory of the commands that read crops when one crop is a 10,000 x 10,000 px JPEG (issue 12.3)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from lesionstack.data.decode import (
    MAX_DECODED_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    decode_image,
    sniff_format,
)

REPO = Path(__file__).resolve().parents[1]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 128.0)], axis=2).astype(np.uint8)


def test_sniffs_the_format_from_the_bytes():
    rgb = Image.fromarray(_gradient())
    assert sniff_format(_encode(rgb, "JPEG")) == "JPEG"
    assert sniff_format(_encode(rgb, "PNG")) == "PNG"
    assert sniff_format(_encode(rgb, "BMP")) == "other"
    assert decode_image(_encode(rgb, "BMP")).shape == (48, 64, 3)  # Pillow reads what it can


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_come_back_as_rgb(mode):
    src = Image.fromarray(_gradient()).convert(mode)
    out = decode_image(_encode(src, "JPEG", quality=95))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    expected = np.asarray(src.convert("RGB"), dtype=int)
    assert np.abs(out.astype(int) - expected).mean() < 6


def test_png_alpha_palette_and_16_bit():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :10, 3] = 255  # left half opaque red, right half transparent
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.shape == (10, 20, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[0, 15]) == (255, 255, 255)  # composited on white
    palette = Image.fromarray(_gradient()).convert("P")
    assert decode_image(_encode(palette, "PNG")).shape == (48, 64, 3)
    deep = (np.arange(20 * 10, dtype=np.uint16).reshape(10, 20) * 300).astype(np.uint16)
    out16 = decode_image(_encode(Image.fromarray(deep), "PNG"))
    assert out16.shape == (10, 20, 3)
    assert out16[-1, -1, 0] == round(deep[-1, -1] / 65535 * 255)  # scaled, not clipped at 255


def test_exif_orientation_is_applied():
    src = Image.fromarray(_gradient(64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored image is landscape, the photo portrait
    out = decode_image(_encode(src, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (64, 48, 3)
    expected = np.asarray(src.transpose(Image.Transpose.ROTATE_270), dtype=int)
    assert np.abs(out.astype(int) - expected).mean() < 6


def test_min_and_max_side_decode_at_a_reduced_scale():
    data = _encode(Image.fromarray(_gradient(800, 800)), "JPEG")
    assert decode_image(data, min_side=100).shape == (100, 100, 3)  # 1/8 scale, straight from libjpeg
    assert decode_image(data, min_side=150).shape == (200, 200, 3)  # the smallest scale >= 150
    assert decode_image(data, max_side=150).shape == (150, 150, 3)  # then shrunk to max_side


def test_oversized_images_are_scaled_or_refused_naming_the_id():
    big = _encode(Image.new("RGB", (5000, 4000), (180, 120, 110)), "JPEG")
    # a baseline JPEG above the cap is decoded at a reduced scale that fits it
    out = decode_image(big, max_pixels=2_000_000)
    assert out.shape[0] * out.shape[1] <= 2_000_000 and out.shape[:2] == (1000, 1250)  # 2/8 scale
    with pytest.raises(ImageTooLargeError, match="ISIC_BIG.*even at 1/8 scale"):
        decode_image(big, max_pixels=100_000, where="ISIC_BIG")
    progressive = _encode(Image.new("RGB", (3000, 3000), (180, 120, 110)), "JPEG", progressive=True)
    with pytest.raises(ImageTooLargeError, match="ISIC_PRO"):
        decode_image(progressive, max_pixels=1_000_000, where="ISIC_PRO")
    png = _encode(Image.new("RGB", (2000, 1000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="ISIC_PNG.*2000x1000"):
        decode_image(png, max_pixels=1_000_000, where="ISIC_PNG")
    assert MAX_DECODED_PIXELS >= 4096 * 4096


def test_png_bomb_is_refused_before_decoding():
    """A 60,000 x 60,000 px PNG of a few KB (3.6 gigapixels) is refused from its header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")
    with pytest.raises(ImageTooLargeError, match="ISIC_BOMB.*60000x60000"):
        decode_image(bomb, where="ISIC_BOMB")


@pytest.mark.parametrize("data", [b"", b"junk", b"\xff\xd8\xff\xe0junk", b"\x89PNG\r\n\x1a\nxx"])
def test_undecodable_bytes_name_the_id_and_file(data):
    with pytest.raises(CorruptImageError, match="image 'ISIC_X' in /some/file.hdf5"):
        decode_image(data, where="ISIC_X", path="/some/file.hdf5")


# ---- memory with a 10,000 x 10,000 px crop -------------------------------------------------------------

N_CROPS = 12


@pytest.fixture(scope="module")
def crop_files(tmp_path_factory) -> tuple[Path, Path]:
    """Two HDF5 files with the same ids: clean 120-px crops, and the same with one 10,000 x 10,000 px JPEG."""
    from helpers import crop_jpeg

    root = tmp_path_factory.mktemp("bigcrop")
    rng = np.random.default_rng(0)
    crops = {f"ISIC_{i:07d}": crop_jpeg(rng, i % 3 == 0, size=120) for i in range(N_CROPS)}
    huge = Image.new("RGB", (10_000, 10_000), (190, 140, 120))
    huge.paste((60, 40, 30), (4000, 4000, 6000, 6000))  # a dark lesion in the middle
    big = _encode(huge, "JPEG", quality=90)
    del huge
    paths = root / "clean.hdf5", root / "huge.hdf5"
    for path, replace in zip(paths, (False, True)):
        with h5py.File(path, "w") as h5:
            for i, (isic_id, data) in enumerate(crops.items()):
                h5[isic_id] = np.bytes_(big if replace and i == 0 else data)
    return paths


# Each snippet reads every crop the way one command does. They run in forked children of one process that
# has imported torch and lesionstack once (two cores; a fresh interpreter per case would take a minute);
# each child reports its own peak RSS.
READERS = {
    "montage": "from lesionstack.report.montage import load_crops\n"
               "assert len(load_crops(Path(PATH), IDS, [])) == len(IDS)",
    "predict": "from lesionstack.data.dataset import CropDataset\n"
               "ds = CropDataset(H5Images(PATH), IDS, None, 64)\n"
               "assert all(ds[i][0] is not None for i in range(len(ds)))",
    "cnn_loader": "from torch.utils.data import DataLoader\n"
                  "from lesionstack.data.dataset import CropDataset, collate_skip\n"
                  "ds = CropDataset(PATH, IDS, [0.0] * len(IDS), 64)\n"
                  "batches = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_skip))\n"
                  "assert sum(len(b.index) for b in batches) == len(IDS)",
}
HARNESS = """
import json, os, resource, sys
from pathlib import Path
import torch, torch.utils.data, lesionstack.data.dataset, lesionstack.report.montage
from lesionstack.data.hdf5 import H5Images
IDS = [f'ISIC_{i:07d}' for i in range(N)]
peaks = {}
for key, (code, PATH) in CASES.items():
    r, w = os.pipe()
    if os.fork() == 0:
        try:
            exec(code)
            os.write(w, str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).encode())
        finally:
            os._exit(0)
    os.close(w)
    peaks[key] = int(os.read(r, 64) or b"-1")
    os.wait()
print("PEAKS", json.dumps(peaks))
"""


def test_a_huge_crop_keeps_each_reader_under_one_and_a_half_times_its_clean_memory(crop_files):
    cases = {f"{name}/{kind}": (code, str(path)) for name, code in READERS.items()
             for kind, path in zip(("clean", "huge"), crop_files)}
    script = f"N = {N_CROPS}\nCASES = {cases!r}\n" + HARNESS
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.split("PEAKS")[-1])
    assert all(v > 0 for v in peaks.values()), peaks  # every reader finished
    for name in READERS:
        base, huge = peaks[f"{name}/clean"], peaks[f"{name}/huge"]
        assert 10_000 * 10_000 * 3 / 1024 > 0.5 * base  # the crop decoded in full alone would break the bound
        assert huge < 1.5 * base, f"{name}: {huge / 1024:.0f} MB with the huge crop vs {base / 1024:.0f} MB clean"



def test_the_marker_walk_reads_the_frame_header_as_libjpeg_does(shared_data):
    import simplejpeg

    from lesionstack.data.decode import _jpeg_frame

    crops = [p.read_bytes() for p in sorted((shared_data / "isic2024-real-crops").glob("*.jpg"))]
    crops += [_encode(Image.fromarray(_gradient(70, 50)).convert(m), "JPEG") for m in ("RGB", "L", "CMYK")]
    for data in crops:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        frame = _jpeg_frame(data)
        assert frame is not None and frame[:2] == (height, width)
        assert (frame[2] == 4) == (colorspace in ("CMYK", "YCCK"))


def test_an_odd_marker_layout_falls_back_to_pillow_under_the_same_limits():
    from lesionstack.data.decode import _jpeg_frame

    big = _encode(Image.new("RGB", (3000, 2000), (180, 120, 110)), "JPEG")
    app0_end = 4 + struct.unpack(">H", big[4:6])[0]
    odd = big[:app0_end] + b"\x00\x00" + big[app0_end:]  # stray bytes between segments: decoders skip them
    assert _jpeg_frame(odd) is None
    with pytest.raises(ImageTooLargeError, match="ISIC_ODD.*even at 1/8 scale"):
        decode_image(odd, max_pixels=50_000, where="ISIC_ODD")
    out = decode_image(odd, max_pixels=1_000_000)
    assert out.shape[0] * out.shape[1] <= 1_000_000 and out.shape[:2] == (500, 750)  # Pillow's 1/4 draft
