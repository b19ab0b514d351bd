"""The synthetic data set's images: a lesion crop rendered from its table row (`render_lesion`, the blue-grey
veil cue included), its mask, and the diagnosis cues (`draw_cue`) of the diagnosis demo sets. Every lesion
draws from its own seeded stream (`lesion_stream`), so the files are byte-identical whatever the number of
worker processes.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
from collections.abc import Iterator

import numpy as np
import pandas as pd

from lesionstack.data.demo_tables import _RENDER_COLUMNS, CROP_MM, CUES, DemoDataError

# ----------------------------------------------------------------------------------------- images

_CHUNK = 256  # images per task sent to a worker process


def _smooth_noise(rng: np.random.Generator, size: int, grid: int, height: int | None = None) -> np.ndarray:
    """Low-frequency noise: a grid x grid normal field, bilinearly upsampled to (height or size) x size."""
    g = rng.standard_normal((grid, grid), dtype=np.float32)
    return _upsampler(height or size, grid) @ g @ _upsampler(size, grid).T


@functools.cache
def _upsampler(size: int, grid: int) -> np.ndarray:
    """The (size, grid) matrix of bilinear interpolation weights (crop sizes repeat: cached)."""
    pos = np.linspace(0, grid - 1, size)
    i0 = np.minimum(pos.astype(np.int64), grid - 2)
    w = np.zeros((size, grid), dtype=np.float32)
    w[np.arange(size), i0] = 1 - (pos - i0)
    w[np.arange(size), i0 + 1] = pos - i0
    return w


@functools.cache
def _grain() -> np.ndarray:
    """A fixed field of sensor noise; each crop takes a random window of it (cheaper than fresh normals)."""
    return np.random.default_rng(2024).normal(0, 3.0, (512, 512)).astype(np.float32)


_ANGLES = 256  # resolution of the border's radius table


def render_lesion(p: dict[str, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one crop: textured skin, an irregular darker lesion, and the blue-grey veil of strength p['veil'].

    Returns the (S, S, 3) uint8 RGB image and its (S, S) bool lesion mask. The lesion is computed only in
    its bounding box, in float32: this is the inner loop of a 400,000-image data set.
    """
    s = int(p["size_px"])
    skin = np.array([p["skin_r"], p["skin_g"], p["skin_b"]], dtype=np.float32)
    # broad shading plus finer mottling: skin is never flat
    shade = (1 + np.float32(0.04) * _smooth_noise(rng, s, 5)
             + np.float32(0.025) * _smooth_noise(rng, s, max(6, s // 8)))[..., None]
    oy, ox = rng.integers(0, 512 - s, 2)
    img = shade * skin + _grain()[oy:oy + s, ox:ox + s, None]  # sensor noise
    mask = np.zeros((s, s), dtype=bool)
    scale = s / CROP_MM
    a, b = max(1.5, 0.5 * p["major_mm"] * scale), max(1.2, 0.5 * p["minor_mm"] * scale)
    cy, cx = s / 2 + rng.normal(0, 0.04 * s, 2)
    border = _border(p["norm_border"], rng)
    soft = 1.0 + 0.12 * min(a, b)  # border blur in px: TBP crops are soft
    # the blurred lesion lies within this many px of its centre (edge below is scaled by the minor axis)
    reach = a * (float(border.max()) + soft / min(a, b)) + 2
    y0, y1 = max(0, int(cy - reach)), min(s, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(s, int(cx + reach) + 1)
    if y1 <= y0 or x1 <= x0:
        return np.clip(img, 0, 255).astype(np.uint8), mask
    y = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5 - cy)
    x = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5 - cx)
    ca, sa = np.float32(np.cos(p["angle"])), np.float32(np.sin(p["angle"]))
    u, v = (x * ca + y * sa) / np.float32(a), (y * ca - x * sa) / np.float32(b)
    rho = np.hypot(u, v)
    edge = (border[_angle_index(u, v)] - rho) * np.float32(min(a, b))  # about the px distance to the border
    alpha = np.clip(edge / np.float32(soft) + np.float32(0.5), 0, 1)[..., None]
    mask[y0:y1, x0:x1] = edge > 0

    lesion = np.array([p["lesion_r"], p["lesion_g"], p["lesion_b"]], dtype=np.float32)
    centre = 1 - np.float32(0.04 * p["stdL"]) * np.clip(1 - rho, 0, 1)  # darker core
    blotch = np.float32(0.07 * p["color_std"]) * _smooth_noise(rng, x1 - x0, 4, y1 - y0)
    tint = np.array([1.0, 0.7, 0.6], dtype=np.float32)  # colour variation leans red-brown
    body = lesion * (centre[..., None] + blotch[..., None] * tint) * shade[y0:y1, x0:x1]
    box = img[y0:y1, x0:x1]
    box += alpha * (_veil(body, lesion, u, v, p["veil"], rng) - box)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _border(norm_border: float, rng: np.random.Generator) -> np.ndarray:
    """Radius of the lesion's border per angle (1 = the ellipse): a few low harmonics, stronger for a
    higher norm_border."""
    k = np.arange(2, 7)
    amp = 0.025 * norm_border * rng.uniform(0.3, 1.0, 5) / np.sqrt(k - 1)
    phase = rng.uniform(0, 2 * np.pi, 5)
    theta = np.linspace(-np.pi, np.pi, _ANGLES + 1)
    return (1 + (amp[:, None] * np.cos(k[:, None] * theta + phase[:, None])).sum(0)).astype(np.float32)


def _angle_index(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return ((np.arctan2(v, u) + np.float32(np.pi)) * np.float32(_ANGLES / (2 * np.pi)) + 0.5).astype(np.intp)


def _veil(body: np.ndarray, lesion: np.ndarray, u: np.ndarray, v: np.ndarray, strength: float,
          rng: np.random.Generator) -> np.ndarray:
    """Blend an off-centre blue-grey blotch into the lesion: the cue that no metadata column carries."""
    if strength < 0.02:
        return body
    du, dv = rng.uniform(-0.4, 0.4, 2).astype(np.float32)
    radius = np.float32(0.35 + 0.4 * strength)  # in units of the lesion's semi-axes
    d2 = ((u - du) ** 2 + (v - dv) ** 2) / radius**2
    weight = (np.float32(0.85 * strength) * np.exp(-d2))[..., None]
    colour = lesion.mean() * np.array([0.8, 0.95, 1.3], dtype=np.float32)  # the lesion's brightness, bluer
    return body + weight * (colour - body)


def _encode(img: np.ndarray, quality: int) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB", colorsubsampling="420")


def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def lesion_stream(seed: int, row: int) -> np.random.Generator:
    """The seeded stream `render_lesion` draws one crop with: `row` counts a split's rows in order, train
    from 0 (so a crop can be drawn again, with its true mask, from `make_tables` alone)."""
    return np.random.default_rng([seed, 1, row])


def _render_chunk(task: tuple[int, int, dict[str, np.ndarray], int]) -> list[tuple[bytes, bytes | None]]:
    """Render rows [start, start + len) of one split; each row has its own seeded stream."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    seed, start, cols, quality = task
    out = []
    with threadpool_limits(1):  # tiny matrix products: BLAS threads would cost 4x more than they save
        for i in range(len(cols["size_px"])):
            p = {name: values[i] for name, values in cols.items()}
            img, mask = render_lesion(p, lesion_stream(seed, start + i))
            if p["dx_cue"]:  # its own stream: crops without a cue keep the bytes they had before cues existed
                img = draw_cue(img, mask, CUES[p["dx_cue"]], np.random.default_rng([seed, 2, start + i]), width=2.0)
            out.append((_encode(img, quality), _png(mask) if p["write_mask"] else None))
    return out


def _render_all(render: pd.DataFrame, seed: int, offset: int, quality: int, workers: int
                ) -> Iterator[tuple[bytes, bytes | None]]:
    """Yield (jpeg, png or None) per row in order, rendered in `workers` processes."""
    cols = {c: render[c].to_numpy() for c in _RENDER_COLUMNS}
    tasks = [(seed, offset + s, {c: v[s:s + _CHUNK] for c, v in cols.items()}, quality)
             for s in range(0, len(render), _CHUNK)]
    if workers <= 1 or len(tasks) <= 2:  # a pool costs about a second to start
        for task in tasks:
            yield from _render_chunk(task)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a fork would copy mid-lock
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for chunk in pool.imap(_render_chunk, tasks):
            yield from chunk


# ----------------------------------------------------------------------------------------- diagnosis cues

def _paint_disc(img: np.ndarray, mask: np.ndarray, cy: float, cx: float, radius: float, colour: tuple,
                alpha: float) -> None:
    """Blend a soft disc of `colour` into `img` (float, in place), only inside the lesion `mask`."""
    r = int(np.ceil(2 * radius)) + 1
    y0, y1 = max(0, int(cy) - r), min(img.shape[0], int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(img.shape[1], int(cx) + r + 1)
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    weight = alpha * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)) * mask[y0:y1, x0:x1]
    img[y0:y1, x0:x1] += weight[..., None] * (np.asarray(colour, np.float32) - img[y0:y1, x0:x1])


def draw_cue(image: np.ndarray, mask: np.ndarray, cue: str, rng: np.random.Generator, width: float = 1.0
             ) -> np.ndarray:
    """Paint one diagnosis cue into a rendered crop (uint8 RGB) inside its lesion mask, at a random strength.

    globules (melanoma): a few dark brown-black dots; vessels (basal cell carcinoma): thin red branching
    lines; scale (squamous cell carcinoma, actinic keratosis): an off-centre white-yellow keratin patch;
    milia (seborrhoeic keratosis): small white dots; white_centre (dermatofibroma): a pale central patch.
    `width` scales the dots and vessels: the ISIC 2024 crops' lesions span a few dozen pixels, so their cues
    are drawn bolder to survive the resize to a demo model's 64 px.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0 or cue == "none":
        return image
    img = image.astype(np.float32)
    strength = rng.uniform(0.6, 1.0)
    radius = np.sqrt(len(ys) / np.pi)  # of a disc with the lesion's area
    pick = lambda: rng.integers(len(ys))  # noqa: E731 - a random pixel of the lesion
    if cue in ("globules", "milia"):
        colour, size = ((40, 28, 30), 0.09) if cue == "globules" else ((240, 238, 225), 0.06)
        for _ in range(rng.integers(4, 9)):
            i = pick()
            _paint_disc(img, mask, ys[i], xs[i], width * max(0.8, size * radius), colour, 0.9 * strength)
    elif cue == "vessels":
        for _ in range(rng.integers(2, 4)):  # random walks of small red discs: branching vessels
            i = pick()
            y, x, heading = float(ys[i]), float(xs[i]), rng.uniform(0, 2 * np.pi)
            for _ in range(int(1.2 * radius)):
                _paint_disc(img, mask, y, x, 0.7 * width, (185, 35, 45), 0.8 * strength)
                heading += rng.normal(0, 0.35)
                y, x = y + np.sin(heading), x + np.cos(heading)
    elif cue == "scale":
        i = pick()
        cy, cx = (ys[i] + ys.mean()) / 2, (xs[i] + xs.mean()) / 2
        _paint_disc(img, mask, cy, cx, 0.4 * radius, (236, 226, 190), 0.85 * strength)
    elif cue == "white_centre":
        _paint_disc(img, mask, ys.mean(), xs.mean(), 0.3 * radius, (225, 205, 195), 0.8 * strength)
    else:
        raise DemoDataError(f"unknown diagnosis cue {cue!r}; known: {CUES}")
    return np.clip(img, 0, 255).astype(np.uint8)
