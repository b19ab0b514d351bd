"""The built-in synthetic data set: the competition's layout, with a label both halves can learn.

`write_demo_data(out_dir, DemoSpec(...))` writes `train-metadata.csv` (55 columns), `test-metadata.csv`
(44 columns, different patients), `train-image.hdf5` / `test-image.hdf5` (one `numpy.bytes_` JPEG scalar
per `isic_id`, square crops of 60 to 240 px showing 15 mm of skin), `sample_submission.csv`, a `masks/`
folder in the ISIC 2018 Task 1 layout and `demo-truth.csv` (the true P(malignant) of every lesion).

How the label is made (so the pipeline's halves each have something to learn):
- every lesion has four latent deviations from its own patient's typical lesion (size, darkness, border
  irregularity, colour variation). Each patient has its own baseline for all four, as wide as the spread
  within a patient, so a raw value says less than the same value normalised within the patient: the
  "ugly duckling" signal of the real data;
- every lesion has an image cue, a blue-grey veil inside the lesion whose extent and opacity grow with a
  latent that no metadata column carries;
- logit P(malignant) = b0 + w_tab * ugly_duckling + w_age * age + w_img * cue, with b0 solved so that the
  expected positive rate is `DemoSpec.positive_rate` (3% by default; the real 0.1% would leave a small
  demo with a handful of positives). Labels are drawn from that probability.

Everything is drawn from `numpy.random.default_rng` streams derived from `DemoSpec.seed`: the same seed
writes byte-identical files, whatever the number of worker processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack import provenance
from lesionstack.data.demo_images import _encode, _render_all, draw_cue, render_lesion
from lesionstack.data.demo_tables import CUES, DemoDataError, DemoSpec, DemoTables, _unique_ids, make_tables
from lesionstack.paths import DataPaths

# ----------------------------------------------------------------------------------------- files


def write_demo_data(out_dir: str | os.PathLike[str], spec: DemoSpec | None = None, overwrite: bool = False,
                    workers: int | None = None) -> str:
    """Write the demo data set into `out_dir` (built beside it, then renamed into place); return a summary.

    Refuses a non-empty `out_dir` unless `overwrite`. `workers` (default: all CPU cores, at most 8)
    only changes the speed, never the bytes written.
    """
    spec = spec or DemoSpec()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DemoDataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DemoDataError(f"{out}: folder is not empty; pass overwrite=True (--overwrite) to replace it")
    workers = workers or min(8, os.cpu_count() or 1)
    started = time.perf_counter()
    tables = make_tables(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished data folder is an ordinary one
    try:
        _write_files(DataPaths(tmp), tables, spec, workers)
        for folder in (tmp, DataPaths(tmp).masks):  # masks/ too: a run may name it as its masks_dir
            provenance.mark_synthetic(folder, "ISIC 2024 competition", **asdict(spec))
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return _summary(out, tables, time.perf_counter() - started)


def _write_files(paths: DataPaths, tables: DemoTables, spec: DemoSpec, workers: int) -> None:
    _write_csv(tables.train, paths.train_metadata)
    _write_csv(tables.test, paths.test_metadata)
    _write_csv(pd.DataFrame({"isic_id": tables.test["isic_id"], "target": 0.3}), paths.sample_submission)
    _write_csv(tables.truth.loc[:, ["isic_id", "split", "target", "probability"]], paths.demo_truth)
    paths.masks.mkdir()
    n_train = len(tables.train)
    _write_images(paths.train_images, tables.train["isic_id"], tables.render_train, spec, 0, workers,
                  paths.masks)
    _write_images(paths.test_images, tables.test["isic_id"], tables.render_test, spec, n_train, workers, None)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """CSV as Kaggle writes it (quotes only where needed, missing values empty); polars is 20x faster
    than pandas on the 400,000-row table."""
    import polars as pl

    pl.from_pandas(frame).write_csv(path)


def _write_images(path: Path, ids: pd.Series, render: pd.DataFrame, spec: DemoSpec, offset: int,
                  workers: int, masks: Path | None) -> None:
    """One HDF5 dataset per isic_id holding a numpy.bytes_ scalar of JPEG bytes, as in Kaggle's files."""
    import h5py
    from tqdm.auto import tqdm

    frames = _render_all(render, spec.seed, offset, spec.jpeg_quality, workers)
    with h5py.File(path, "w") as h5:
        for isic_id, (jpeg, png) in tqdm(zip(ids, frames), total=len(ids), desc=path.name, unit="img",
                                         mininterval=1.0):
            h5.create_dataset(isic_id, data=np.bytes_(jpeg), track_times=False)  # same bytes every run
            if png is not None and masks is not None:
                (masks / f"{isic_id}.jpg").write_bytes(jpeg)
                (masks / f"{isic_id}_segmentation.png").write_bytes(png)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto `out`; an old folder is moved aside first and deleted last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _summary(out: Path, tables: DemoTables, seconds: float) -> str:
    from lesionstack.metrics import pauc

    train, truth = tables.train, tables.truth
    tr = truth[truth["split"] == "train"]
    sizes = pd.concat([tables.render_train["size_px"], tables.render_test["size_px"]])
    lines = [
        f"wrote {out} in {seconds:.1f} s",
        f"  train: {len(train):,} lesions of {train['patient_id'].nunique():,} patients, "
        f"{int(train['target'].sum()):,} malignant ({train['target'].mean():.2%})",
        f"  test:  {len(tables.test):,} lesions of {tables.test['patient_id'].nunique():,} other patient(s)",
        f"  images: {sizes.min()}-{sizes.max()} px (median {int(sizes.median())}); "
        f"masks: {int(tables.render_train['write_mask'].sum())}",
    ]
    if 0 < tr["target"].sum() < len(tr):
        y = tr["target"].to_numpy()
        lines.append(
            f"  train pAUC of the true probability {pauc(y, tr['probability']):.4f}; "
            f"tabular half alone {pauc(y, tr['tabular_score']):.4f}; image cue alone {pauc(y, tr['image_cue']):.4f}"
        )
    cues = tables.render_train["dx_cue"].to_numpy()
    if cues.any():
        shown = ", ".join(f"{CUES[c]} {int((cues == c).sum())}" for c in sorted(set(cues) - {0}))
        lines.append(f"  diagnosis cues in train crops: {shown}; every malignant crop shows its subtype's cue and "
                     "no benign crop shows one, so the best possible balanced accuracy (benign, melanoma, basal "
                     "cell carcinoma, squamous cell carcinoma; Indeterminate dropped) is 1.0")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- HAM10000 layout

