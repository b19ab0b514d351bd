"""`lesionstack run`: every stage in order, from a data folder to submission.csv and the report.

    folds -> segmenter (on masks/, when the CNN gates on one) -> CNN per fold -> features
      -> [Optuna tuning] -> GBDT stacker -> test predictions -> submission.csv -> report

Each stage is one function of (data paths, artifacts paths, its config) returning a small typed result;
`run` hands them on (the segmenter's result becomes a new CNN config, `cnn_config_with`). Each stage
guards its own reuse (folds written once; `resume.guard` over config, input digests and DONE markers), so
a second run after a kill redoes only what was unfinished. The resolved run config is saved as
`ARTIFACTS/config.yaml`, and the data folder it ran on in `ARTIFACTS/source.json` (both at the end of
a run, or at its start in a new folder). Every input is checked before the first stage (`preflight`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd

from lesionstack import provenance
from lesionstack.config import ConfigError, save_config
from lesionstack.data.schema import ID_COLUMN
from lesionstack.files import atomic_path, read_json, write_json
from lesionstack.folds import folds_stage
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths, DataPaths, MaskPaths
from lesionstack.preflight import check_run
from lesionstack.report.inputs import selection_caveat
from lesionstack.run_config import RunConfig
from lesionstack.tabular.stack import StackResult
from lesionstack.train.cnn_config import CNNConfig, resolve_untrained_segmenter
from lesionstack.train.segmenter import SegmenterResult

if TYPE_CHECKING:  # the stage modules are imported when their step runs (torch is slow to import)
    from lesionstack.tabular.features_stage import FeaturesResult
    from lesionstack.tabular.tune import TuneResult
    from lesionstack.train.cnn import CNNResult

log = logging.getLogger(__name__)
R = TypeVar("R")


# ---- typed results of the steps that live here ---------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A stage the run did not need, and why."""

    reason: str

    def __str__(self) -> str:
        return f"skipped ({self.reason})"


@dataclass(frozen=True)
class PredictResult:
    submission: Path
    n_rows: int

    def __str__(self) -> str:
        return f"{self.n_rows} test lesions -> {self.submission}"


@dataclass(frozen=True)
class ReportResult:
    page: Path

    def __str__(self) -> str:
        return str(self.page)


# ---- the run ------------------------------------------------------------------------------------------

N_STEPS = 9


def run(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], cfg: RunConfig | None = None, *,
        checked: bool = False) -> dict[str, Any]:
    """Run every stage, each given the typed results it needs; returns a summary (paths and scores) that is
    also written to run.json. Progress goes to the `lesionstack` logger (the CLI shows it). Everything the
    run reads is checked first (`preflight.check_run`; `checked`: the caller already did)."""
    cfg = cfg or RunConfig()
    data, art = DataPaths(data_dir), ArtifactPaths(out)
    if not checked:
        check_run(data, art, cfg)
    _record_run(cfg, data, art, finished=False)
    art.root.mkdir(parents=True, exist_ok=True)
    # this attempt's record; a resumed stage's seconds are its reuse. Written only once every stage before the
    # report has succeeded, so a failing run leaves a finished folder's provenance.json as it was
    prov, times = _provenance(), {}
    _step(1, "folds", lambda: folds_stage(data, art, cfg.folds), art, times)
    seg = _step(2, "segmenter", lambda: _segmenter(cfg, data, art), art, times)
    cnn_cfg = cnn_config_with(cfg.cnn, seg)
    _step(3, "cnn", lambda: _cnn(data, art, cnn_cfg), art, times)
    _step(4, "features", lambda: _features(data, art), art, times)
    _step(5, "tune", lambda: _tune(cfg, art), art, times)
    stack = _step(6, "stack", lambda: _stack(cfg, art), art, times)
    _step(7, "predict", lambda: _predict(data, art), art, times)
    _step(8, "diagnosis", lambda: _diagnosis(cfg, data, art), art, times)
    write_json(art.provenance, {**prov, "stage_seconds": times})  # the report shows the stages so far
    _step(9, "report", lambda: _report(cfg, data, art), art, times)
    write_json(art.provenance, {**prov, "stage_seconds": times})
    summary = _summary(data, art, stack)
    _record_run(cfg, data, art, finished=True)
    write_json(art.run_summary, _relative_paths(summary, art.root))
    return summary


def _step(i: int, name: str, fn: Callable[[], R], art: ArtifactPaths, times: dict[str, float]) -> R:
    log.info("[%d/%d] %s ...", i, N_STEPS, name)
    start = time.perf_counter()
    result = fn()
    times[name] = round(time.perf_counter() - start, 1)
    log.info("[%d/%d] %s: %s (%.0f s)", i, N_STEPS, name, result, times[name])
    return result


