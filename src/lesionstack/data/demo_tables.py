"""The synthetic data set's tables: patients, lesions, the 55 metadata columns, the true P(malignant) of
every lesion and the parameters its image is rendered from (`make_tables`). See `data.synthetic` for how
the label is made; the images are `data.demo_images`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd

from lesionstack.config import NonNegativeInt, PositiveInt, Range, check_fields
from lesionstack.data import schema

CROP_MM = 15.0  # a TBP close-up tile shows 15 x 15 mm of skin

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

    patients: PositiveInt = 100  # training patients
    lesions_per_patient: Annotated[float, Range(ge=1)] = 30.0  # mean; skewed counts per patient, as in real data
    seed: int = 0
    test_fraction: Annotated[float, Range(ge=0, le=10)] = 0.1  # test patients = round(patients * test_fraction), >= 1
    positive_rate: Annotated[float, Range(gt=0, lt=0.5)] = 0.03  # expected share of malignant lesions (real: 0.1%)
    mask_count: NonNegativeInt = 300  # training crops copied to masks/ with their segmentation
    tabular_weight: float = 2.0  # logit weight of the patient-relative "ugly duckling" score
    image_weight: float = 1.8  # logit weight of the image-only cue
    age_weight: float = 0.3  # logit weight of standardised age
    jpeg_quality: Annotated[int, Range(ge=1, le=100)] = 90
    # True: malignant crops also show a cue of their diagnosis (melanoma: dark globules, basal cell carcinoma:
    # red branching vessels, squamous cell carcinoma: a white-yellow keratin scale), drawn from a separate
    # random stream after the crop, so the metadata and every other crop stay byte-identical to False
    diagnosis_cues: bool = False

    def __post_init__(self) -> None:
        check_fields(self)

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


# ---- colours and diagnosis cues (shared with the images) ----------------------------------------


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
