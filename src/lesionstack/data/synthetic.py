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

import functools
import io
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lesionstack.data import schema
from lesionstack.paths import DataPaths

CROP_MM = 15.0  # a TBP close-up tile shows 15 x 15 mm of skin
_CHUNK = 256  # images per task sent to a worker process

# Probabilities below follow the first 1,000 rows of the real train-metadata.csv.
_SITES = ("posterior torso", "lower extremity", "anterior torso", "upper extremity", "head/neck")
_SITE_P = (0.28, 0.26, 0.23, 0.18, 0.05)
_SITE_MISSING = 0.01
_ATTRIBUTIONS = schema.CATEGORY_VALUES["attribution"]
_ATTRIBUTION_P = (0.32, 0.09, 0.24, 0.16, 0.14, 0.025, 0.025)
_LICENSE_OF = {  # each institution publishes under one licence
    _ATTRIBUTIONS[0]: "CC-BY", _ATTRIBUTIONS[1]: "CC-0", _ATTRIBUTIONS[2]: "CC-BY-NC",
    _ATTRIBUTIONS[3]: "CC-BY-NC", _ATTRIBUTIONS[4]: "CC-BY", _ATTRIBUTIONS[5]: "CC-BY",
    _ATTRIBUTIONS[6]: "CC-BY-NC",
}
# (iddx_full, weight) of the malignant diagnoses; basal cell carcinoma dominates the real positives.
_MALIGNANT = (
    ("Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma::"
     "Basal cell carcinoma, Nodular", 0.25),
    ("Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma::"
     "Basal cell carcinoma, Superficial", 0.15),
    ("Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma", 0.12),
    ("Malignant::Malignant epidermal proliferations::Squamous cell carcinoma in situ", 0.14),
    ("Malignant::Malignant epidermal proliferations::Squamous cell carcinoma, Invasive", 0.09),
    ("Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ", 0.13),
    ("Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive", 0.08),
    ("Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma, NOS", 0.04),
)
_BENIGN = (
    ("Benign", 0.95),
    ("Benign::Benign melanocytic proliferations::Nevus", 0.03),
    ("Indeterminate::Indeterminate melanocytic proliferations::Atypical melanocytic neoplasm", 0.02),
)
_MITOTIC = ("<1/mm^2", "1/mm^2", "2/mm^2", "3/mm^2", ">4/mm^2")

# Columns the renderer needs, taken from the metadata plus the hidden image cue.
_RENDER_COLUMNS = ("size_px", "major_mm", "minor_mm", "angle", "norm_border", "color_std", "stdL",
                   "skin_r", "skin_g", "skin_b", "lesion_r", "lesion_g", "lesion_b", "veil", "write_mask",
                   "dx_cue")


class DemoDataError(ValueError):
    """A bad DemoSpec or an output folder the generator may not write into."""


@dataclass(frozen=True)
class DemoSpec:
    """What `write_demo_data` generates. The same spec (seed included) gives byte-identical files."""

    patients: int = 100  # training patients
    lesions_per_patient: float = 30.0  # mean; counts per patient are skewed like the real data's
    seed: int = 0
    test_fraction: float = 0.1  # test patients = round(patients * test_fraction), at least 1
    positive_rate: float = 0.03  # expected share of malignant lesions (real data: 0.1%)
    mask_count: int = 300  # training crops copied to masks/ with their segmentation
    tabular_weight: float = 2.0  # logit weight of the patient-relative "ugly duckling" score
    image_weight: float = 1.8  # logit weight of the image-only cue
    age_weight: float = 0.3  # logit weight of standardised age
    jpeg_quality: int = 90
    # True: malignant crops also show a cue of their diagnosis (melanoma: dark globules, basal cell carcinoma:
    # red branching vessels, squamous cell carcinoma: a white-yellow keratin scale), drawn from a separate
    # random stream after the crop, so the metadata and every other crop stay byte-identical to False
    diagnosis_cues: bool = False

    def __post_init__(self) -> None:
        checks = {
            "patients": self.patients >= 1,
            "lesions_per_patient": self.lesions_per_patient >= 1,
            "test_fraction": 0 <= self.test_fraction <= 10,
            "positive_rate": 0 < self.positive_rate < 0.5,
            "mask_count": self.mask_count >= 0,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
        }
        for name, ok in checks.items():
            if not ok:
                raise DemoDataError(f"DemoSpec.{name}={getattr(self, name)!r} is out of range")

    @property
    def test_patients(self) -> int:
        return max(1, round(self.patients * self.test_fraction))


