"""Decode one image from its bytes, with a cap on the pixels it may take in memory.

Every place that reads a crop (training, prediction, the report's montage, `score`, `serve`) goes through
`decode_image`, so one oversized or hostile file cannot take the process's memory: a 10,000 x 10,000 px
JPEG of 1.2 MB is 300 MB once decoded at full size.

The limits (documented in docs/troubleshooting.md, "Image decoding limits"):

- `MAX_SOURCE_PIXELS` (2**27, about 134 megapixels, e.g. 11,585 x 11,585): an image that declares more
  is refused as a decompression bomb, before any pixel is decoded.
- `max_pixels` (default `MAX_DECODED_PIXELS`, 2**24, about 16.8 megapixels, 48 MB as RGB): the most
  pixels one decoded image may hold. A baseline JPEG above it is decoded straight at a reduced scale
  (libjpeg's DCT scaling, 1/8 to 7/8: the cost follows the scaled size); a progressive JPEG, a PNG or any
  other format above it is refused (their decoders hold the full image, or all its DCT coefficients).
- `min_side` / `max_side`: what the caller will use. A JPEG is decoded at the smallest scale that keeps
  both sides at least `min_side` (or `max_side`); the result is then shrunk so its longest side is at
  most `max_side` (the longer side of a non-square image may exceed `min_side`).

Formats are sniffed from the bytes (JPEG, PNG; anything else Pillow reads is accepted under the same
limits). Grayscale, CMYK, palette, alpha (composited on white) and 16-bit images all come back as
(H, W, 3) uint8 RGB, and the EXIF orientation of a phone photo is applied.

`decode_input` is the one way image bytes become a model's (S, S, 3) input: training and `predict`
(`CropDataset`), `score` and `serve` all call it, so one file gets one probability whichever command
scores it.
"""

from __future__ import annotations

import io
import math
import os
import struct

import numpy as np

from lesionstack.errors import plain

try:
    import simplejpeg
except ImportError:  # e.g. a Kaggle image without the wheel: Pillow decodes, more slowly
    simplejpeg = None

MAX_SOURCE_PIXELS = 2**27
MAX_DECODED_PIXELS = 2**24
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EXIF_MARKER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112


class CorruptImageError(ValueError):
    """An image that cannot be read or decoded; the message names the isic_id (or file) and where."""

    def __init__(self, isic_id: str, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        where = f" in {path}" if path else ""
        super().__init__(f"image '{isic_id}'{where}: {reason}")
        self.isic_id, self.reason, self.path = isic_id, reason, path

    def __reduce__(self) -> tuple:
        # rebuilt from its own arguments, so it crosses a process pool (a fold worker) intact
        return type(self), (self.isic_id, self.reason, self.path)


class ImageTooLargeError(CorruptImageError):
    """An image above the decoding limits (a decompression bomb, or simply too large to hold)."""


def jpeg_decoder() -> str:
    """Which library decodes JPEG crops here, with its version (the Kaggle kernel prints it)."""
    if simplejpeg is not None:
        return f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo)"
    import PIL

    return f"Pillow {PIL.__version__} (simplejpeg not installed: slower, pixels equal where the DCT scale is)"


def sniff_format(data: bytes) -> str:
    """'JPEG', 'PNG' or 'other', from the first bytes."""
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(PNG_MAGIC):
        return "PNG"
    return "other"


