"""Tiny image data sets for the CNN tests: a few dozen 40-px JPEG crops in the competition's HDF5 layout."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import simplejpeg


def crop_jpeg(rng: np.random.Generator, positive: bool, size: int = 40) -> bytes:
    """Skin-coloured noise; positives carry a dark square (an image-only cue a CNN can learn)."""
    image = (rng.random((size, size, 3)) * 60 + 150).astype(np.uint8)
    if positive:
        image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 40
    return simplejpeg.encode_jpeg(image, quality=90)


def make_cnn_data(root: Path, n: int = 24, n_folds: int = 2, n_test: int = 4, corrupt: tuple[str, ...] = (),
                  seed: int = 0) -> Path:
    """Write train-image.hdf5, test-image.hdf5 and folds.csv (every 4th lesion positive) under `root`.

    Ids named in `corrupt` get bytes that are not a JPEG.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    target = (np.arange(n) % 4 == 0).astype(int)
    patients = [f"IP_{(i // 4) % (2 * n_folds):07d}" for i in range(n)]  # blocks of 4: one positive each
    with h5py.File(root / "train-image.hdf5", "w") as h5:
        for isic_id, t in zip(ids, target):
            data = b"not a jpeg at all" if isic_id in corrupt else crop_jpeg(rng, bool(t))
            h5[isic_id] = np.bytes_(data)
    with h5py.File(root / "test-image.hdf5", "w") as h5:
        for i in range(n_test):
            h5[f"ISIC_9{i:06d}"] = np.bytes_(crop_jpeg(rng, i % 2 == 0))
    folds = pd.DataFrame({"isic_id": ids, "patient_id": patients, "target": target,
                          "fold": [int(p[-1]) % n_folds for p in patients]})
    folds.to_csv(root / "folds.csv", index=False)
    return root
