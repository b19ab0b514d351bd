"""The researcher's sections of the report: provenance, subgroups, prevalence-adjusted PPV / NPV, misses by
diagnosis, the submission's scores, and leave-institution-out folds beside the standard ones.

Every section reads result files only (the run's config.yaml and provenance.json, cv.json, the OOF tables,
folds.csv, the training metadata, submission.csv); a missing input leaves its section out with a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionstack import provenance
from lesionstack.config import read_config_dict
from lesionstack.files import read_json
from lesionstack.folds import fold_group
from lesionstack.metrics import pauc, roc_auc, top_n_sensitivity
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report import figures, stats
from lesionstack.report import html as h
from lesionstack.report.inputs import MODEL_COLUMNS, MODEL_LABELS, ReportError, ReportInputs, read_cv, read_oof_stack

SUBGROUPS = {"sex": "Sex", "age_band": "Age", "anatom_site_general": "Anatomical site",
             "attribution": "Institution", "tbp_tile_type": "Tile type"}
METADATA_COLUMNS = ["isic_id", "sex", "age_approx", "anatom_site_general", "attribution", "tbp_tile_type",
                    "iddx_1", "iddx_full"]
AGE_BANDS = ((0, 30, "under 30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75 and over"))
MAIN_MODELS = ("cnn", "tabular", "blend")


def with_metadata(inputs: ReportInputs) -> pd.DataFrame | None:
    """The OOF table joined with the metadata columns the subgroup and diagnosis tables use (None: no data)."""
    if inputs.data_dir is None or not DataPaths(inputs.data_dir).train_metadata.is_file():
        return None
    path = DataPaths(inputs.data_dir).train_metadata
    meta = pd.read_csv(path, usecols=lambda c: c in METADATA_COLUMNS, dtype={"isic_id": str}, low_memory=False)
    frame = inputs.oof.merge(meta, on="isic_id", how="left")
    if "age_approx" in frame:
        age = pd.to_numeric(frame["age_approx"], errors="coerce")
        band = pd.Series("unknown", index=frame.index)
        for low, high, label in AGE_BANDS:
            band[(age >= low) & (age < high)] = label
        frame["age_band"] = band
    return frame


def synthetic_evidence(inputs: ReportInputs) -> str | None:
    """Why the data are synthetic, or None: the run's training-data record (`provenance.record`), else the
    marker `demo-data` leaves in the data folder, else a data folder of an older release holding the truth
    file only demo data have."""
    if provenance.synthetic_stages(provenance.read(inputs.paths.root)):
        return f"the run's {provenance.ARTIFACTS_FILE} says its models learnt from `lesionstack demo-data` output"
    if inputs.data_dir is None:
        return None
    if provenance.data_provenance(inputs.data_dir)["synthetic"]:
        return f"{inputs.data_dir} holds the {provenance.DATA_MARKER} marker of `lesionstack demo-data`"
    if DataPaths(inputs.data_dir).demo_truth.is_file():
        return f"{inputs.data_dir} holds demo-truth.csv, written only by `lesionstack demo-data`"
    return None


def synthetic_banner(inputs: ReportInputs) -> str:
    """The first thing on the page when the data are synthetic: no figure here is a clinical result."""
    evidence = synthetic_evidence(inputs)
    if evidence is None:
        return ""
    return h.note(f"Synthetic data: {evidence}. Its lesions, labels and images are generated; every number on "
                  "this page measures the pipeline on made-up data, not skin-cancer detection.")


# ---- provenance -------------------------------------------------------------------------------------------


def provenance_section(inputs: ReportInputs) -> str:
    """Configs, backbone and input size, epochs, seeds, commit, library versions, stage times, tuned params."""
    paths = inputs.paths
    run = read_config_dict(paths.run_config) if paths.run_config.is_file() else {}
    cnn = read_config_dict(paths.cnn_fold(0).config) if paths.cnn_fold(0).config.is_file() else {}
    cnn = cnn or (run.get("cnn") if isinstance(run.get("cnn"), dict) else {}) or {}
    prov = read_json(paths.provenance) if paths.provenance.is_file() else {}
    rows = _setup_rows(run, cnn, inputs.cv)
    parts = [h.table(["Setting", "Value"], rows, text=True) if rows
             else h.note(f"No {paths.run_config} or CNN fold config.")]
    tuned = inputs.cv.get("tuned_params")
    if tuned:
        params = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in (tuned.get("params") or {}).items())
        parts.append(h.paragraph(f"Tuned parameters for {tuned.get('model')} (from {tuned.get('source')}): "
                                 f"{params or 'none recorded'}."))
    if prov:
        libs = ", ".join(f"{k} {v}" for k, v in (prov.get("libraries") or {}).items() if v)
        parts.append(h.table(["Environment", "Value"], [
            ["lesionstack", prov.get("lesionstack")], ["code commit", prov.get("commit") or "not a git checkout"],
            ["Python", prov.get("python")], ["platform", prov.get("platform")], ["run started", prov.get("started")],
            ["libraries", libs]], text=True))
        times = prov.get("stage_seconds") or {}
        if times:
            parts += [h.table(["Stage", "seconds"], [[k, f"{v:.0f}"] for k, v in times.items()]
                              + [["total", f"{sum(times.values()):.0f}"]]),
                      h.paragraph("Seconds of the latest `lesionstack run` on this folder, on the machine above; a "
                                  "stage reused from an earlier run shows only the time to check and reuse it.")]
    else:
        parts.append(h.note(f"No {paths.provenance} (written by `lesionstack run`): versions, commit and stage "
                            "times unknown."))
    return h.section("Provenance: what made these numbers", *parts)


def _setup_rows(run: dict[str, Any], cnn: dict[str, Any], cv: dict[str, Any]) -> list[list[Any]]:
    folds = run.get("folds") if isinstance(run.get("folds"), dict) else {}
    stack = run.get("stack") if isinstance(run.get("stack"), dict) else {}
    model = cnn.get("model") or {}
    rows = []
    if folds:
        rows.append(["folds", f"{folds.get('n_folds')} folds grouped by {folds.get('group', 'patient_id')}, "
                              f"method {folds.get('method')}, seed {folds.get('seed')}"])
    if cnn:
        rows += [["CNN backbone", f"{model.get('classifier')} (gate {model.get('gate')}, segmenter encoder "
                                  f"{model.get('segmenter_encoder')})"],
                 ["CNN input size", f"{cnn.get('image_size')} px"],
                 ["CNN epochs", f"{cnn.get('epochs')} (validated every {cnn.get('val_every', 1)}; keep: "
                                f"{cnn.get('keep', 'best')})"],
                 ["CNN seeds", f"seed {cnn.get('seed')}, {cnn.get('seeds_per_fold', 1)} per fold"],
                 ["CNN optimiser", f"lr {cnn.get('lr')}, weight decay {cnn.get('weight_decay')}, batch "
                                   f"{cnn.get('batch_size')}, {cnn.get('neg_per_pos')} negatives per positive"]]
    if stack:
        rows += [["stacker", f"{', '.join(stack.get('models') or [])}; seeds {stack.get('seeds')}; "
                             f"{stack.get('n_rounds')} rounds at lr {stack.get('learning_rate')}"],
                 ["blend", f"{(cv.get('blend') or {}).get('method')}"]]
    return rows


# ---- subgroups ------------------------------------------------------------------------------------------


def subgroup_section(frame: pd.DataFrame | None, n_bootstrap: int, level: float, seed: int) -> str:
    """Blend pAUC per level of sex, age band, site, institution and tile type, with patient-bootstrap
    intervals (ranking within the subgroup)."""
    if frame is None:
        return h.section("Subgroups", h.note("No training metadata (data folder): subgroup table left out."))
    rows = []
    for col, title in SUBGROUPS.items():
        if col not in frame:
            continue
        for value, g in frame.groupby(frame[col].fillna("missing").astype(str), sort=True):
            rows.append([f"{title}: {value}", *_subgroup_cells(g, n_bootstrap, level, seed)])
    return h.section(
        "Subgroups", h.table(["Subgroup", "lesions", "patients", "cancers", "blend pAUC", f"{level:.0%} interval",
                              "blend AUC"], rows),
        h.paragraph(f"pAUC and AUC of the blend among that subgroup's lesions only (its ranking within the "
                    f"subgroup). Interval: {n_bootstrap} resamples of the subgroup's patients. A subgroup with "
                    "fewer than 2 cancers or no benign lesion has no pAUC."))


def _subgroup_cells(g: pd.DataFrame, n_bootstrap: int, level: float, seed: int) -> list[str]:
    n_pos = int(g["target"].sum())
    patients = g["patient_id"].nunique() if "patient_id" in g else "?"
    if n_pos < 2 or n_pos == len(g):
        return [str(len(g)), str(patients), str(n_pos), "-", "-", "-"]
    groups = g["patient_id"].to_numpy() if "patient_id" in g else None
    ci = stats.bootstrap_ci(g["target"], g["score"], groups, n_bootstrap, level, seed)
    return [str(len(g)), str(patients), str(n_pos), f"{ci.pauc:.4f}", f"{ci.pauc_low:.3f} to {ci.pauc_high:.3f}",
            f"{ci.auc:.3f}"]


# ---- prevalence -------------------------------------------------------------------------------------------


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) of a test with this sensitivity and specificity where `prevalence` of lesions are malignant
    (Bayes' rule; the data's own prevalence does not enter)."""
    tp, fn = sensitivity * prevalence, (1 - sensitivity) * prevalence
    fp, tn = (1 - specificity) * (1 - prevalence), specificity * (1 - prevalence)
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return ppv, npv


