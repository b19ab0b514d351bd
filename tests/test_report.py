"""The evaluation report: rendered from small, well-formed artifacts built in tmp_path."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import ALL_FIGURES, FAST_REPORT, REPORT_FOLDS, make_report_artifacts, report_oof
from lesionstack.files import read_json, write_json
from lesionstack.metrics import pauc, roc_auc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report import ReportError, write_report
from lesionstack.report.stats import (
    WeightedROC,
    bootstrap_ci,
    calibration_bins,
    confusion_at_sensitivity,
    operating_points,
    risk_by_rank,
)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArtifactPaths, Path]:
    paths = make_report_artifacts(tmp_path_factory.mktemp("full"))
    return paths, write_report(paths.root, config=FAST_REPORT)


# ---- checks ---------------------------------------------------------------------------------------------


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.width >= 200 and img.height >= 150, f"{path}: {img.size} is too small"
        assert len(img.convert("L").getcolors(maxcolors=1 << 20) or [0, 0]) > 20, f"{path} is near one colour"


def _table_rows(page: str, title: str) -> dict[str, list[str]]:
    """The rows of the table following <h3>title</h3>, keyed by their first cell."""
    block = page.split(f"<h3>{title}</h3>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", block):
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_every_figure_is_a_real_png_and_the_page_is_offline(full_report):
    paths, page_path = full_report
    assert page_path == paths.report_html
    page = page_path.read_text()
    for name in ALL_FIGURES:
        assert f'src="{name}"' in page, f"{name} not referenced"
        _assert_real_png(paths.report_dir / name)
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "page references a remote asset"
    assert "<script" not in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert (paths.report_dir / src).is_file(), f"{src} is referenced but missing"
    assert "Yellow: predicted lesion outline" in page  # the segmenter's masks were drawn


def test_table_numbers_equal_cv_json(full_report):
    paths, page_path = full_report
    page, cv = page_path.read_text(), read_json(paths.cv_json)
    labels = {"blend": "Stacked blend", "lgbm": "LightGBM", "catboost": "CatBoost", "xgboost": "XGBoost",
              "tabular": "Tabular only", "cnn": "CNN alone"}
    for key, title in (("pauc", "pAUC above 80% TPR (max 0.2, chance 0.02)"), ("auc", "ROC AUC")):
        rows = _table_rows(page, title)
        assert set(rows) == set(labels.values())
        for model, label in labels.items():
            entry = cv["models"][model]
            want = [f"{v:.4f}" for v in entry[key]] + [f"{entry[f'{key}_mean']:.4f}", f"{entry[f'{key}_std']:.4f}"]
            assert rows[label][: REPORT_FOLDS + 2] == want, (model, key)
            if key == "pauc":
                assert rows[label][REPORT_FOLDS + 2] == f"{entry['pauc_oof']:.4f}"
    assert "cv.json models." not in page  # no mismatch note: the OOF file agrees with cv.json


def test_demo_section_shows_the_best_possible_pauc(full_report):
    paths, page_path = full_report
    rows = _table_rows(page_path.read_text(), "Best possible against the pipeline (training rows)")
    oof = pd.read_parquet(paths.oof_stack)
    truth = pd.read_csv(DataPaths(read_json(paths.source)["data_dir"]).demo_truth)
    best = pauc(oof["target"], oof.merge(truth, on="isic_id")["probability"])
    assert rows["True probability (best possible)"][0] == f"{best:.4f}"
    assert rows["Stacked blend"][0] == f"{pauc(oof['target'], oof['score']):.4f}"


def test_missing_pieces_give_notes_not_crashes(tmp_path):
    paths = make_report_artifacts(tmp_path, full=False)
    page = write_report(paths.root, config=FAST_REPORT).read_text()
    for expected in ("No feature importance", "No CNN training curves", "No segmenter metrics",
                     "No data folder", "No patient ids found", "resamples of whole lesions"):
        assert expected in page, expected
    made = sorted(p.name for p in paths.report_dir.glob("*.png"))
    assert made == ["calibration.png", "roc.png"]


def test_missing_segmenter_weights_shows_bare_crops_with_a_note(full_report, tmp_path):
    paths, _ = full_report
    bare = ArtifactPaths(tmp_path / "artifacts")
    shutil.copytree(paths.root, bare.root, ignore=shutil.ignore_patterns("model.pt", "report"))
    page = write_report(bare.root, config=FAST_REPORT).read_text()
    assert "No segmenter weights at" in page
    assert "No predicted mask" in page
    _assert_real_png(bare.report_dir / "montage.png")


def test_cv_json_disagreeing_with_the_oof_file_is_flagged(tmp_path):
    paths = make_report_artifacts(tmp_path, full=False)
    cv = read_json(paths.cv_json)
    cv["models"]["lgbm"]["pauc"][2] += 0.01
    write_json(paths.cv_json, cv)
    page = write_report(paths.root, config=FAST_REPORT).read_text()
    assert "cv.json models.lgbm.pauc differs from oof_stack.parquet" in page


def test_a_rank_blend_gets_risk_by_rank_instead_of_a_calibration_curve(tmp_path):
    paths = make_report_artifacts(tmp_path, full=False)
    cv = read_json(paths.cv_json)
    cv["blend"]["method"] = "rank_mean"
    write_json(paths.cv_json, cv)
    page = write_report(paths.root, config=FAST_REPORT).read_text()
    assert "averages rank-normalised scores" in page and "Risk by blend rank" in page
    _assert_real_png(paths.report_dir / "calibration.png")  # still drawn for the GBDTs' probabilities


def test_a_stack_without_cnn_features_draws_the_blend_once(tmp_path):
    paths = make_report_artifacts(tmp_path, full=False)
    oof = pd.read_parquet(paths.oof_stack)
    oof.assign(score_tabular=oof["score"]).drop(columns=["score_cnn"]).to_parquet(paths.oof_stack)
    cv = read_json(paths.cv_json)
    cv["models"]["tabular"] = cv["models"]["blend"]
    del cv["models"]["cnn"]
    write_json(paths.cv_json, cv)
    page = write_report(paths.root, config=FAST_REPORT).read_text()
    assert "No CNN scores" in page and "Not in the OOF file, so not drawn: CNN alone" in page
    assert "CNN alone" not in _table_rows(page, "ROC AUC")
    with Image.open(paths.report_dir / "roc.png") as img:
        assert img.width > 2 * img.height  # one row: the blend and the zoom, no empty panel


def test_risk_by_rank_on_a_worked_example():
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    p = np.arange(10, 0, -1) / 10  # already in score order
    risk = risk_by_rank(y, p, fractions=(0.1, 0.3, 1.0))
    assert risk["lesions"].tolist() == [1, 3, 10]
    assert risk["cancers"].tolist() == [1, 2, 3]
    assert risk["captured"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_required_inputs_fail_clearly(tmp_path):
    with pytest.raises(ReportError, match="cv.json: not found"):
        write_report(tmp_path / "nothing")
    paths = make_report_artifacts(tmp_path, full=False)
    oof = pd.read_parquet(paths.oof_stack)
    oof.loc[7, "target"] = 2
    oof.to_parquet(paths.oof_stack)
    with pytest.raises(ReportError, match=r"oof_stack.parquet: column 'target' row 7"):
        write_report(paths.root)


def test_cli_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from lesionstack.cli import app

    paths = make_report_artifacts(tmp_path, full=False)
    cfg = tmp_path / "report.yaml"
    cfg.write_text("n_bootstrap: 50\ndpi: 50\n")
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(app, ["report", str(paths.root), "--out", str(out), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file() and (out / "roc.png").is_file()
    assert str(out / "index.html") in result.output


# ---- the numbers ----------------------------------------------------------------------------------------


def test_weighted_roc_equals_the_metric_on_repeated_rows():
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.1).astype(int)
    p = np.round(rng.random(300) + y * 0.5, 2)  # rounded: many ties, as with real model scores
    groups = rng.integers(0, 40, y.size)
    for codes, n_groups in ((None, y.size), (groups, 40)):
        roc = WeightedROC(y, p, codes)
        for _ in range(4):
            counts = rng.integers(0, 3, n_groups)
            rows = np.repeat(np.arange(y.size), counts[groups] if codes is not None else counts)
            got_p, got_a = roc.scores(counts)
            assert got_p == pytest.approx(pauc(y[rows], p[rows]), abs=1e-12)
            assert got_a == pytest.approx(roc_auc(y[rows], p[rows]), abs=1e-12)


def test_weighted_roc_on_real_labels_and_scores(shared_data):
    real = pd.read_csv(shared_data / "isic2024-real-labels" / "skinmap-heldout-20k.csv")
    y, p = real["target"].to_numpy(), real["prediction"].to_numpy()
    got_p, got_a = WeightedROC(y, p).scores(np.ones(y.size, dtype=int))
    assert got_p == pytest.approx(pauc(y, p), abs=1e-12) and got_a == pytest.approx(roc_auc(y, p), abs=1e-12)
    ci = bootstrap_ci(y, p, None, n_resamples=100, seed=0)
    assert ci.pauc_low < ci.pauc < ci.pauc_high


def test_patient_bootstrap_contains_the_estimate_is_seeded_and_resamples_patients():
    oof = report_oof(np.random.default_rng(1), n_patients=80)
    y, p, g = oof["target"], oof["score"], oof["patient_id"]
    ci = bootstrap_ci(y, p, g, n_resamples=300, seed=5)
    assert ci.pauc_low <= ci.pauc <= ci.pauc_high and ci.auc_low <= ci.auc <= ci.auc_high
    assert ci.pauc == pytest.approx(pauc(y, p)) and ci.unit == "patients" and ci.n_resamples == 300
    assert bootstrap_ci(y, p, g, n_resamples=300, seed=5) == ci
    assert bootstrap_ci(y, p, g, n_resamples=300, seed=6) != ci
    # scores share a per-patient offset, so whole-patient resampling must give a wider interval
    lesion = bootstrap_ci(y, p, None, n_resamples=300, seed=5)
    assert lesion.unit == "lesions"
    assert (ci.auc_high - ci.auc_low) > (lesion.auc_high - lesion.auc_low)


def test_operating_points_and_confusion_matrix_on_a_worked_example():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.95, 0.55, 0.9])
    cm = confusion_at_sensitivity(y, p, sensitivity=1.0)
    assert (cm.threshold, cm.tp, cm.fn, cm.fp, cm.tn) == (0.55, 2, 0, 2, 6)
    cm = confusion_at_sensitivity(y, p, sensitivity=0.5)
    assert (cm.threshold, cm.tp, cm.fn, cm.fp, cm.tn) == (0.9, 1, 1, 1, 7)
    op = operating_points(y, p, spec_target=0.85, sens_target=1.0)
    assert op.sens_at_spec == 0.5  # one false positive (12.5%) allowed: 0.95 then 0.9 -> one cancer found
    assert op.spec_at_sens == pytest.approx(6 / 8)


def test_calibration_bins_are_finer_at_the_top():
    rng = np.random.default_rng(0)
    p = rng.random(5000) ** 3
    y = (rng.random(5000) < p).astype(int)
    bins = calibration_bins(y, p, n_bins=10, min_bin=50)
    assert bins["n"].sum() == 5000
    assert bins["n"].iloc[-1] < bins["n"].iloc[0] and bins["n"].iloc[-1] >= 40
    assert bins["mean_score"].is_monotonic_increasing
    assert ((bins["low"] <= bins["observed"]) & (bins["observed"] <= bins["high"])).all()


def test_wilson_interval_holds_its_estimate_at_the_extremes():
    from lesionstack.report.stats import _wilson

    n = np.arange(1, 400)
    for k in (n, np.zeros_like(n), n // 2):
        low, high = _wilson(k, n)
        assert (low <= k / n).all() and (k / n <= high).all() and (low >= 0).all() and (high <= 1).all()


def test_the_train_vs_test_score_scale_table_shows_score_shift_json(tmp_path):
    from lesionstack.tabular.score_shift import compare

    paths = make_report_artifacts(tmp_path, full=False)
    rng = np.random.default_rng(0)
    oof = rng.beta(0.5, 4, size=500)
    cmp = compare(oof, {"test_mean": np.full(100, 0.1) + 0.01 * rng.normal(size=100),
                        "test_paired": rng.beta(0.5, 4, size=500)})
    write_json(paths.score_shift, {"n_test": 100, "n_folds": 2, "features": {"cnn_score": cmp},
                                   "cnn_score_by_fold": {"0": {"ks_mean": 0.5, "ks_paired": 0.04}},
                                   "stack_fold_probability": cmp, "stack_final_probability": cmp})
    page = write_report(paths.root, config=FAST_REPORT).read_text()
    title = "Do test scores look like training scores? (test set, no labels needed)"
    rows = _table_rows(page, title)
    cnn = "CNN score (stacker input)"
    assert list(rows) == [cnn, "Stacker probability, one fold model",
                          "Stacker probability, mean of fold models (submitted)"]
    assert rows[cnn][2] == f"{cmp['test_mean']['ks']:.3f}"
    assert rows[cnn][4] == f"{cmp['test_paired']['ks']:.3f}"
    assert "fold 0: 0.500 → 0.040" in page and "0 means the same distribution" in page
    bare = make_report_artifacts(tmp_path / "b", full=False)
    assert title not in write_report(bare.root, config=FAST_REPORT).read_text()