@dataclass
class DemoTables:
    """Everything `make_tables` draws; `truth` also holds the two latent halves of the label."""

    train: pd.DataFrame  # schema.TRAIN_COLUMNS
    test: pd.DataFrame  # schema.TEST_COLUMNS
    truth: pd.DataFrame  # isic_id, split, target, probability, tabular_score, image_cue
    render_train: pd.DataFrame  # _RENDER_COLUMNS, row-aligned with train
    render_test: pd.DataFrame


# ----------------------------------------------------------------------------------------- tables


def make_tables(spec: DemoSpec) -> DemoTables:
    """Draw the metadata, the labels and the rendering parameters of a demo data set (no files)."""
    rng = np.random.default_rng([spec.seed, 0])
    n_train_p, n_test_p = spec.patients, spec.test_patients
    counts = _lesion_counts(rng, n_train_p, spec.lesions_per_patient)
    test_counts = _lesion_counts(rng, n_test_p, spec.lesions_per_patient)
    n_rows = int(counts.sum() + test_counts.sum())
    isic_ids = _unique_ids(rng, "ISIC_", n_rows)
    patient_ids = _unique_ids(rng, "IP_", n_train_p + n_test_p)
    patients = _patients(rng, patient_ids)
    rows = _lesions(rng, patients, np.concatenate([counts, test_counts]))
    rows.insert(0, "isic_id", isic_ids)
    latent = _latents(rng, rows)
    _observe(rng, rows, latent)
    prob, latent["tabular_logit"] = _probability(rows, latent, spec)
    rows["target"] = (rng.random(n_rows) < prob).astype(np.int64)
    is_train = rows["patient_index"].to_numpy() < n_train_p
    _train_only(rng, rows)
    render = _render_params(rng, rows, latent, spec, is_train)
    truth = pd.DataFrame({
        "isic_id": rows["isic_id"], "split": np.where(is_train, "train", "test"),
        "target": rows["target"], "probability": prob,
        "tabular_score": latent["tabular_logit"], "image_cue": latent["cue"],
    })
    order_tr = np.argsort(rows["isic_id"].to_numpy()[is_train], kind="stable")  # Kaggle sorts by id
    order_te = np.argsort(rows["isic_id"].to_numpy()[~is_train], kind="stable")
    train = rows[is_train].iloc[order_tr].reset_index(drop=True)
    test = rows[~is_train].iloc[order_te].reset_index(drop=True)
    return DemoTables(
        train=train.loc[:, list(schema.TRAIN_COLUMNS)],
        test=test.loc[:, list(schema.TEST_COLUMNS)],
        truth=pd.concat([truth[is_train].iloc[order_tr], truth[~is_train].iloc[order_te]],
                        ignore_index=True),
        render_train=render[is_train].iloc[order_tr].reset_index(drop=True),
        render_test=render[~is_train].iloc[order_te].reset_index(drop=True),
    )


def _lesion_counts(rng: np.random.Generator, n_patients: int, mean: float) -> np.ndarray:
    """Lesions per patient: at least one each, the rest shared by gamma weights (a long right tail)."""
    total = max(n_patients, round(n_patients * mean))
    weights = rng.gamma(0.8, size=n_patients)
    return 1 + rng.multinomial(total - n_patients, weights / weights.sum())


def _unique_ids(rng: np.random.Generator, prefix: str, n: int) -> np.ndarray:
    """n distinct ids of seven digits, like ISIC_0015670 and IP_1235828."""
    if n > 9_000_000:
        raise DemoDataError(f"cannot draw {n} distinct seven-digit ids")
    numbers = rng.choice(10_000_000, size=n, replace=False)
    return np.array([f"{prefix}{k:07d}" for k in numbers], dtype=object)


