"""What an upload to `serve` may be: a multipart body parsed in memory, a JPEG/PNG decoded under caps, and
the optional clinical fields checked against the competition's vocabulary.

Nothing here touches the disk. Starlette's own form parser spools a file part over 1 MiB to a temporary
file, so the server reads the raw body into memory (under a byte cap) and parses it with python-multipart's
callback parser, whose parts land in `bytearray`s.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lesionstack.data.decode import (
    MAX_DECODED_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    decode_image,
    png_exif,
    sniff_format,
)
from lesionstack.data.schema import CATEGORY_VALUES
from lesionstack.errors import plain

EXIF_ORIENTATION = 0x0112
SITES = CATEGORY_VALUES["anatom_site_general"]
SEXES = CATEGORY_VALUES["sex"]
AGE_RANGE = (0.0, 120.0)  # years; the competition's age_approx runs 5..85 in steps of 5
DIAMETER_RANGE = (0.1, 100.0)  # mm, clin_size_long_diam_mm: about 1..30 in the real data


class UploadError(ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple:
        return type(self), (self.status, str(self))


@dataclass
class Limits:
    """Caps on one upload. A 12-megapixel phone photo is about 5 MB and 12 M pixels. A larger JPEG is decoded
    at a reduced scale under `max_pixels`; a larger PNG is refused (see `decode_image`)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_DECODED_PIXELS
    min_side: int = 32


@dataclass
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8, EXIF rotation applied
    format: str  # JPEG or PNG
    mode: str  # the file's Pillow mode before conversion (L, RGB, RGBA, CMYK, I;16 ...)
    notes: list[str] = field(default_factory=list)  # what was done to the pixels, shown to the user
    data: bytes = b""  # the file itself: the model's input is made from it as `score` makes it (`decode_input`)


# ---- the multipart body -------------------------------------------------------------------------------


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """Parts of a multipart/form-data body by field name, all in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError(415, "send multipart/form-data with an 'image' file field")
    parts: dict[str, Part] = {}
    current, header = Part(), [b"", b""]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        name, value = header[0].decode("latin-1").lower(), header[1]
        if name == "content-disposition":
            _, disp = parse_options_header(value)
            current.name = disp.get(b"name", b"").decode("utf-8", "replace")
            filename = disp.get(b"filename")
            current.filename = None if filename is None else filename.decode("utf-8", "replace")
        elif name == "content-type":
            current.content_type = value.decode("latin-1")
        header[0], header[1] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.data += data[start:end]

    def on_part_end() -> None:
        nonlocal current
        parts[current.name] = current
        current = Part()

    callbacks: Any = {"on_header_field": on_header_field, "on_header_value": on_header_value,
                      "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end}
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except Exception as err:  # python-multipart raises its own MultipartParseError and plain ValueErrors
        raise UploadError(400, f"malformed multipart body: {err}") from err
    return parts


# ---- the image ----------------------------------------------------------------------------------------


def sniff(data: bytes) -> str:
    """JPEG or PNG from the first bytes; anything else is refused whatever its name or declared type."""
    if not data:
        raise UploadError(400, "the image file is empty (0 bytes)")
    kind = sniff_format(data)
    if kind in ("JPEG", "PNG"):
        return kind
    raise UploadError(415, "not a JPEG or PNG image (judged by its first bytes, not its name)")


def decode_upload(data: bytes, limits: Limits = Limits()) -> DecodedImage:
    """Bytes -> RGB uint8 with EXIF rotation applied; every refusal is an `UploadError` with a status.

    The pixels come from `lesionstack.data.decode.decode_image` (the project's one decoder: bomb and
    pixel caps, modes, EXIF); this adds the upload's own rules (JPEG/PNG only, byte cap, smallest side)
    and says in `notes` what was done to the pixels, from the header."""
    if len(data) > limits.max_bytes:
        raise UploadError(413, f"the image is {len(data):,} bytes; the limit is {limits.max_bytes:,}")
    kind = sniff(data)
    mode, orientation, (width, height) = _header(data, kind)
    if min(width, height) < limits.min_side:
        raise UploadError(422, f"the image is {width}x{height} px; the model needs at least "
                               f"{limits.min_side} px on each side")
    try:
        rgb = decode_image(data, max_pixels=limits.max_pixels, where="upload")
    except ImageTooLargeError as err:
        raise UploadError(413, f"the image is too large to decode: {_reason(err)}") from err
    except CorruptImageError as err:
        raise UploadError(422, f"cannot decode this {kind} (truncated or corrupt?): {_reason(err)}") from err
    notes = _notes(mode, orientation)
    if rgb.shape[0] * rgb.shape[1] < width * height:
        notes.append(f"decoded at a reduced scale from {width}x{height} px (over {limits.max_pixels:,} pixels)")
    return DecodedImage(rgb=np.ascontiguousarray(rgb), format=kind, mode=mode, notes=notes, data=data)


def _reason(err: Exception) -> str:
    return str(err).removeprefix("image 'upload': ")


def _header(data: bytes, kind: str) -> tuple[str, int, tuple[int, int]]:
    """(Pillow mode, EXIF orientation, (width, height)) from the header alone, no pixel decoded: bounded
    time and memory whatever size the file declares."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: decode_image applies the project's limits
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind])
        with img:
            return img.mode, _orientation(img, data, kind), img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UploadError(422, f"cannot read this {kind}'s header (truncated or corrupt?): {plain(err)}") from err
    except Image.DecompressionBombError as err:  # Pillow's own cap, at open: refused as decode_image would
        raise UploadError(413, f"the image is too large to decode: {plain(err)}") from err