# class: (share of lesions, lesion RGB, cue). The shares are HAM10000's (nv 67%, mel 11%, ...) tempered by a
# square root, so a few hundred lesions hold enough of the rare classes for 5 stratified folds.
HAM10000_DEMO_CLASSES = {
    "akiec": (0.085, (165, 100, 90), "scale"),
    "bcc": (0.107, (185, 135, 130), "vessels"),
    "bkl": (0.157, (150, 112, 82), "milia"),
    "df": (0.051, (135, 95, 75), "white_centre"),
    "mel": (0.157, (85, 60, 52), "globules"),
    "nv": (0.387, (125, 85, 62), "none"),
    "vasc": (0.056, (150, 45, 75), "none"),  # its sign is the colour: red-purple
}
_HAM_SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot",
              "scalp", "neck", "hand")
_HAM_DX_TYPE = {"nv": ("follow_up", "histo", "consensus"), "df": ("consensus", "histo"),
                "vasc": ("consensus", "histo")}


def ham10000_demo_tables(lesions: int = 300, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(HAM10000_metadata.csv rows, per-image render parameters) for a HAM10000-layout demo: every class
    has at least 6 lesions; each lesion has 1 to 4 images (HAM10000: 10,015 images of 7,470 lesions)."""
    rng = np.random.default_rng([seed, 10])
    names = list(HAM10000_DEMO_CLASSES)
    shares = np.array([HAM10000_DEMO_CLASSES[c][0] for c in names])
    counts = np.maximum(6, np.round(shares / shares.sum() * lesions)).astype(int)
    dx = np.repeat(np.array(names, dtype=object), counts)
    n = len(dx)
    images = 1 + np.minimum(3, rng.poisson(0.35, n))
    lesion_ids = _unique_ids(rng, "HAM_", n)
    image_ids = _unique_ids(rng, "ISIC_", int(images.sum()))
    age = np.clip(np.round(rng.normal(52, 16, n) / 5) * 5, 5, 85)
    sex = rng.choice(np.array(["male", "female"], dtype=object), n, p=[0.54, 0.46])
    site = rng.choice(np.array(_HAM_SITES, dtype=object), n)
    dx_type = [rng.choice(_HAM_DX_TYPE.get(d, ("histo",))) for d in dx]
    lesion = pd.DataFrame({"lesion_id": lesion_ids, "dx": dx, "dx_type": dx_type, "age": age, "sex": sex,
                           "localization": site})
    rows = lesion.iloc[np.repeat(np.arange(n), images)].reset_index(drop=True)
    rows.insert(1, "image_id", image_ids)
    colour = np.array([HAM10000_DEMO_CLASSES[d][1] for d in rows["dx"]], float)
    colour *= np.exp(rng.normal(0, 0.12, (len(rows), 1)))  # per-image lighting: colours overlap a little
    major = np.exp(rng.normal(np.log(6.0), 0.3, n))[np.repeat(np.arange(n), images)]
    render = pd.DataFrame({
        "size_px": 160, "major_mm": major, "minor_mm": major * rng.uniform(0.6, 0.95, len(rows)),
        "angle": rng.uniform(0, np.pi, len(rows)),
        "norm_border": np.where(rows["dx"] == "mel", 6.0, 2.5) + rng.normal(0, 0.8, len(rows)),
        "color_std": rng.uniform(0.3, 1.2, len(rows)), "stdL": rng.uniform(1, 3, len(rows)),
        "skin_r": 220.0, "skin_g": 175.0, "skin_b": 150.0,
        "lesion_r": colour[:, 0], "lesion_g": colour[:, 1], "lesion_b": colour[:, 2], "veil": 0.0,
        "dx_cue": [CUES.index(HAM10000_DEMO_CLASSES[d][2]) for d in rows["dx"]],
    })
    return rows[["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]], render


def write_ham10000_demo(out_dir: str | os.PathLike[str], lesions: int = 300, seed: int = 0,
                        overwrite: bool = False) -> str:
    """Write a small data set in HAM10000's layout: `HAM10000_metadata.csv` and 160 x 120 px JPEGs split
    over `HAM10000_images_part_1/` and `_part_2/`, each class with its own image cue
    (`HAM10000_DEMO_CLASSES`). Every class's cue or colour is drawn on every one of its images, so the best
    possible balanced accuracy is 1.0; what a model reaches below that is what it failed to learn."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DemoDataError(f"{out}: folder is not empty; pass overwrite=True (--overwrite) to replace it")
    meta, render = ham10000_demo_tables(lesions, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)
    try:
        for part in (1, 2):
            (tmp / f"HAM10000_images_part_{part}").mkdir()
        for i, image_id in enumerate(meta["image_id"]):
            p = {c: render[c].iloc[i] for c in render.columns}
            img, mask = render_lesion(p, np.random.default_rng([seed, 11, i]))
            img = draw_cue(img, mask, CUES[p["dx_cue"]], np.random.default_rng([seed, 12, i]))
            part = 1 if i < len(meta) // 2 else 2
            (tmp / f"HAM10000_images_part_{part}" / f"{image_id}.jpg").write_bytes(_encode(img[20:140], 90))
        _write_csv(meta, tmp / "HAM10000_metadata.csv")
        provenance.mark_synthetic(tmp, "HAM10000", lesions=lesions, seed=seed)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    counts = meta["dx"].value_counts().to_dict()
    return (f"wrote {out}: {len(meta)} images of {meta['lesion_id'].nunique()} lesions, HAM10000 layout; "
            f"images per class {counts}; best possible balanced accuracy 1.0 (every image shows its class's cue)")