def _patients(rng: np.random.Generator, patient_ids: np.ndarray) -> pd.DataFrame:
    """One row per patient: demographics, institution, tile type, skin colour and lesion baselines."""
    n = len(patient_ids)
    age = np.clip(np.round(rng.normal(58, 13, n) / 5) * 5, 15, 85)
    age[rng.random(n) < 0.01] = np.nan
    sex = rng.choice(np.array(["male", "female"], dtype=object), n, p=[0.68, 0.32])
    sex[rng.random(n) < 0.03] = None
    attribution = rng.choice(np.array(_ATTRIBUTIONS, dtype=object), n, p=_ATTRIBUTION_P)
    return pd.DataFrame({
        "patient_id": patient_ids, "age_approx": age, "sex": sex, "attribution": attribution,
        "copyright_license": [_LICENSE_OF[a] for a in attribution],
        "tbp_tile_type": rng.choice(np.array(["3D: XP", "3D: white"], dtype=object), n, p=[0.71, 0.29]),
        "skin_L": np.clip(rng.normal(51.5, 11, n), 20, 85), "skin_A": rng.normal(15, 3.3, n),
        "skin_B": rng.normal(26.9, 4.2, n),
        # each patient's typical lesion: as much spread between patients as within one
        "base_size": rng.normal(np.log(3.2), 0.22, n), "base_dark": rng.normal(np.log(8.3), 0.25, n),
        "base_border": rng.normal(3.2, 1.0, n), "base_color": rng.normal(0.95, 0.45, n),
    })


def _lesions(rng: np.random.Generator, patients: pd.DataFrame, counts: np.ndarray) -> pd.DataFrame:
    """One row per lesion with the patient's columns and the lesion's body site."""
    index = np.repeat(np.arange(len(patients)), counts)
    rows = patients.iloc[index].reset_index(drop=True)
    rows.insert(0, "patient_index", index)
    n = len(rows)
    site = rng.choice(np.array(_SITES, dtype=object), n, p=_SITE_P)
    missing = rng.random(n) < _SITE_MISSING
    site[missing] = None
    location, simple = _locations(rng, site)
    rows["anatom_site_general"] = site
    rows["tbp_lv_location"] = location
    rows["tbp_lv_location_simple"] = simple
    x, y, z = _body_coordinates(rng, location)
    rows["tbp_lv_x"], rows["tbp_lv_y"], rows["tbp_lv_z"] = x, y, z
    rows["image_type"] = "TBP tile: close-up"
    return rows


