"""The competition's metadata schema: column names, kinds, and which columns exist only in training.

The lists follow the real `train-metadata.csv` (55 columns) and `test-metadata.csv` (44 columns) of
ISIC 2024 in the order Kaggle serves them. Features may use only `TEST_COLUMNS`.
"""

from __future__ import annotations

ID_COLUMN = "isic_id"
PATIENT_COLUMN = "patient_id"
TARGET_COLUMN = "target"

# The 44 columns of test-metadata.csv, in Kaggle's order.
TEST_COLUMNS: tuple[str, ...] = (
    "isic_id", "patient_id", "age_approx", "sex", "anatom_site_general", "clin_size_long_diam_mm",
    "image_type", "tbp_tile_type", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C",
    "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext", "tbp_lv_areaMM2",
    "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean", "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL",
    "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity", "tbp_lv_location",
    "tbp_lv_location_simple", "tbp_lv_minorAxisMM", "tbp_lv_nevi_confidence", "tbp_lv_norm_border",
    "tbp_lv_norm_color", "tbp_lv_perimeterMM", "tbp_lv_radial_color_std_max", "tbp_lv_stdL",
    "tbp_lv_stdLExt", "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z",
    "attribution", "copyright_license",
)

# Columns present only in train-metadata.csv. They describe the diagnosis (or are derived from it),
# so nothing that builds features may read them.
TRAIN_ONLY_COLUMNS: tuple[str, ...] = (
    "target", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5",
    "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
)

# The 55 columns of train-metadata.csv, in Kaggle's order.
TRAIN_COLUMNS: tuple[str, ...] = (
    TEST_COLUMNS[:1] + ("target",) + TEST_COLUMNS[1:]
    + ("lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5",
       "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence")
)

STRING_COLUMNS: tuple[str, ...] = (
    "isic_id", "patient_id", "sex", "anatom_site_general", "image_type", "tbp_tile_type",
    "tbp_lv_location", "tbp_lv_location_simple", "attribution", "copyright_license",
    "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5", "mel_mitotic_index",
)
# mel_mitotic_index is a string in the real data ("<1/mm^2", "2/mm^2", ...).

CATEGORICAL_COLUMNS: tuple[str, ...] = (
    "sex", "anatom_site_general", "tbp_tile_type", "tbp_lv_location", "tbp_lv_location_simple",
    "attribution", "copyright_license",
)

# Numeric columns usable as features (test columns that are not strings).
NUMERIC_TEST_COLUMNS: tuple[str, ...] = tuple(c for c in TEST_COLUMNS if c not in STRING_COLUMNS)

# Columns that may legitimately be empty in the real data.
NULLABLE_COLUMNS: frozenset[str] = frozenset(
    {"age_approx", "sex", "anatom_site_general"} | set(TRAIN_ONLY_COLUMNS) - {"target"}
)

# The category strings the real data uses (useful for the synthetic generator and for checks).
CATEGORY_VALUES: dict[str, tuple[str, ...]] = {
    "sex": ("male", "female"),
    "anatom_site_general": ("head/neck", "upper extremity", "lower extremity", "anterior torso",
                            "posterior torso"),
    "image_type": ("TBP tile: close-up",),
    "tbp_tile_type": ("3D: white", "3D: XP"),
    "tbp_lv_location_simple": ("Head & Neck", "Left Arm", "Right Arm", "Left Leg", "Right Leg",
                               "Torso Back", "Torso Front", "Unknown"),
    "tbp_lv_location": (
        "Head & Neck", "Left Arm", "Left Arm - Lower", "Left Arm - Upper", "Left Leg", "Left Leg - Lower",
        "Left Leg - Upper", "Right Arm", "Right Arm - Lower", "Right Arm - Upper", "Right Leg",
        "Right Leg - Lower", "Right Leg - Upper", "Torso Back Top Third", "Torso Back Middle Third",
        "Torso Back Bottom Third", "Torso Front Top Half", "Torso Front Bottom Half", "Unknown",
    ),
    "attribution": (
        "Memorial Sloan Kettering Cancer Center",
        "ACEMID MIA",
        "Department of Dermatology, Hospital Clínic de Barcelona",
        "University Hospital of Basel",
        "Frazer Institute, The University of Queensland, Dermatology Research Centre",
        "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin and Venereal "
        "Diseases, Alexander Stratigos, Konstantinos Liopyris",
        "ViDIR Group, Department of Dermatology, Medical University of Vienna",
    ),
    "copyright_license": ("CC-BY", "CC-BY-NC", "CC-0"),
}