def decode_image(data: bytes, *, min_side: int | None = None, max_side: int | None = None,
                 max_pixels: int = MAX_DECODED_PIXELS, where: str = "image",
                 path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array within the limits above.

    `where` names the image in errors (an isic_id or a file name), `path` the file that holds it.
    Raises `ImageTooLargeError` above the limits and `CorruptImageError` for anything undecodable.
    """
    if not data:
        raise CorruptImageError(where, "empty image data", path)
    fmt = sniff_format(data)
    try:
        if fmt == "JPEG" and simplejpeg is not None:
            array = _decode_jpeg_turbo(data, min_side or max_side, max_pixels, where, path)
        else:
            array = _decode_pillow(data, min_side or max_side, max_pixels, where, path)
    except CorruptImageError:
        raise
    except (ValueError, RuntimeError, OSError, SyntaxError, struct.error) as err:
        raise CorruptImageError(where, f"not a decodable {fmt if fmt != 'other' else 'image'} ({plain(err)})",
                                path) from err
    if max_side and max(array.shape[:2]) > max_side:
        array = shrink(array, max_side)
    return array


def decode_input(data: bytes, size: int, *, max_pixels: int = MAX_DECODED_PIXELS, where: str = "image",
                 path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Image bytes -> a model's (size, size, 3) uint8 input: decoded at the smallest JPEG scale that keeps
    both sides >= `size` (`decode_image`), then resized square (`resize_square`). A JPEG decoded at full
    size and then resized differs by a few 1e-4 in probability, so every command goes through here."""
    return resize_square(decode_image(data, min_side=size, max_pixels=max_pixels, where=where, path=path), size)


def png_exif(data: bytes, max_chunks: int = 100_000) -> bytes | None:
    """A PNG's eXIf chunk, found by walking the chunk headers without inflating any pixel data (Pillow's
    `getexif` decodes the whole image when the chunk is not before the pixels); None without one."""
    i = len(PNG_MAGIC)
    for _ in range(max_chunks):
        if i + 8 > len(data):
            return None
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"eXIf":
            return data[i + 8:i + 8 + length]
        if kind == b"IEND":
            return None
        i += 12 + length
    return None


def _check_source(width: int, height: int, where: str, path: str | os.PathLike[str] | None) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(where, f"declares a size of {width}x{height} px", path)
    if width * height > MAX_SOURCE_PIXELS:
        raise ImageTooLargeError(where, f"{width}x{height} px is above the {MAX_SOURCE_PIXELS:,}-pixel "
                                 "limit for one image (a decompression bomb?); refused", path)


def _jpeg_scale(width: int, height: int, need: int | None, max_pixels: int) -> int | None:
    """The numerator n of the smallest scale n/8 that keeps both sides >= need (full size if no need) and
    the decoded pixels <= max_pixels; None when even 1/8 holds too many pixels."""
    def fits(n: int) -> bool:
        return math.ceil(width * n / 8) * math.ceil(height * n / 8) <= max_pixels

    if fits(8) and (need is None or min(width, height) <= need):
        return 8  # the common case (a crop no larger than the model's input): full size
    largest = next((n for n in range(8, 0, -1) if fits(n)), None)
    if largest is None or need is None:
        return largest
    short = min(width, height)
    return next((n for n in range(1, largest + 1) if math.ceil(short * n / 8) >= need), largest)


def _decode_jpeg_turbo(data: bytes, need: int | None, max_pixels: int, where: str,
                       path: str | os.PathLike[str] | None) -> np.ndarray:
    frame = _jpeg_frame(data)
    if frame is None:  # an odd marker layout: Pillow reads the header and applies the same limits
        return _decode_pillow(data, need, max_pixels, where, path)
    height, width, components, progressive, exif = frame
    _check_source(width, height, where, path)
    if components == 4 or progressive or exif:
        # Pillow converts CMYK/YCCK and applies the EXIF orientation; a progressive JPEG buffers every DCT
        # coefficient of the full image whatever the output scale, so it gets no scaling exemption there
        return _decode_pillow(data, need, max_pixels, where, path)
    n = _jpeg_scale(width, height, need, max_pixels)
    if n is None:
        raise _too_many_pixels(width, height, max_pixels, where, path, scaled=True)
    if n == 8:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height * n / 8),
                                  min_width=math.ceil(width * n / 8))