# ---- misses by diagnosis -----------------------------------------------------------------------------------


def misses_section(frame: pd.DataFrame | None, sensitivity: float) -> str:
    """Cancers found and missed by the blend at the threshold reaching `sensitivity`, per diagnosis."""
    if frame is None or "iddx_full" not in frame:
        why = "No training metadata (data folder)" if frame is None else "No iddx_full column in the training metadata"
        return h.section("Misses by diagnosis", h.note(f"{why}: table left out."))
    cm = stats.confusion_at_sensitivity(frame["target"], frame["score"], sensitivity)
    flagged = frame["score"] >= cm.threshold
    pct = frame["score"].rank(ascending=False, pct=True)
    pos = frame[frame["target"] == 1].assign(found=flagged, pct=pct, dx=lambda f: f["iddx_full"].map(_short_dx))
    rows = [[dx, len(g), int(g["found"].sum()), int((~g["found"]).sum()), f"{(~g['found']).mean():.0%}",
             f"top {g['pct'].median():.1%}"] for dx, g in pos.groupby("dx", sort=False)]
    rows.sort(key=lambda r: -r[1])
    neg = frame[(frame["target"] == 0) & flagged]
    alarms = neg["iddx_1"].fillna("missing").value_counts() if "iddx_1" in neg else pd.Series(dtype=int)
    parts = [h.table(["Diagnosis (iddx_full)", "cancers", "found", "missed", "share missed",
                      "median rank of the cancers"], rows),
             h.paragraph(f"At the blend threshold that reaches {sensitivity:.0%} sensitivity overall "
                         f"(flags {int(flagged.sum())} of {len(frame)} lesions). 'Median rank': where that "
                         "diagnosis's cancers sit among all lesions by blend score (top 1% = the highest-scored "
                         "hundredth).")]
    if len(alarms):
        parts += ["<h3>False alarms by iddx_1</h3>",
                  h.table(["iddx_1", "benign lesions flagged"], [[k, int(v)] for k, v in alarms.items()])]
    return h.section("Misses by diagnosis", *parts)


