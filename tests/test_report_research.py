"""The researcher's sections of the report: subgroups, PPV/NPV at a stated prevalence, misses by diagnosis,
the submission's scores, provenance, and leave-institution-out folds beside the standard ones."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import FAST_REPORT, cv_json_of, make_report_artifacts
from lesionstack import provenance
from lesionstack.files import write_json
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report import ReportConfig, write_report
from lesionstack.report.research import predictive_values

SITES = ["Hospital A", "Hospital B", "Hospital C", "Hospital D"]


def test_predictive_values_at_a_stated_prevalence_by_hand():
    ppv, npv = predictive_values(0.9, 0.95, 0.001)
    assert ppv == pytest.approx(0.0009 / (0.0009 + 0.05 * 0.999))
    assert npv == pytest.approx(0.95 * 0.999 / (0.95 * 0.999 + 0.1 * 0.001))
    assert predictive_values(0.9, 0.95, 0.5)[0] == pytest.approx(0.9 / (0.9 + 0.05))


def _add_metadata(paths: ArtifactPaths) -> pd.DataFrame:
    """train-metadata.csv for the fixture's lesions: demographics, one institution per patient, diagnoses."""
    folds = pd.read_csv(paths.folds)
    rng = np.random.default_rng(1)
    patients = folds["patient_id"].unique()
    per_patient = pd.DataFrame({"patient_id": patients, "sex": rng.choice(["male", "female"], len(patients)),
                                "age_approx": rng.choice([25.0, 40.0, 55.0, 70.0, 80.0], len(patients)),
                                "attribution": [SITES[i % 4] for i in range(len(patients))]})
    meta = folds.merge(per_patient, on="patient_id")
    meta["anatom_site_general"] = rng.choice(["head/neck", "posterior torso", None], len(meta))
    meta["tbp_tile_type"] = rng.choice(["3D: white", "3D: XP"], len(meta))
    meta["iddx_1"] = np.where(meta["target"] == 1, "Malignant", rng.choice(["Benign", "Indeterminate"], len(meta)))
    meta["iddx_full"] = np.where(meta["target"] == 1, rng.choice(
        ["Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma in situ",
         "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma"], len(meta)),
        "Benign")
    data = DataPaths(Path(str(pd.read_json(paths.source, typ="series")["data_dir"])))
    meta.to_csv(data.train_metadata, index=False)
    return meta


@pytest.fixture(scope="module")
def research_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArtifactPaths, pd.DataFrame, str]:
    paths = make_report_artifacts(tmp_path_factory.mktemp("research"))
    meta = _add_metadata(paths)
    oof = pd.read_parquet(paths.oof_stack)
    pd.DataFrame({"isic_id": [f"T_{i}" for i in range(50)], "target": np.linspace(0.01, 0.9, 50)}).to_csv(
        paths.submission, index=False)
    write_json(paths.provenance, {"lesionstack": "9.9", "commit": "abc1234", "python": "3.12.1",
                                  "libraries": {"lightgbm": "4.6.0"}, "stage_seconds": {"cnn": 120.0, "stack": 30.0}})
    # a leave-institution-out run nested under the root: other folds, other OOF scores
    nested = ArtifactPaths(paths.root / "by_attribution")
    nested.root.mkdir()
    inst = meta[["isic_id", "patient_id", "target", "attribution"]].assign(
        fold=meta["attribution"].map({s: i for i, s in enumerate(SITES)}))
    inst[["isic_id", "patient_id", "target", "fold", "attribution"]].to_csv(nested.folds, index=False)
    other = oof.drop(columns="fold").merge(inst[["isic_id", "fold"]], on="isic_id")
    other["score"] = other["score"] * 0.5 + np.random.default_rng(2).random(len(other)) * 0.5
    other.to_parquet(nested.oof_stack)
    cv = cv_json_of(other.assign(patient_id=0))
    cv["n_folds"] = 4
    write_json(nested.cv_json, cv)
    config = ReportConfig(**{**FAST_REPORT.__dict__, "subgroup_bootstrap": 50})
    page = write_report(paths.root, config=config).read_text()
    return paths, meta.merge(oof[["isic_id", "score"]], on="isic_id"), page


def _rows(page: str, after: str, key_cells: int = 2) -> dict[str, list[str]]:
    block = page.split(after, 1)[1].split("</table>", 1)[0]
    out = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", block):
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells:
            out[" | ".join(cells[:key_cells])] = cells
    return out