def _jpeg_frame(data: bytes) -> tuple[int, int, int, bool, bool] | None:
    """(height, width, components, progressive, has EXIF) from the frame header (SOFn), found by one walk
    over the marker segments before it, as libjpeg reads them; None when the walk meets anything else
    (garbage between markers, a scan before the frame, a truncated segment), so the caller falls back to
    Pillow. The pixel limits are checked against these sizes before any pixel is decoded;
    this walk replaces a `decode_jpeg_header` call, the largest part of the cap's per-crop overhead."""
    i, exif, end = 2, False, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: progressive are 2, 6, 10, 14
            if i + 10 > end:
                return None
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return height, width, data[i + 9], marker in (0xC2, 0xC6, 0xCA, 0xCE), exif
        if marker == 0xDA or 0xD0 <= marker <= 0xD9 or marker == 0x01:  # a scan, RSTn/SOI/EOI, TEM: odd here
            return None
        exif = exif or (marker == 0xE1 and data[i + 4:i + 10] == _EXIF_MARKER)
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _too_many_pixels(width: int, height: int, max_pixels: int, where: str, path: str | os.PathLike[str] | None,
                     scaled: bool = False) -> ImageTooLargeError:
    how = "even at 1/8 scale " if scaled else ""
    return ImageTooLargeError(where, f"{width}x{height} px holds {how}more than the {max_pixels:,} pixels allowed "
                              "per decoded image; refused (raise max_pixels only for trusted files)", path)


def _decode_pillow(data: bytes, need: int | None, max_pixels: int, where: str,
                   path: str | os.PathLike[str] | None) -> np.ndarray:
    import warnings

    from PIL import Image

    if data.startswith(PNG_MAGIC) and len(data) >= 24:  # IHDR first: refuse a bomb with its size named
        _check_source(*struct.unpack(">II", data[16:24]), where, path)
    with warnings.catch_warnings():  # Pillow's own bomb warning: our limits are checked below instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return _open_pillow(data, need, max_pixels, where, path)
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(where, f"refused as a decompression bomb ({plain(err)})", path) from err


def _open_pillow(data: bytes, need: int | None, max_pixels: int, where: str,
                 path: str | os.PathLike[str] | None) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        width, height = img.size
        _check_source(width, height, where, path)
        if img.format == "JPEG" and not img.info.get("progressive") and not img.info.get("progression"):
            n = _jpeg_scale(width, height, need, max_pixels)
            if n is None:
                raise _too_many_pixels(width, height, max_pixels, where, path, scaled=True)
            n = _pillow_draft_scale(width, height, n, max_pixels)
            if n < 8:  # Pillow's draft scales by 1/2, 1/4 or 1/8 only, the largest whose floor-divided
                # size still covers the request: ask for the floor, or a 139-px crop wanted at 1/4 comes out at 1/2
                img.draft(img.mode if img.mode in ("RGB", "L") else "RGB",
                          (max(1, width * n // 8), max(1, height * n // 8)))
        elif width * height > max_pixels:
            raise _too_many_pixels(width, height, max_pixels, where, path)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)


def _pillow_draft_scale(width: int, height: int, n: int, max_pixels: int) -> int:
    """libjpeg's n/8 as one of Pillow's draft scales (8, 4, 2, 1 eighths): the next one up keeps the sides
    `n` was chosen for, unless it holds more than `max_pixels`; then the next one down (which fits, as n did)."""
    up = next(p for p in (1, 2, 4, 8) if p >= n)
    if math.ceil(width * up / 8) * math.ceil(height * up / 8) <= max_pixels:
        return up
    return max(p for p in (1, 2, 4, 8) if p <= n)


def _to_rgb(img: object) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB: 16-bit scaled down, alpha composited on white."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 crop resized (bilinear) to (size, size, 3), as every model input is made."""
    from PIL import Image

    if array.shape[:2] == (size, size):
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """An (H, W, 3) uint8 image resized (bilinear, aspect kept) so its longest side is `max_side`."""
    from PIL import Image

    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