def _short_dx(full: Any) -> str:
    """The last two levels of an iddx_full path ('Malignant::...::Basal cell carcinoma, Nodular')."""
    if not isinstance(full, str) or not full:
        return "missing"
    parts = full.split("::")
    return " / ".join(parts[-2:]) if len(parts) > 2 else parts[-1]


# ---- the submission ----------------------------------------------------------------------------------------


def submission_section(inputs: ReportInputs, out: Path, dpi: int) -> str:
    """The distribution of submission.csv's scores beside the OOF blend's."""
    path = inputs.paths.submission
    if not path.is_file():
        return h.section("Submission scores", h.note(f"No {path} (run `lesionstack predict`)."))
    sub = pd.read_csv(path)
    if "target" not in sub:
        raise ReportError(f"{path}: missing column 'target'")
    scores = sub["target"].to_numpy(dtype=float)
    figures.score_histogram({"submission (test)": scores, "OOF blend (training)": inputs.oof["score"].to_numpy()},
                            out / "submission_scores.png", dpi)
    rank = str((inputs.cv.get("blend") or {}).get("method", "")) in ("rank_mean", "weights")
    q = np.quantile(scores, [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0])
    rows = [[name, f"{v:.4g}"] for name, v in zip(("min", "1%", "25%", "median", "75%", "99%", "max"), q)]
    return h.section(
        "Submission scores", h.figure("submission_scores.png", f"Scores of the {len(scores)} test lesions in "
                                      f"{path.name} and the training lesions' OOF blend scores (density)."),
        h.table(["Quantile", "submission score"], rows),
        h.paragraph("The metric uses only the ranking. A test distribution far from the OOF one (all scores "
                    "tied, or squeezed into a narrow band) is worth a look before submitting."
                    + (" This stack blends ranks, so both distributions are close to uniform on [0, 1] by "
                       "construction." if rank else "")))


# ---- leave-institution-out folds ---------------------------------------------------------------------------


def grouped_runs(paths: ArtifactPaths) -> list[ArtifactPaths]:
    """Nested runs under the artifacts root whose fold file is grouped (e.g. ARTIFACTS/by_attribution)."""
    found = []
    for sub in sorted(p for p in paths.root.iterdir() if p.is_dir()):
        nested = ArtifactPaths(sub)
        if nested.cv_json.is_file() and nested.oof_stack.is_file() and nested.folds.is_file():
            if fold_group(pd.read_csv(nested.folds, nrows=1)):
                found.append(nested)
    return found