def _locations(rng: np.random.Generator, site: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detailed and simple location strings consistent with the general site."""
    n = len(site)
    side = np.where(rng.random(n) < 0.5, "Left", "Right").astype(object)
    u = rng.random(n)
    limb = np.where(site == "upper extremity", " Arm", " Leg").astype(object)
    upper_share = np.where(site == "upper extremity", 0.72, 0.52)
    part = np.where(u < 0.03, "", np.where(u < upper_share, " - Upper", " - Lower")).astype(object)
    is_limb = (site == "upper extremity") | (site == "lower extremity")
    simple = np.select(
        [site == "head/neck", is_limb, site == "anterior torso", site == "posterior torso"],
        ["Head & Neck", side + limb, "Torso Front", "Torso Back"], "Unknown")
    location = np.select(
        [site == "head/neck", is_limb, site == "anterior torso", site == "posterior torso"],
        ["Head & Neck", side + limb + part,
         np.where(u < 0.69, "Torso Front Top Half", "Torso Front Bottom Half"),
         np.where(u < 0.56, "Torso Back Top Third",
                  np.where(u < 0.94, "Torso Back Middle Third", "Torso Back Bottom Third"))],
        "Unknown")
    return location.astype(object), simple.astype(object)


_BODY = {  # location prefix: (x mean, x sd, y mean, y sd, z mean, z sd), in the real data's units
    "Head": (15, 55, 1560, 120, -38, 70), "Torso Front": (0, 115, 1190, 190, -39, 70),
    "Torso Back": (0, 105, 1240, 190, 132, 58), "Left Arm": (-290, 120, 1250, 180, 48, 64),
    "Right Arm": (300, 120, 1250, 180, 48, 64), "Left Leg": (-165, 70, 470, 210, 55, 59),
    "Right Leg": (150, 70, 470, 210, 55, 59), "Unknown": (0, 200, 1000, 400, 50, 90),
}


def _body_coordinates(rng: np.random.Generator, location: np.ndarray) -> tuple[np.ndarray, ...]:
    """3D position on the body model (mm): height from the site, x from the side, z front or back."""
    codes, names = pd.factorize(location)
    params = np.array([next(v for k, v in _BODY.items() if name.startswith(k)) for name in names], dtype=float)
    shift = np.array([150.0 if ("Upper" in m or "Top" in m) else -150.0 if ("Lower" in m or "Bottom" in m)
                      else 0.0 for m in names])
    params, shift = params[codes], shift[codes]
    noise = rng.standard_normal((len(location), 3))
    x = params[:, 0] + params[:, 1] * noise[:, 0]
    y = params[:, 2] + shift + params[:, 3] * 0.8 * noise[:, 1]
    z = params[:, 4] + params[:, 5] * noise[:, 2]
    return x, y, z


def _latents(rng: np.random.Generator, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-lesion deviations from the patient's typical lesion, and the hidden image cue."""
    n = len(rows)
    z = {k: rng.standard_normal(n) for k in ("size", "dark", "border", "color")}
    z["tabular"] = (z["size"] + z["dark"] + z["border"] + z["color"]) / 2.0  # unit variance
    z["cue"] = rng.standard_normal(n)
    return z


def _observe(rng: np.random.Generator, rows: pd.DataFrame, z: dict[str, np.ndarray]) -> None:
    """Fill the 44 test columns' measurements from the patient baselines plus the lesion latents."""
    n = len(rows)
    noise = lambda sd: rng.normal(0.0, sd, n)  # noqa: E731 - measurement noise of one column
    major = np.maximum(1.0, np.exp(rows["base_size"] + 0.30 * z["size"] + noise(0.08)))
    ecc = rng.beta(5.9, 2.1, n)
    minor = np.maximum(0.8, major * np.sqrt(1 - ecc**2))
    border = np.clip(rows["base_border"] + 1.2 * z["border"] + noise(0.3), 0.7, 10.0)
    dark = np.clip(np.exp(rows["base_dark"] + 0.28 * z["dark"] + noise(0.08)), 2.5, 30.0)
    color_std = np.maximum(0.0, rows["base_color"] + 0.5 * z["color"] + noise(0.15))
    lext = np.clip(rows["skin_L"] + noise(2.5), 15, 90)
    aext, bext = rows["skin_A"] + noise(1.2), rows["skin_B"] + noise(1.5)
    d_a = 5.2 + 0.35 * (dark - 8.5) + noise(2.3)
    d_b = 1.4 - 0.15 * (dark - 8.5) + noise(2.0)
    lum = np.maximum(5.0, lext - dark)
    a, b = aext + d_a, bext + d_b
    area = np.pi / 4 * major * minor * (1 - 0.012 * border) * rng.uniform(0.85, 0.97, n)
    perimeter = _ellipse_perimeter(major / 2, minor / 2) * (1 + 0.045 * border) * np.exp(noise(0.03))
    delta_lb = np.hypot(lum - lext, d_b) * np.exp(0.015 + noise(0.02))
    cols = {
        "clin_size_long_diam_mm": np.round(major, 2),
        "tbp_lv_A": a, "tbp_lv_Aext": aext, "tbp_lv_B": b, "tbp_lv_Bext": bext,
        "tbp_lv_C": np.hypot(a, b), "tbp_lv_Cext": np.hypot(aext, bext),
        "tbp_lv_H": np.degrees(np.arctan2(b, a)), "tbp_lv_Hext": np.degrees(np.arctan2(bext, aext)),
        "tbp_lv_L": lum, "tbp_lv_Lext": lext, "tbp_lv_areaMM2": area,
        "tbp_lv_area_perim_ratio": perimeter**2 / area, "tbp_lv_color_std_mean": color_std,
        "tbp_lv_deltaA": d_a, "tbp_lv_deltaB": d_b, "tbp_lv_deltaL": lum - lext, "tbp_lv_deltaLB": delta_lb,
        "tbp_lv_deltaLBnorm": np.maximum(2.5, 0.74 * delta_lb * np.exp(noise(0.08))),
        "tbp_lv_eccentricity": ecc, "tbp_lv_minorAxisMM": minor,
        "tbp_lv_nevi_confidence": 100 / (1 + np.exp(-(-0.5 + 0.35 * (dark - 8.5) - 0.5 * (border - 3.2)
                                                      + noise(5.0)))),
        "tbp_lv_norm_border": border,
        "tbp_lv_norm_color": np.clip(2.9 * color_std * np.exp(noise(0.08)), 0, 10),
        "tbp_lv_perimeterMM": perimeter,
        "tbp_lv_radial_color_std_max": color_std * np.exp(noise(0.2)),
        "tbp_lv_stdL": 0.3 + 0.22 * dark * np.exp(noise(0.25)),
        "tbp_lv_stdLExt": np.exp(np.log(2.16) + noise(0.3)),
        "tbp_lv_symm_2axis": np.clip(0.12 + 0.055 * border + noise(0.04), 0.06, 0.75),
        "tbp_lv_symm_2axis_angle": rng.integers(0, 36, n) * 5,
    }
    for name, values in cols.items():
        rows[name] = np.asarray(values)


def _ellipse_perimeter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ramanujan's approximation of an ellipse's perimeter from its semi-axes."""
    return np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))


def _probability(rows: pd.DataFrame, z: dict[str, np.ndarray], spec: DemoSpec
                 ) -> tuple[np.ndarray, np.ndarray]:
    """True P(malignant) (the logistic model of the module docstring, intercept set to the target rate)
    and the tabular part of its logit."""
    age = rows["age_approx"].fillna(58.0).to_numpy()
    tabular = spec.tabular_weight * z["tabular"] + spec.age_weight * (age - 58) / 13
    part = tabular + spec.image_weight * z["cue"]
    lo, hi = -30.0, 10.0
    for _ in range(60):  # bisection: the mean probability is increasing in the intercept
        mid = (lo + hi) / 2
        if _sigmoid(mid + part).mean() < spec.positive_rate:
            lo = mid
        else:
            hi = mid
    return _sigmoid((lo + hi) / 2 + part), tabular


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _train_only(rng: np.random.Generator, rows: pd.DataFrame) -> None:
    """Diagnosis columns that exist only in train-metadata.csv, consistent with the label."""
    n = len(rows)
    pos = rows["target"].to_numpy() == 1
    lesion_ids = _unique_ids(rng, "IL_", n)
    has_lesion_id = pos | (rng.random(n) < 0.06)  # all positives, and a few biopsied benign lesions
    rows["lesion_id"] = np.where(has_lesion_id, lesion_ids, None)
    table = _BENIGN + _MALIGNANT
    benign = _draw_index(rng, _BENIGN, n)
    malignant = len(_BENIGN) + _draw_index(rng, _MALIGNANT, n)
    iddx = np.where(pos, malignant, benign)
    rows["iddx_full"] = np.array([v for v, _ in table], dtype=object)[iddx]
    for level in range(5):  # iddx_1..iddx_5: the levels of the "::" path
        parts = [v.split("::") for v, _ in table]
        rows[f"iddx_{level + 1}"] = np.array([p[level] if level < len(p) else None for p in parts], dtype=object)[iddx]
    invasive_mel = np.array([v.endswith("Melanoma Invasive") for v, _ in table])[iddx]
    rows["mel_mitotic_index"] = np.where(invasive_mel, rng.choice(np.array(_MITOTIC, dtype=object), n), None)
    rows["mel_thick_mm"] = np.where(invasive_mel, np.round(rng.lognormal(np.log(0.5), 0.6, n), 2), np.nan)
    rows["tbp_lv_dnn_lesion_confidence"] = 100 / (1 + np.exp(-rng.normal(5.0, 2.5, n)))


def _draw_index(rng: np.random.Generator, table: tuple[tuple[str, float], ...], n: int) -> np.ndarray:
    """n draws of row numbers of a (value, weight) table."""
    weights = np.array([w for _, w in table])
    return rng.choice(len(table), n, p=weights / weights.sum())


def _render_params(rng: np.random.Generator, rows: pd.DataFrame, z: dict[str, np.ndarray], spec: DemoSpec,
                   is_train: np.ndarray) -> pd.DataFrame:
    """Per-row inputs of `render_lesion`: crop size, lesion geometry, skin and lesion RGB, veil strength."""
    n = len(rows)
    size = np.clip(np.round(130 * np.exp(rng.normal(0, 0.25, n))), 60, 240).astype(np.int64)
    write_mask = np.zeros(n, dtype=bool)
    train_rows = np.flatnonzero(is_train)
    k = min(spec.mask_count, len(train_rows))
    write_mask[rng.choice(train_rows, size=k, replace=False)] = True
    skin = lab_to_rgb(rows[["tbp_lv_Lext", "tbp_lv_Aext", "tbp_lv_Bext"]].to_numpy(dtype=float))
    lesion = lab_to_rgb(rows[["tbp_lv_L", "tbp_lv_A", "tbp_lv_B"]].to_numpy(dtype=float))
    return pd.DataFrame({
        "size_px": size, "major_mm": rows["clin_size_long_diam_mm"], "minor_mm": rows["tbp_lv_minorAxisMM"],
        "angle": np.radians(rows["tbp_lv_symm_2axis_angle"].to_numpy(dtype=float)),
        "norm_border": rows["tbp_lv_norm_border"], "color_std": rows["tbp_lv_color_std_mean"],
        "stdL": rows["tbp_lv_stdL"],
        "skin_r": skin[:, 0], "skin_g": skin[:, 1], "skin_b": skin[:, 2],
        "lesion_r": lesion[:, 0], "lesion_g": lesion[:, 1], "lesion_b": lesion[:, 2],
        # veil strength in [0, 1]: faint or absent for most lesions, strong when the cue is high
        "veil": _sigmoid(1.6 * (z["cue"] - 1.0)), "write_mask": write_mask,
        "dx_cue": _isic2024_cues(rows["iddx_full"]) if spec.diagnosis_cues else np.zeros(n, np.int64),
    })


# ----------------------------------------------------------------------------------------- images


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) to sRGB in [0, 255], float; the last axis holds L, a, b."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    lin = np.clip(xyz @ m.T, 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return srgb * 255


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


# ----------------------------------------------------------------------------------------- diagnosis cues

# Each diagnosis's own sign, painted inside the lesion mask after the crop is rendered. Index 0: none.
CUES = ("none", "globules", "vessels", "scale", "milia", "white_centre")
# ISIC 2024 iddx_full prefix -> cue (only with DemoSpec.diagnosis_cues): each malignant subtype has its own
_ISIC2024_CUE_OF = {
    "Malignant::Malignant melanocytic proliferations (Melanoma)": "globules",
    "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma": "vessels",
    "Malignant::Malignant epidermal proliferations": "scale",
}


def _isic2024_cues(iddx_full: pd.Series) -> np.ndarray:
    """The cue index (into CUES) of each row's diagnosis; 0 for benign and indeterminate lesions."""
    codes = np.zeros(len(iddx_full), dtype=np.int64)
    for prefix, cue in _ISIC2024_CUE_OF.items():
        codes[iddx_full.fillna("").str.startswith(prefix).to_numpy()] = CUES.index(cue)
    return codes


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
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    counts = meta["dx"].value_counts().to_dict()
    return (f"wrote {out}: {len(meta)} images of {meta['lesion_id'].nunique()} lesions, HAM10000 layout; "
            f"images per class {counts}; best possible balanced accuracy 1.0 (every image shows its class's cue)")