def _provenance() -> dict[str, Any]:
    """What made this run: package version, the source's git commit (when it is a checkout), Python, libraries."""
    import platform
    import subprocess

    from lesionstack import __version__
    from lesionstack.inference.package import library_versions

    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None  # an installed wheel, or no git
    return {"lesionstack": __version__, "commit": commit, "python": platform.python_version(),
            "platform": platform.platform(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "libraries": library_versions()}


def _relative_paths(summary: dict[str, Any], root: Path) -> dict[str, Any]:
    """run.json names its files relative to the artifacts root, so a copied folder stays consistent."""
    out = dict(summary)
    for key in ("artifacts", "submission", "report", "cv_json"):
        if out.get(key):
            out[key] = os.path.relpath(out[key], root)
    return out


def _record_run(cfg: RunConfig, data: DataPaths, art: ArtifactPaths, *, finished: bool) -> None:
    """The run config and the data folder of the latest run (config.yaml, source.json). A new folder gets them
    at the start (so `report` can find the data of an unfinished run); a folder that already has them is
    changed only when the run finishes: a failing run leaves a finished folder as it was."""
    if not finished and art.source.is_file():
        return
    art.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, art.run_config)
    write_json(art.source, {"data_dir": os.fspath(data.root.resolve())})
    # every stage the run trains learns from this folder (a demo-data folder is marked synthetic)
    provenance.record(art.root, data.root, ("folds", "cnn", "stack") + (("diagnosis",) if cfg.diagnosis_stage else ()))
    masks = Path(cfg.masks_dir) if cfg.masks_dir else data.masks
    if masks.is_dir():
        provenance.record(art.root, masks, ("segmenter",))


def _segmenter(cfg: RunConfig, data: DataPaths, art: ArtifactPaths) -> SegmenterResult | Skipped:
    model = cfg.cnn.model
    if model.gate == "none":
        return Skipped("the CNN has no segmenter gate")
    if model.segmenter_weights:
        return Skipped(f"using {model.segmenter_weights}")
    masks = Path(cfg.masks_dir) if cfg.masks_dir else data.masks
    if not masks.is_dir() and not art.segmenter.done.is_file():
        cfg.cnn = resolve_untrained_segmenter(cfg.cnn, f" and there is no masks folder {masks} (masks_dir)")
        if cfg.cnn.model.gate == "none":
            return Skipped(f"no {masks}: untrained_segmenter is gate_none, so the CNN trains without a gate")
        return Skipped(f"no {masks}: the segmenter starts from scratch inside the CNN")
    if cfg.segmenter.encoder != model.segmenter_encoder:  # fail now, not after training the segmenter
        raise ConfigError(f"segmenter.encoder {cfg.segmenter.encoder!r} differs from the CNN's "
                          f"model.segmenter_encoder {model.segmenter_encoder!r}; the CNN could not load it")
    from lesionstack.train.segmenter import segmenter_stage

    # a segmenter already trained under this root with this config is reused (its resume guard checks)
    return segmenter_stage(MaskPaths(masks), art, cfg.segmenter)


def cnn_config_with(cnn: CNNConfig, seg: SegmenterResult | Skipped) -> CNNConfig:
    """The segmenter-to-CNN hand-off, a pure function: a new CNN config whose gate starts from the trained
    segmenter's weights, with its decoder widths (so the fold models rebuild without the segmenter file)."""
    if not isinstance(seg, SegmenterResult):
        return cnn
    model = dataclasses.replace(cnn.model, segmenter_weights=os.fspath(seg.weights.resolve()),
                                segmenter_decoder_channels=tuple(seg.decoder_channels))
    return dataclasses.replace(cnn, model=model)


def _diagnosis(cfg: RunConfig, data: DataPaths, art: ArtifactPaths) -> str | Skipped:
    if not cfg.diagnosis_stage:
        return Skipped("diagnosis_stage is false")
    from lesionstack.train.diagnosis import diagnosis_stage

    result = diagnosis_stage(data, art, cfg.diagnosis)
    return f"OOF balanced accuracy {result.balanced_accuracy:.4f}, macro AUC {result.macro_auc:.4f}"


def _cnn(data: DataPaths, art: ArtifactPaths, cfg: CNNConfig) -> CNNResult:
    from lesionstack.train.cnn import cnn_stage

    return cnn_stage(data, art, cfg)


def _features(data: DataPaths, art: ArtifactPaths) -> FeaturesResult:
    from lesionstack.tabular.features_stage import FeaturesConfig, features_stage

    return features_stage(data, art, FeaturesConfig())


def _tune(cfg: RunConfig, art: ArtifactPaths) -> TuneResult | Skipped:
    if not cfg.tune.enabled:
        return Skipped("tune.enabled is false")
    from lesionstack.tabular.tune import TuneConfig, tune_stage

    # a finished study is not rerun (each call would add n_trials more trials); the guard checks it
    return tune_stage(art.tables, art, TuneConfig(cfg.stack, cfg.tune), rerun=False)