def test_subgroup_table_gives_each_levels_pauc(research_report):
    _, frame, page = research_report
    rows = _rows(page, "<h2>Subgroups</h2>", key_cells=1)
    male = frame[frame["sex"] == "male"]
    assert rows["Sex: male"][1:4] == [str(len(male)), str(male["patient_id"].nunique()), str(male["target"].sum())]
    assert rows["Sex: male"][4] == f"{pauc(male['target'], male['score']):.4f}"
    assert {"Anatomical site: missing", "Institution: Hospital C", "Age: 75 and over"} <= set(rows)


def test_misses_by_diagnosis_count_the_cancers_below_the_threshold(research_report):
    _, frame, page = research_report
    rows = _rows(page, "<h2>Misses by diagnosis</h2>")
    mel = frame[frame["iddx_full"].str.endswith("Melanoma in situ")]
    name = "Malignant melanocytic proliferations (Melanoma) / Melanoma in situ"
    cells = rows[next(k for k in rows if k.startswith(name))]
    assert int(cells[1]) == len(mel) and int(cells[2]) + int(cells[3]) == len(mel)
    assert "False alarms by iddx_1" in page


def test_ppv_is_stated_at_the_configured_prevalence(research_report):
    _, _, page = research_report
    assert "PPV at 0.10% prevalence" in page and "not at this data" in page


def test_institution_folds_sit_beside_patient_folds(research_report):
    paths, _, page = research_report
    assert "Validation by institution" in page
    rows = _rows(page, "Folds by patient against folds by attribution")
    assert "Stacked blend | patients (this run)" in rows and "Stacked blend | attribution (by_attribution)" in rows
    other = pd.read_parquet(paths.root / "by_attribution" / "oof_stack.parquet")
    assert rows["Stacked blend | attribution (by_attribution)"][2] == f"{pauc(other['target'], other['score']):.4f}"


def test_submission_scores_and_provenance_are_shown(research_report):
    paths, _, page = research_report
    assert (paths.report_dir / "submission_scores.png").is_file()
    assert "abc1234" in page and "lightgbm 4.6.0" in page and "<td>cnn</td><td>120</td>" in page


def test_synthetic_data_is_said_first_and_real_data_gets_no_banner(research_report, tmp_path):
    _, _, page = research_report
    body = page.split("<body>", 1)[1]
    assert body.index("Synthetic data") < body.index("<h2>")
    paths = make_report_artifacts(tmp_path)
    data = DataPaths(Path(str(pd.read_json(paths.source, typ="series")["data_dir"])))
    data.demo_truth.unlink()
    shutil.rmtree(paths.segmenter.dir)
    (paths.root / provenance.ARTIFACTS_FILE).unlink(missing_ok=True)
    marker = data.root / provenance.DATA_MARKER
    provenance.mark_synthetic(data.root, "isic2024")  # demo-data's marker alone is enough
    assert provenance.DATA_MARKER in write_report(paths.root, config=FAST_REPORT).read_text()
    marker.unlink()
    assert "Synthetic data" not in write_report(paths.root, config=FAST_REPORT).read_text()
    provenance.record(paths.root, data.root, ("cnn",))  # the run's record names no synthetic stage here
    assert "Synthetic data" not in write_report(paths.root, config=FAST_REPORT).read_text()
    provenance.mark_synthetic(data.root, "isic2024")
    provenance.record(paths.root, data.root, ("cnn",))
    marker.unlink()  # the data folder moved on; the run's record still says what the models learnt from
    assert provenance.ARTIFACTS_FILE in write_report(paths.root, config=FAST_REPORT).read_text()


def test_validation_points_skip_unvalidated_epochs_and_mark_the_kept_one():
    from lesionstack.report.figures import validation_points

    nan = float("nan")
    epochs = pd.DataFrame({"epoch": range(1, 9), "val_pauc": [nan, nan, nan, 0.09, nan, nan, nan, 0.05]})
    val, kept = validation_points(epochs, "last", best_epoch=4)
    assert val["epoch"].tolist() == [4, 8] and kept["epoch"].tolist() == [8]
    assert validation_points(epochs, "best", best_epoch=4)[1]["epoch"].tolist() == [4]


def test_the_run_table_names_the_fold_scheme(research_report):
    paths, _, page = research_report
    assert "<td>Folds</td><td>5, grouped by patient</td>" in page
    nested = write_report(paths.root / "by_attribution", config=FAST_REPORT).read_text()
    assert "<td>Folds</td><td>4, grouped by attribution (each value in one fold)</td>" in nested
    assert "Not measured: no nested run with leave-institution-out folds" in nested
    assert "Not measured" not in page
