"""Assemble the report: one function per section, each returning its HTML (and writing its figure)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lesionstack.config import (
    Fraction,
    NonNegativeInt,
    PositiveInt,
    Range,
    check_fields,
    load_config,
    read_config_dict,
    save_config,
)
from lesionstack.files import read_json, write_text
from lesionstack.folds import fold_group
from lesionstack.metrics import PAUC_CONSTANT, pauc, roc_auc
from lesionstack.paths import ArtifactPaths, DataPaths, ReportFiles
from lesionstack.report import figures, montage, research, stats
from lesionstack.report import html as h
from lesionstack.report.diagnosis import diagnosis_section, has_diagnosis
from lesionstack.report.inputs import MODEL_COLUMNS, MODEL_LABELS, ReportInputs, load_inputs, selection_caveat
from lesionstack.report.shift import shift_part


@dataclass
class ReportConfig:
    """What the report computes. Defaults suit the real data; a YAML under configs/report/ overrides."""

    stated_sensitivity: Fraction = 0.90  # the confusion matrix is drawn at the threshold reaching this
    specificity_target: Fraction = 0.95
    sensitivity_target: Fraction = 0.95
    n_bootstrap: PositiveInt = 500  # per model; about 15-60 ms each on the real 401k rows (2 CPU cores)
    subgroup_bootstrap: PositiveInt = 200  # per subgroup level (sex, age band, site, institution, tile type)
    prevalence: Fraction = 0.001  # PPV and NPV are stated at this share of malignant lesions (real data: 0.1%)
    ci_level: Fraction = 0.95
    seed: int = 0
    top_features: PositiveInt = 30
    montage_per_group: NonNegativeInt = 6
    calibration_bins: Annotated[int, Range(ge=2)] = 10
    calibration_min_bin: PositiveInt = 30  # lesions in the finest (top-score) calibration bin
    dpi: Annotated[int, Range(ge=10)] = 110

    def __post_init__(self) -> None:
        check_fields(self)


ROC_MODELS = ("cnn", "tabular", "blend")


def write_report(
    artifacts_root: str | Path, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
    config: ReportConfig | str | Path | None = None,
) -> Path:
    """Write report/index.html (and its PNG figures beside it) for one artifacts root; return the page path.

    `data_dir` (else source.json's) locates the images and demo-truth.csv; `out_dir` defaults to
    `ArtifactPaths(artifacts_root).report_dir`. Only cv.json and oof_stack.parquet are required.
    """
    cfg = config if isinstance(config, ReportConfig) else load_config(ReportConfig, config)
    paths = ArtifactPaths(artifacts_root)
    if not paths.cv_json.exists() and has_diagnosis(paths):  # a diagnosis-only run (e.g. HAM10000)
        return _write_diagnosis_page(paths, cfg, Path(out_dir) if out_dir is not None else paths.report_dir)
    inputs = load_inputs(artifacts_root, data_dir)
    out = Path(out_dir) if out_dir is not None else inputs.paths.report_dir
    out.mkdir(parents=True, exist_ok=True)
    sections = [_summary, _roc_section, _table_section, _operating_section, _calibration_section,
                _importance_section, _image_section, _demo_section, _distill_section, _research_sections]
    body = [s(inputs, cfg, out) for s in tqdm(sections, desc="report", leave=False)]
    body.append(diagnosis_section(inputs.paths, cfg, out))
    body.insert(0, _notes_section(inputs))  # last: sections add notes while they render
    body.insert(0, research.synthetic_banner(inputs))  # the first screen says when the data are made up
    files = ReportFiles(out)
    save_config(cfg, files.config)
    meta = f"Artifacts: {inputs.paths.root.resolve()} · written {dt.datetime.now():%Y-%m-%d %H:%M}"
    page = files.page
    write_text(page, h.page("lesionstack evaluation report", meta, body))
    return page


def _research_sections(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    """For researchers: institution folds, subgroups, misses by diagnosis, the submission, provenance."""
    frame = research.with_metadata(inputs)
    return "".join([
        research.institution_section(inputs, cfg.subgroup_bootstrap, cfg.ci_level, cfg.seed),
        research.subgroup_section(frame, cfg.subgroup_bootstrap, cfg.ci_level, cfg.seed),
        research.misses_section(frame, cfg.stated_sensitivity),
        research.submission_section(inputs, out, cfg.dpi),
        research.provenance_section(inputs)])


def _write_diagnosis_page(paths: ArtifactPaths, cfg: ReportConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    body = [diagnosis_section(paths, cfg, out)]
    files = ReportFiles(out)
    save_config(cfg, files.config)
    meta = f"Artifacts: {paths.root.resolve()} · written {dt.datetime.now():%Y-%m-%d %H:%M}"
    page = files.page
    write_text(page, h.page("lesionstack diagnosis report", meta, body))
    return page


def _notes_section(inputs: ReportInputs) -> str:
    if not inputs.notes:
        return ""
    return h.section("Notes: missing or partial inputs", *(h.note(n) for n in inputs.notes))


def _summary(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    oof, cv = inputs.oof, inputs.cv
    patients = oof["patient_id"].nunique() if "patient_id" in oof else "unknown"
    rows = [["Training lesions (OOF rows)", len(oof)], ["Positives", int(oof["target"].sum())],
            ["Patients", patients], ["Folds", _fold_scheme(inputs, cv["n_folds"])]]
    blend = cv.get("blend") or {}
    if blend:
        weights = ", ".join(f"{k} {v:.3g}" for k, v in (blend.get("weights") or {}).items())
        rows.append(["Blend", f"{blend.get('method', '?')}" + (f" ({weights})" if weights else "")])
    caveat = selection_caveat(cv)
    return h.section("Run", h.table(["Item", "Value"], rows), *([h.note(caveat)] if caveat else []))


def _fold_scheme(inputs: ReportInputs, n_folds: int) -> str:
    if not inputs.paths.folds.is_file():
        return str(n_folds)
    group = fold_group(pd.read_csv(inputs.paths.folds, nrows=1))
    return f"{n_folds}, " + (f"grouped by {group} (each value in one fold)" if group else "grouped by patient")


def _roc_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    models = [(m, MODEL_LABELS[m], MODEL_COLUMNS[m]) for m in ROC_MODELS if m in inputs.oof_models]
    oof = inputs.oof
    if "tabular" in inputs.oof_models and oof["score_tabular"].equals(oof["score"]):
        # a stack without CNN features: the tabular blend is the blend; draw it once
        models = [(m, "Stacked blend = tabular (no CNN features)" if m == "blend" else label, col)
                  for m, label, col in models if m != "tabular"]
    figures.roc_figure(oof, models, out / "roc.png", cfg.dpi)
    missing = [MODEL_LABELS[m] for m in ROC_MODELS if m not in inputs.oof_models]
    parts = [h.figure("roc.png", "ROC of the out-of-fold scores. Faint: one curve per fold; bold: the pooled "
                      "OOF curve. Shaded: the pAUC region (sensitivity ≥ 80%), whose area is the metric.")]
    if missing:
        parts.append(h.note(f"Not in the OOF file, so not drawn: {', '.join(missing)}."))
    return h.section("ROC curves", *parts)


def _table_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    cv, oof = inputs.cv, inputs.oof
    columns = {m: MODEL_COLUMNS[m] for m in inputs.models}
    if not columns:
        return h.section("Cross-validation", h.note("cv.json names no model that oof_stack.parquet scores."))
    inputs.notes.extend(stats.cv_mismatches(oof, cv, columns))
    groups = oof["patient_id"].to_numpy() if "patient_id" in oof else None
    cis = {m: stats.bootstrap_ci(oof["target"], oof[col], groups, cfg.n_bootstrap, cfg.ci_level, cfg.seed)
           for m, col in tqdm(columns.items(), desc="bootstrap", leave=False)}
    k = cv["n_folds"]
    level = f"{cfg.ci_level:.0%}"
    parts = []
    for key, title in (("pauc", "pAUC above 80% TPR (max 0.2, chance 0.02)"), ("auc", "ROC AUC")):
        header = ["Model", *(f"fold {i}" for i in range(k)), "mean", "std", "pooled OOF", f"{level} CI"]
        rows = [_metric_row(m, cv["models"][m], cis[m], key) for m in columns]
        parts += [f"<h3>{h.esc(title)}</h3>", h.table(header, rows, _blend_rows(columns))]
    first = next(iter(cis.values()))
    parts.append(h.paragraph(
        f"Per-fold values, mean and std are cv.json's. The interval is a percentile bootstrap of the pooled OOF "
        f"score over {first.n_resamples} resamples of whole {first.unit} (seed {cfg.seed}): a patient's lesions share "
        "a skin type and a camera, so resampling lesions would understate the uncertainty."))
    parts.append(research.top15_table(inputs))
    return h.section("Cross-validation", *parts, *_shift_part(inputs))


def _shift_part(inputs: ReportInputs) -> list[str]:
    """OOF vs test score distributions, before and after fold pairing (score_shift.json of the predict stage)."""
    if not inputs.paths.score_shift.is_file():
        return []
    return shift_part(read_json(inputs.paths.score_shift))


def _metric_row(model: str, entry: dict, ci: stats.BootstrapCI, key: str) -> list[str]:
    folds = [f"{v:.4f}" for v in entry[key]]
    pooled, lo, hi = (ci.pauc, ci.pauc_low, ci.pauc_high) if key == "pauc" else (ci.auc, ci.auc_low, ci.auc_high)
    mean = entry.get(f"{key}_mean", float(np.mean(entry[key])))
    std = entry.get(f"{key}_std", float(np.std(entry[key])))
    return [MODEL_LABELS[model], *folds, f"{mean:.4f}", f"{std:.4f}", f"{pooled:.4f}", f"[{lo:.4f}, {hi:.4f}]"]


def _blend_rows(columns: dict[str, str]) -> list[int]:
    return [i for i, m in enumerate(columns) if m == "blend"]


def _operating_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    oof, prev = inputs.oof, cfg.prevalence
    spec_rows, sens_rows = [], []
    for m in inputs.oof_models:
        score = oof[MODEL_COLUMNS[m]]
        op = stats.operating_points(oof["target"], score, cfg.specificity_target, cfg.sensitivity_target)
        spec = 1 - float((score[oof["target"] == 0] >= op.threshold_at_spec).mean())
        sens = float((score[oof["target"] == 1] >= op.threshold_at_sens).mean())
        spec_rows.append(_operating_row(inputs, m, op.sens_at_spec, spec, op.threshold_at_spec, prev))
        sens_rows.append(_operating_row(inputs, m, sens, op.spec_at_sens, op.threshold_at_sens, prev))
    header = ["Model", "sensitivity", "specificity", "probability threshold", "lesions flagged (rank threshold)",
              f"PPV at {prev:.2%} prevalence", f"NPV at {prev:.2%} prevalence"]
    hl = _blend_rows(dict.fromkeys(inputs.oof_models))
    cm = stats.confusion_at_sensitivity(oof["target"], oof["score"], cfg.stated_sensitivity)
    ppv, npv = research.predictive_values(cm.sensitivity, cm.specificity, prev)
    cut = "rank" if _is_rank(inputs, "blend") else "score"
    return h.section(
        "Operating points (pooled OOF)",
        f"<h3>At {cfg.specificity_target:.0%} specificity</h3>", h.table(header, spec_rows, hl),
        f"<h3>At {cfg.sensitivity_target:.0%} sensitivity</h3>", h.table(header, sens_rows, hl),
        h.paragraph(f"A probability threshold applies to a model whose score is a probability; a rank blend's "
                    "score is a rank, so its cut is given only as the share of lesions it flags. PPV and NPV "
                    f"are stated at a prevalence of {prev:.2%} (report config key prevalence; the real "
                    f"competition data: 0.1%), not at this data's {oof['target'].mean():.2%}: a PPV measured on "
                    "enriched data overstates what a clinic would see."),
        f"<h3>Blend at the threshold reaching {cfg.stated_sensitivity:.0%} sensitivity "
        f"({cut} ≥ {cm.threshold:.4g}, flags {(oof['score'] >= cm.threshold).mean():.1%} of lesions)</h3>",
        h.table(["", "predicted malignant", "predicted benign"],
                [["malignant", cm.tp, cm.fn], ["benign", cm.fp, cm.tn]]),
        h.paragraph(f"Sensitivity {cm.sensitivity:.1%}, specificity {cm.specificity:.2%}; PPV {cm.ppv:.2%} in this "
                    f"data, {ppv:.2%} at {prev:.2%} prevalence (NPV {npv:.3%}); {cm.flagged_per_cancer:.1f} lesions "
                    "flagged per cancer found here. Thresholds pool the fold models' OOF scores, so they are "
                    "indicative, not a deployable cut-off."),
    )


def _operating_row(inputs: ReportInputs, m: str, sens: float, spec: float, threshold: float,
                   prevalence: float) -> list[str]:
    score = inputs.oof[MODEL_COLUMNS[m]]
    ppv, npv = research.predictive_values(sens, spec, prevalence)
    prob = "- (rank)" if _is_rank(inputs, m) else f"≥ {threshold:.4g}"
    return [MODEL_LABELS[m], f"{sens:.1%}", f"{spec:.1%}", prob, f"top {(score >= threshold).mean():.2%}",
            f"{ppv:.2%}", f"{npv:.3%}"]


def _is_rank(inputs: ReportInputs, model: str) -> bool:
    """The blend (and the tabular blend made the same way) of a rank-mean stack is a rank, not a probability."""
    method = str((inputs.cv.get("blend") or {}).get("method", ""))
    return model in ("blend", "tabular") and (method in RANK_BLENDS or "rank" in method.lower())


RANK_BLENDS = ("rank_mean", "weights")  # stack.py blends rank-normalised scores in both modes


def _calibration_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    oof = inputs.oof
    method = str((inputs.cv.get("blend") or {}).get("method", ""))
    blend_is_rank = method in RANK_BLENDS or "rank" in method.lower()
    names = [m for m in ("blend", "lgbm", "catboost", "xgboost", "cnn") if m in inputs.oof_models
             and not (m == "blend" and blend_is_rank) and _is_probability(oof[MODEL_COLUMNS[m]])]
    parts = []
    if names:
        curves = {m: stats.calibration_bins(oof["target"], oof[MODEL_COLUMNS[m]], cfg.calibration_bins,
                                            cfg.calibration_min_bin) for m in names}
        figures.calibration_figure(curves, out / "calibration.png", cfg.dpi)
        parts.append(h.figure("calibration.png", "Observed malignant rate against the mean score per bin; bins "
                              "are score quantiles that get finer towards the top, where the positives are. "
                              "GBDTs trained on undersampled negatives (and a CNN trained on balanced batches) "
                              "overstate the risk by design: their curves lie below the diagonal."))
    if blend_is_rank:
        parts.append(h.note(f"The blend ({method!r}) averages rank-normalised scores: it orders lesions but is not "
                            "a probability, so it has no calibration curve; the table below gives the risk by "
                            "rank instead."))
    return h.section("Calibration and risk by rank", *parts, _risk_table(oof))


def _is_probability(score: pd.Series) -> bool:
    return bool(score.between(0.0, 1.0).all())


def _risk_table(oof: pd.DataFrame) -> str:
    risk = stats.risk_by_rank(oof["target"], oof["score"])
    rows = [[f"top {r.fraction:.1%}", r.lesions, r.cancers, f"{r.rate:.2%}", f"{r.captured:.1%}"]
            for r in risk.itertuples()]
    return ("<h3>Risk by blend rank (pooled OOF)</h3>" + h.table(
        ["Lesions flagged", "lesions", "cancers", "malignant rate", "share of all cancers"], rows)
        + h.paragraph(f"Base rate: {oof['target'].mean():.2%} of lesions are malignant."))


def _importance_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    if inputs.importance is None:
        return h.section("Feature importance", h.note("No stack/feature_importance.csv: section left out."))
    imp = inputs.importance
    per_model = (imp.pivot_table(index="feature", columns=["model", "fold"], values="importance", fill_value=0.0)
                 .T.groupby(level="model").mean().T)
    per_model["pooled"] = per_model.mean(axis=1)
    top = per_model.sort_values("pooled", ascending=False).head(cfg.top_features)
    figures.importance_figure(top, out / "importance.png", cfg.dpi)
    return h.section("Feature importance", h.figure(
        "importance.png", f"Top {len(top)} features by gain (normalised per model and fold, averaged over "
        f"folds). Bar: mean over the {per_model.shape[1] - 1} GBDT(s); dots: each model."))


def _image_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    parts = [_cnn_part(inputs, cfg, out), _segmenter_part(inputs, cfg, out), _montage_part(inputs, cfg, out)]
    return h.section("Image models", *parts)


def _cnn_part(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    if not inputs.cnn_metrics:
        return h.note("No CNN training curves (no cnn/fold_k/metrics.json).")
    keep = {k: str(read_config_dict(inputs.paths.cnn_fold(k).config).get("keep", "best"))
            for k in inputs.cnn_metrics if inputs.paths.cnn_fold(k).config.is_file()}
    figures.training_figure(inputs.cnn_metrics, out / "cnn_training.png", cfg.dpi, keep=keep)
    rows = [[k, m.get("best_epoch"), f"{m.get('best_pauc', float('nan')):.4f}",
             f"{m.get('best_auc', float('nan')):.4f}", m.get("n_train"), m.get("n_val"),
             f"{np.median([e.get('images_per_s', np.nan) for e in m['epochs']]):.0f}"]
            for k, m in sorted(inputs.cnn_metrics.items())]
    return ("<h3>CNN training per fold</h3>" + h.figure("cnn_training.png", "CNN loss and validation pAUC per "
            "epoch and fold.") + h.table(["fold", "kept epoch", "its pAUC", "its AUC", "train", "val",
                                          "images/s (median)"], rows))


def _segmenter_part(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    m = inputs.segmenter_metrics
    if m is None:
        return h.note("No segmenter metrics (segmenter/metrics.json).")
    rows = [[m.get("encoder"), f"{m['dice']:.4f}", f"{m['iou']:.4f}", m.get("n_train"), m.get("n_val")]]
    parts = ["<h3>Lesion segmenter</h3>", h.table(["encoder", "Dice", "IoU", "train", "val"], rows)]
    if m.get("epochs"):
        figures.segmenter_figure(m, out / "segmenter.png", cfg.dpi)
        parts.append(h.figure("segmenter.png", "Segmenter training loss and validation Dice / IoU per epoch."))
    return "".join(parts)


def _montage_part(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    images = DataPaths(inputs.data_dir).train_images if inputs.data_dir is not None else None
    if images is None or not images.exists():
        return h.note(f"No training images ({images or 'no data folder'}): no crop montage.")
    groups = montage.pick_crops(inputs.oof, cfg.montage_per_group)
    ids = [i for g in groups.values() for i in g["isic_id"]]
    crops = montage.load_crops(images, ids, inputs.notes)
    masks = montage.predict_lesion_masks(inputs.paths.segmenter.weights, crops, inputs.notes)
    ranks = inputs.oof.set_index("isic_id")["score"].rank(ascending=False, pct=True)
    name = "score"
    families = [c for c in ("score_lgbm", "score_catboost", "score_xgboost") if c in inputs.oof]
    if _is_rank(inputs, "blend") and families:  # a rank reads as "score 1": show the GBDTs' mean probability
        groups = {k: g.assign(display_score=g[families].mean(axis=1)) for k, g in groups.items()}
        name = "GBDT p"
    montage.montage_figure(groups, crops, masks, ranks, out / "montage.png", cfg.dpi, score_name=name)
    caption = ("Crops ranked by the blend; 'top x%' is the crop's rank among all OOF lesions"
               + ("; 'GBDT p': the mean probability of the stacker's GBDTs (the blend itself is a rank). "
                  if name != "score" else ". ")
               + ("Yellow: predicted lesion outline." if masks else "No predicted mask (see the notes)."))
    return "<h3>Crops</h3>" + h.figure("montage.png", caption)


def _demo_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    if inputs.demo_truth is None:
        return ""  # real data has no truth file; nothing to say
    truth = inputs.demo_truth[inputs.demo_truth["split"] == "train"][["isic_id", "probability"]]
    both = inputs.oof.merge(truth, on="isic_id", how="inner")
    if both.empty or both["target"].nunique() < 2:
        return h.section("Demo data: best possible pAUC", h.note("demo-truth.csv shares no usable rows."))
    scores = [("True probability (best possible)", "probability")] + [
        (MODEL_LABELS[m], MODEL_COLUMNS[m]) for m in inputs.oof_models]
    best = pauc(both["target"], both["probability"])
    rows = [_demo_row(label, both, col, best) for label, col in scores]
    return h.section(
        "Demo data: the pipeline against the best possible",
        "<h3>Best possible against the pipeline (training rows)</h3>",
        h.table(["Score", "pooled pAUC", "mean fold pAUC", "pooled AUC", "share of achievable gain"], rows, [0]),
        h.paragraph("demo-data draws each label from a known probability; ranking by that probability is the "
                    f"best any model can do on these {len(both)} lesions. Share of achievable gain = "
                    f"(pAUC − {PAUC_CONSTANT}) / (best − {PAUC_CONSTANT})."))


def _demo_row(label: str, frame: pd.DataFrame, col: str, best: float) -> list[str]:
    pooled = pauc(frame["target"], frame[col])
    folds = [pauc(g["target"], g[col]) for _, g in frame.groupby("fold") if g["target"].nunique() == 2]
    gain = (pooled - PAUC_CONSTANT) / (best - PAUC_CONSTANT) if best > PAUC_CONSTANT else float("nan")
    return [label, f"{pooled:.4f}", f"{np.mean(folds):.4f}", f"{roc_auc(frame['target'], frame[col]):.4f}",
            f"{gain:.0%}"]



def _distill_section(inputs: ReportInputs, cfg: ReportConfig, out: Path) -> str:
    """Shown when `lesionstack distill` has written students under ARTIFACTS/distill."""
    from lesionstack.report.distill import comparison, read_student_metrics

    if not read_student_metrics(inputs.paths.root):
        return ""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [[r["model"], r["sees"], fmt(r["oof_pauc"]), fmt(r["mean"]), fmt(r["std"])]
            for r in comparison(inputs.paths.root)]
    parts = [h.table(["Model", "Sees", "OOF pAUC", "fold mean", "fold std"], rows), h.paragraph(
        "Image-only students taught by the stacker (lesionstack distill). Each student fold's teacher is the stack "
        "refit on that fold's training folds only (an inner OOF), so no teacher score saw the validation fold.")]
    robust = sorted(inputs.paths.robustness_file("").glob("*.json"))
    robust = [read_json(p) for p in robust if not p.name.startswith("phone-")]
    if robust:
        rows = [[r["model"], fmt(r["clean"]["oof_pauc"]), fmt(r["degraded"]["oof_pauc"]),
                 fmt(r["degraded"]["oof_pauc"] - r["clean"]["oof_pauc"])] for r in robust]
        parts += ["<h3>Phone-quality crops (lesionstack phone-eval)</h3>",
                  h.table(["Model", "clean OOF pAUC", "degraded OOF pAUC", "change"], rows)]
    export = inputs.paths.export_dir / "export.json"
    if export.is_file():
        parts += _export_part(read_json(export), fmt)
    return h.section("Distilled image-only students", *parts)


def _export_part(report: dict[str, Any], fmt: Any) -> list[str]:
    """The exported phone model (lesionstack export): pAUC and size of torch, ONNX fp32 and ONNX int8."""
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"  # noqa: E731
    rows = [["torch fp32", fmt(report["torch"]["pauc"]), "-"],
            ["ONNX fp32", fmt(report["fp32"]["pauc"]), mb(report["fp32"]["bytes"])]]
    int8 = report.get("int8")
    if int8:
        rows.append([f"ONNX int8 ({int8.get('recipe', 's8s8').upper()})", fmt(int8["pauc"]), mb(int8["bytes"])])
    note = (f"Student {report['student']}, fold {report['fold']} ({report['classifier']}, {report['image_size']} px), "
            f"scored without TTA on the fold's {report['n_val']} validation crops. ONNX fp32 vs torch: max |logit "
            f"difference| {report['fp32']['max_abs_diff_vs_torch']:.1e}.")
    if int8:
        note += (f" int8 vs fp32 pAUC {int8['pauc_minus_fp32']:+.4f} "
                 f"({'within' if int8['within_tolerance'] else 'outside'} the 0.005 check).")
        if "logit_corr_with_fp32" in int8:  # exports before the int8 diagnostics lack it
            note += (f" int8 logits correlate {int8['logit_corr_with_fp32']:.3f} with fp32 "
                     f"({int8['simulated_logit_corr_with_fp32']:.3f} with the QDQ arithmetic simulated in float).")
    return ["<h3>Exported phone model (lesionstack export)</h3>",
            h.table(["Model", "pAUC (fold val)", "file MB"], rows), h.paragraph(note)]