def institution_section(inputs: ReportInputs, n_bootstrap: int, level: float, seed: int) -> str:
    """Standard (patient) folds beside each nested leave-institution-out run."""
    runs = grouped_runs(inputs.paths)
    if not runs:
        return h.section("Validation by institution", h.paragraph(
            "Not measured: no nested run with leave-institution-out folds under this artifacts root. The hidden "
            "test set holds institutions absent from training; to see what that costs, run `lesionstack run DATA "
            f"-a {inputs.paths.root / 'by_attribution'}` with `folds.group: attribution` in the run config "
            "(configs/run/demo_institution.yaml) and rebuild this report."))
    parts = []
    for nested in runs:
        folds = pd.read_csv(nested.folds, dtype={"isic_id": str, "patient_id": str})
        group = fold_group(folds)
        oof = read_oof_stack(nested.oof_stack).merge(folds[["isic_id", "patient_id", group]], on="isic_id")
        cv = read_cv(nested.cv_json)
        rows = []
        for m in MAIN_MODELS:
            col = MODEL_COLUMNS[m]
            if col in inputs.oof and m in inputs.cv["models"]:
                rows.append([MODEL_LABELS[m], "patients (this run)",
                             *_scheme_cells(inputs.oof, inputs.cv["models"][m], col, n_bootstrap, level, seed)])
            if col in oof and m in cv["models"]:
                rows.append([MODEL_LABELS[m], f"{group} ({nested.root.name})",
                             *_scheme_cells(oof, cv["models"][m], col, n_bootstrap, level, seed)])
        per = [[k, len(g), int(g["target"].sum()), int(g["fold"].iloc[0]),
                f"{pauc(g['target'], g['score']):.4f}" if 2 <= g["target"].sum() < len(g) else "-"]
               for k, g in oof.groupby(group)]
        parts += [f"<h3>Folds by patient against folds by {h.esc(group)} ({h.esc(nested.root)})</h3>",
                  h.table(["Model", "folds grouped by", "pooled OOF pAUC", f"{level:.0%} interval",
                           "mean fold pAUC ± std", "top-15 sensitivity"], rows),
                  f"<h3>Each {h.esc(group)} value scored by models that never saw it</h3>",
                  h.table([group, "lesions", "cancers", "fold", "blend pAUC"], per)]
    return h.section("Validation by institution", *parts, h.paragraph(
        "The hidden test set holds institutions absent from training. Folds grouped by institution validate each "
        "institution with models that never saw it; in ISIC 2024 the 7th place found this tracked the private "
        "leaderboard better than patient folds. A gap between the two schemes beyond their intervals is what "
        "unseen hospitals cost (the demo data draw every institution's lesions alike, so there it is noise). "
        "Both runs score the same lesions; their fold files differ, so `lesionstack compare` does not pair them. "
        "Convention: a nested artifacts root whose folds.csv is grouped (e.g. ARTIFACTS/by_attribution, made by "
        "`lesionstack run` with `folds.group: attribution`) is found and shown here."))


def _scheme_cells(oof: pd.DataFrame, entry: dict[str, Any], col: str, n: int, level: float, seed: int) -> list[str]:
    groups = oof["patient_id"].to_numpy() if "patient_id" in oof else None
    ci = stats.bootstrap_ci(oof["target"], oof[col], groups, n, level, seed)
    top15 = top_n_sensitivity(oof["target"], oof[col], oof["patient_id"]) if groups is not None else float("nan")
    return [f"{ci.pauc:.4f}", f"[{ci.pauc_low:.4f}, {ci.pauc_high:.4f}]",
            f"{np.mean(entry['pauc']):.4f} ± {np.std(entry['pauc']):.4f}", f"{top15:.3f}"]


def top15_table(inputs: ReportInputs) -> str:
    """Top-15 retrieval sensitivity (the competition's secondary prize metric) per model, pooled OOF."""
    if "patient_id" not in inputs.oof:
        return h.note("No patient ids: top-15 retrieval sensitivity left out.")
    oof = inputs.oof
    rows = [[MODEL_LABELS[m], f"{top_n_sensitivity(oof['target'], oof[MODEL_COLUMNS[m]], oof['patient_id']):.3f}",
             f"{roc_auc(oof['target'], oof[MODEL_COLUMNS[m]]):.4f}"] for m in inputs.oof_models]
    with_cancer = inputs.oof.groupby("patient_id")["target"].sum().gt(0).sum()
    return ("<h3>Top-15 retrieval sensitivity (ISIC 2024 secondary prize)</h3>"
            + h.table(["Model", "top-15 sensitivity", "pooled AUC"], rows)
            + h.paragraph(f"Per patient with a cancer ({with_cancer} here), the share of that patient's cancers "
                          "among the patient's 15 highest-scored lesions; then the mean over those patients (the "
                          "organisers' definition). A patient with 15 or fewer lesions scores 1."))