def _stack(cfg: RunConfig, art: ArtifactPaths) -> StackResult:
    from lesionstack.tabular.stack import stack_stage

    return stack_stage(art.tables, art, cfg.stack)


def _predict(data: DataPaths, art: ArtifactPaths) -> PredictResult | Skipped:
    """The test set scored as `predict` scores it (`inference.stacker.score_table`), on the CNN test scores
    train-cnn wrote through the same scorer; then the score-shift measurement (a record, not a score)."""
    if not art.features_test.is_file():
        return Skipped(f"no {data.test_metadata}")
    from lesionstack.data.metadata import read_metadata
    from lesionstack.inference.stacker import score_table, uses_cnn
    from lesionstack.inference.submit import write_submission

    meta = read_metadata(data.test_metadata, kind="test")
    with_cnn = uses_cnn(read_json(art.cv_json))
    cnn_scores = pd.read_parquet(art.test_cnn) if with_cnn else None
    scores = score_table(art, meta, cnn_scores, where=str(data.test_metadata))
    with atomic_path(art.test_stack) as tmp:
        scores.to_parquet(tmp, index=False)
    write_submission(scores, meta[ID_COLUMN].tolist(), art.submission)
    if with_cnn and art.features_test_folds.is_file():
        _measure_score_shift(art)
    return PredictResult(art.submission, len(scores))


def _measure_score_shift(art: ArtifactPaths) -> None:
    """score_shift.json: the test scores before pairing (mean of the CNN folds) and after, against the
    OOF (`tabular.score_shift`), from the feature tables the features stage wrote."""
    from lesionstack.tabular.score_shift import score_shift
    from lesionstack.tabular.stack_predict import fold_probabilities

    features = pd.read_parquet(art.features_test)
    fold_cnn = pd.read_parquet(art.features_test_folds)
    per_fold = fold_probabilities(features, art, fold_cnn=fold_cnn)
    write_json(art.score_shift, score_shift(art, features, fold_cnn, per_fold))


def _report(cfg: RunConfig, data: DataPaths, art: ArtifactPaths) -> ReportResult | Skipped:
    if not cfg.report:
        return Skipped("report is false")
    from lesionstack.report import write_report

    return ReportResult(Path(write_report(art.root, data_dir=data.root)))


def _summary(data: DataPaths, art: ArtifactPaths, stack: StackResult) -> dict[str, Any]:
    """run.json: where everything is, and the scores of the stack stage."""
    summary: dict[str, Any] = {
        "artifacts": os.fspath(art.root),
        "submission": os.fspath(art.submission) if art.submission.is_file() else None,
        "report": os.fspath(art.report_html) if art.report_html.is_file() else None,
        "cv_json": os.fspath(stack.cv_json),
        "pauc": dict(stack.pauc_mean),
        "pauc_oof": dict(stack.pauc_oof),
        "caveat": selection_caveat(read_json(stack.cv_json)) if Path(stack.cv_json).is_file() else None,
    }
    best = best_possible_pauc(data, art)
    if best is not None:
        summary["best_possible_pauc"] = best
    return summary


def best_possible_pauc(data: DataPaths, art: ArtifactPaths) -> float | None:
    """On demo data: the pAUC of the true probabilities over the training rows (the ceiling of any model)."""
    if not data.demo_truth.is_file():
        return None
    truth = pd.read_csv(data.demo_truth)
    train = truth[truth["split"] == "train"]
    return pauc(train["target"], train["probability"])


def format_summary(summary: dict[str, Any]) -> str:
    """What the user reads at the end of `lesionstack run`."""
    lines = ["", "pAUC above 80% TPR (max 0.2, constant 0.02), out-of-fold on the training data:"]
    labels = {"cnn": "CNN alone", "tabular": "tabular GBDT alone", "blend": "stacked blend"}
    for name, label in labels.items():
        if summary["pauc_oof"].get(name) is not None:
            lines.append(f"  {label:<22} {summary['pauc_oof'][name]:.4f}   (mean over folds "
                         f"{summary['pauc'][name]:.4f})")
    if "best_possible_pauc" in summary:
        lines.append(f"  {'best possible (truth)':<22} {summary['best_possible_pauc']:.4f}   "
                     "(the demo's true probabilities)")
    if summary.get("caveat"):
        lines.append(f"  {summary['caveat']}")
    lines.append(f"scores:     {summary['cv_json']}")
    if summary["submission"]:
        lines.append(f"submission: {summary['submission']}")
    if summary["report"]:
        lines.append(f"report:     {summary['report']}")
    return "\n".join(lines)