def _orientation(img: Image.Image, data: bytes, kind: str) -> int:
    """The EXIF orientation tag (1 without one). A JPEG's EXIF is read with its header; a PNG's `getexif`
    would decode every pixel (a 12,000-px square: seconds and hundreds of MB) unless its eXIf chunk comes
    first, so the chunk is found by walking the chunk headers instead."""
    if kind != "PNG":
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    raw = png_exif(data)
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(EXIF_ORIENTATION, 1))


def _notes(mode: str, orientation: int) -> list[str]:
    """What decoding did to the pixels, for the person who uploaded them."""
    notes = [f"EXIF orientation {orientation} applied"] if orientation != 1 else []
    if mode.startswith("I;16") or mode == "I":
        notes.append("16-bit image reduced to 8 bits")
    if mode in ("RGBA", "LA", "PA", "P"):
        notes.append("transparency composited on white" if mode != "P" else "palette image converted to RGB")
    if mode in ("L", "1", "LA") or mode.startswith("I"):
        notes.append("grayscale image: the model was trained on colour photos")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return notes


# ---- the clinical fields ------------------------------------------------------------------------------


def _number(name: str, text: str, bounds: tuple[float, float], unit: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise UploadError(422, f"{name} must be a number, got {text!r}") from err
    low, high = bounds
    if not math.isfinite(value) or not low <= value <= high:
        raise UploadError(422, f"{name} must be between {low:g} and {high:g} {unit}, got {text!r}")
    return value


def parse_metadata(fields: dict[str, str]) -> dict[str, Any]:
    """The optional fields (age, sex, anatomical site, long diameter) in the competition's column names.
    Blank means not given; anything else must be valid, or the request is refused naming the field."""
    out: dict[str, Any] = {}
    given = {k: v.strip() for k, v in fields.items() if v is not None and v.strip()}
    if "age" in given:
        out["age_approx"] = _number("age", given["age"], AGE_RANGE, "years")
    if "sex" in given:
        if given["sex"].lower() not in SEXES:
            raise UploadError(422, f"sex must be one of {list(SEXES)}, got {given['sex']!r}")
        out["sex"] = given["sex"].lower()
    if "site" in given:
        if given["site"].lower() not in SITES:
            raise UploadError(422, f"site must be one of {list(SITES)}, got {given['site']!r}")
        out["anatom_site_general"] = given["site"].lower()
    if "diameter_mm" in given:
        out["clin_size_long_diam_mm"] = _number("diameter_mm", given["diameter_mm"], DIAMETER_RANGE, "mm")
    return out
