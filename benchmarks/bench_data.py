"""Images/s of the HDF5 read + decode path against a bare decode loop over the same JPEG bytes.

    python benchmarks/bench_data.py [--images 20000] [--data-dir DIR]

Without --data-dir it packs real ISIC 2024 crops (../shared/data/isic2024-real-crops, repeated under new
keys) into a temporary HDF5 file laid out like train-image.hdf5, so the bytes are real JPEGs. With
--data-dir it reads that folder's train-image.hdf5. All figures come from this one run, on this machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import simplejpeg
from PIL import Image

from lesionstack.data.hdf5 import H5Images, decode_jpeg

REAL_CROPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic2024-real-crops"


def pack_real_crops(path: Path, n: int) -> list[str]:
    crops = [p.read_bytes() for p in sorted(REAL_CROPS.glob("*.jpg"))]
    if not crops:
        raise SystemExit(f"no real crops at {REAL_CROPS}; pass --data-dir")
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    with h5py.File(path, "w") as h5:
        for i, key in enumerate(ids):
            h5[key] = np.bytes_(crops[i % len(crops)])
    return ids


def rate(fn, items) -> float:
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--min-side", type=int, default=64, help="model input side for the reduced-scale decode")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            h5_path = args.data_dir / "train-image.hdf5"
            ids = H5Images(h5_path).ids[: args.images]
        else:
            h5_path = Path(tmp) / "train-image.hdf5"
            ids = pack_real_crops(h5_path, args.images)
        images = H5Images(h5_path)
        raw = [images.read_bytes(i) for i in ids]  # the same bytes, in memory, for the bare loops
        sides = [simplejpeg.decode_jpeg_header(b)[0] for b in raw]
        rate(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"), raw[:500])  # warm the decoder

        bare = rate(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"), raw)
        pil = rate(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), raw)
        with h5py.File(h5_path, "r") as h5:
            naive = rate(lambda i: simplejpeg.decode_jpeg(bytes(h5[i][()]), colorspace="RGB"), ids)
        cold = H5Images(h5_path)  # a fresh reader, as in a new DataLoader worker: locates every crop
        first = rate(cold.read, ids)
        later = rate(cold.read, ids)
        read_only = rate(cold.read_bytes, ids)
        reduced_bare = rate(lambda b: decode_jpeg(b, "x", min_side=args.min_side), raw)
        reduced = rate(lambda i: cold.read(i, min_side=args.min_side), ids)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, simplejpeg {simplejpeg.__version__}")
    print(f"images: {len(ids)} crops, side median {int(np.median(sides))} px "
          f"(min {min(sides)}, max {max(sides)}), one process, one thread")
    print(f"{'path':<48}{'images/s':>10}{'ratio':>9}")
    rows = [
        ("bare decode (simplejpeg, bytes in memory)", bare),
        ("bare decode (Pillow, bytes in memory)", pil),
        ("h5py h5[id][()] + simplejpeg (naive)", naive),
        ("H5Images.read, first pass (new reader)", first),
        ("H5Images.read, later passes", later),
        ("H5Images.read_bytes only, later passes", read_only),
        (f"bare decode at >= {args.min_side} px (DCT scaling)", reduced_bare),
        (f"H5Images.read at >= {args.min_side} px, later passes", reduced),
    ]
    for name, value in rows:
        print(f"{name:<48}{value:>10.0f}{value / bare:>9.2f}")
    print(f"HDF5 read + decode vs bare decode of the same bytes: first pass {first / bare:.2f}, "
          f"later passes {later / bare:.2f}")


if __name__ == "__main__":
    main()
