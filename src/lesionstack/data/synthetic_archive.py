"""A small synthetic ISIC Archive download (`demo-data --archive N`), in the layout `isic image download`
writes (`lesionstack.data.archive`): `<isic_id>.JPG` files and a `metadata.csv` of the archive's columns.

Its images are drawn by the demo's own generator (`demo_tables.make_tables` / `demo_images.render_lesion`) from another
seed stream, so they carry the demo's hidden image cue (the blue-grey veil) with the same meaning: a model
pretrained on them has learnt something the competition-layout demo rewards. Archive records are labelled
from images (dermoscopy, histopathology), so the label leans on the image more than the demo's does
(`IMAGE_WEIGHT`, `TABULAR_WEIGHT`), and malignant records are enriched (`POSITIVE_RATE`), as the archive's
are. A share of the benign-labelled records with the strongest cue are "Indeterminate" (`INDETERMINATE`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack import provenance
from lesionstack.data.archive import ARCHIVE_METADATA
from lesionstack.data.demo_images import lesion_stream, render_lesion
from lesionstack.data.demo_tables import make_tables
from lesionstack.data.synthetic import DemoDataError, DemoSpec, _encode, _replace_dir, _write_csv

SEED_OFFSET = 7919  # the archive's tables are drawn from seed + this, never the competition set's own
POSITIVE_RATE = 0.2
IMAGE_WEIGHT = 3.0
TABULAR_WEIGHT = 1.0
INDETERMINATE = 0.05  # of the benign records: those with the strongest cue
_DIAGNOSIS_2 = {"Benign": "Benign melanocytic proliferations", "Malignant":
                "Malignant melanocytic proliferations (Melanoma)",
                "Indeterminate": "Indeterminate melanocytic proliferations"}


def archive_tables(images: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metadata.csv rows, render parameters) of `images` archive records drawn from `seed`."""
    spec = DemoSpec(patients=max(2, images // 10),  # ~30 lesions each: 3x the rows needed, drawn without images
                    seed=seed + SEED_OFFSET, positive_rate=POSITIVE_RATE,
                    image_weight=IMAGE_WEIGHT, tabular_weight=TABULAR_WEIGHT, mask_count=0)
    tables = make_tables(spec)
    truth = tables.truth[tables.truth["split"] == "train"].reset_index(drop=True)
    n = min(images, len(truth))
    rows = np.sort(np.random.default_rng([spec.seed, 3]).choice(len(truth), size=n, replace=False))
    truth, train, render = truth.iloc[rows], tables.train.iloc[rows], tables.render_train.iloc[rows]
    first = np.where(truth["target"].to_numpy() == 1, "Malignant", "Benign").astype(object)
    benign = np.flatnonzero(first == "Benign")
    cue = truth["image_cue"].to_numpy()[benign]
    n_ind = int(round(INDETERMINATE * len(benign)))
    first[benign[np.argsort(-cue, kind="stable")[:n_ind]]] = "Indeterminate"
    meta = pd.DataFrame({
        "isic_id": train["isic_id"].to_numpy(), "attribution": "lesionstack synthetic archive",
        "copyright_license": "CC-0", "age_approx": train["age_approx"].to_numpy(),
        "anatom_site_general": train["anatom_site_general"].to_numpy(),
        "benign_malignant": [v.lower() for v in first], "diagnosis_1": first,
        "diagnosis_2": [_DIAGNOSIS_2[v] for v in first], "diagnosis_3": None, "diagnosis_4": None,
        "diagnosis_5": None, "image_type": "dermoscopic", "sex": train["sex"].to_numpy(),
    })
    return meta, render.reset_index(drop=True)


def write_archive_demo(out_dir: str | os.PathLike[str], images: int = 1000, seed: int = 0,
                       overwrite: bool = False, jpeg_quality: int = 90) -> str:
    """Write the folder (built beside `out_dir`, then renamed into place); return a one-paragraph summary."""
    if images < 10:
        raise DemoDataError(f"--archive {images}: write at least 10 archive images")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DemoDataError(f"{out}: folder is not empty; pass overwrite=True (--overwrite) to replace it")
    meta, render = archive_tables(images, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside `out`, renamed into place when complete; the context removes it if anything failed
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".partial", dir=out.parent,
                                     ignore_cleanup_errors=True) as building:
        tmp = Path(building)
        for i, isic_id in enumerate(meta["isic_id"]):
            p = {c: render[c].iloc[i] for c in render.columns}
            img, _ = render_lesion(p, lesion_stream(seed + SEED_OFFSET, i))
            (tmp / f"{isic_id}.JPG").write_bytes(_encode(img, jpeg_quality))
        _write_csv(meta, tmp / ARCHIVE_METADATA)
        (tmp / "attribution.txt").write_text("lesionstack synthetic archive (no real images)\n", encoding="utf-8")
        provenance.mark_synthetic(tmp, "ISIC Archive download", images=images, seed=seed)
        tmp.chmod(0o755)  # an ordinary folder once finished
        _replace_dir(tmp, out)
    counts = meta["diagnosis_1"].value_counts().to_dict()
    return (f"wrote {out}: {len(meta)} synthetic ISIC Archive images in the `isic image download` layout "
            f"(<isic_id>.JPG + {ARCHIVE_METADATA}); diagnosis_1 {counts}")

