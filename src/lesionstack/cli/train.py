"""Commands that train: the segmenter, the CNN per fold, diagnosis, features, tuning, the stacker, and `run`.

Each checks what it will read and that the artifacts root can be written (`lesionstack.preflight`) before it
takes the artifacts lock, which is what creates the folder: a refused command leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lesionstack.cli.common import (
    Artifacts,
    DataDir,
    Float,
    FoldsOnly,
    Int,
    OptPath,
    Str,
    artifacts_lock,
    config_option,
    fold_list,
)
from lesionstack.paths import DEFAULT_ARTIFACTS, ArtifactPaths, DataPaths


def train_seg_cmd(
    masks: Annotated[Path, typer.Argument(
        help="Folder of X.jpg + X_segmentation.png (ISIC 2018 Task 1 layout; subfolders ok).", show_default=False)],
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    config: Annotated[OptPath, config_option("configs/seg/", "SegConfig")] = None,
    epochs: Annotated[Int, typer.Option(help="Override the config's epochs.", show_default=False)] = None,
    encoder: Annotated[Str, typer.Option(help="Override the config's timm encoder.", show_default=False)] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the U-Net lesion segmenter (BCE + Dice); report held-out Dice/IoU; save the best weights."""
    from lesionstack.config import load_config
    from lesionstack.paths import MaskPaths
    from lesionstack.preflight import check_masks, check_writable
    from lesionstack.train.segmenter import SegConfig, segmenter_stage

    cfg = load_config(SegConfig, config, epochs=epochs, encoder=encoder)
    check_masks(masks)
    check_writable(artifacts)
    with artifacts_lock("train-seg", artifacts):
        m = segmenter_stage(MaskPaths(masks), ArtifactPaths(artifacts), cfg, progress=progress)
    typer.echo(
        f"segmenter {m.encoder}: held-out Dice {m.dice:.4f}, IoU {m.iou:.4f} (best epoch {m.best_epoch} of "
        f"{m.n_epochs}; {m.n_train} train / {m.n_val} val; {m.seconds:.0f} s) -> {m.weights}"
    )


def train_cnn_cmd(
    data: DataDir,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    folds: Annotated[OptPath, typer.Option(help="Fold file from `lesionstack folds`.",
                                           show_default="ARTIFACTS/folds.csv")] = None,
    config: Annotated[OptPath, config_option("configs/cnn/", "CNNConfig")] = None,
    folds_only: FoldsOnly = "",
    segmenter: Annotated[OptPath, typer.Option(
        help="Segmenter weights (train-seg's model.pt); overrides the config.", show_default=False)] = None,
) -> None:
    """Train the gated CNN per fold (resumable; DDP under torchrun); write OOF and test scores."""
    from lesionstack.preflight import check_crops, check_fold_file, check_weights, check_writable
    from lesionstack.train.cnn import cnn_stage
    from lesionstack.train.cnn_config import load_cnn_config

    art, paths = ArtifactPaths(artifacts), DataPaths(data, folds)
    folds = paths.fold_file(art)
    only = fold_list(folds_only)
    cfg = load_cnn_config(config, segmenter=segmenter)
    check_crops(paths)  # the test crops too: the CNN scores them when the last fold finishes
    check_weights(cfg, f"{config or 'CNN config'}")
    check_fold_file(folds, paths)
    check_writable(artifacts)
    with artifacts_lock("train-cnn", artifacts):
        result = cnn_stage(paths, art, cfg, folds_only=only)
    for m in result.folds:
        typer.echo(f"{m} (keep: {result.keep})")
    if result.oof_pauc is not None:
        typer.echo(f"OOF pAUC {result.oof_pauc:.4f}, AUC {result.oof_auc:.4f} -> {artifacts}")


def train_diagnosis_cmd(
    data: Annotated[Path, typer.Argument(
        help="ISIC 2024 (train-metadata.csv + HDF5), HAM10000 (metadata + image folders) or Task 3 CSV + images.",
        show_default=False)],
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    config: Annotated[OptPath, config_option("configs/diagnosis/", "DiagnosisConfig")] = None,
    segmenter: Annotated[OptPath, typer.Option(help="train-seg model.pt for the gate.", show_default=False)] = None,
    folds_only: FoldsOnly = "",
) -> None:
    """Multi-class diagnosis per fold (lesion/patient-grouped): OOF class probabilities, balanced accuracy."""
    from lesionstack.data.diagnosis_layouts import detect_layout
    from lesionstack.preflight import check_writable, exists
    from lesionstack.train.diagnosis import diagnosis_stage
    from lesionstack.train.diagnosis_config import load_diagnosis_config

    only = fold_list(folds_only)
    cfg = load_diagnosis_config(config, segmenter)
    exists(data, "data folder", folder=True)
    if cfg.layout == "auto":
        detect_layout(data)  # one of the three layouts, or a line naming what was looked for
    check_writable(artifacts)
    with artifacts_lock("train-diagnosis", artifacts):
        result = diagnosis_stage(DataPaths(data), ArtifactPaths(artifacts), cfg, folds_only=only)
    typer.echo(result)


def features_cmd(
    data: DataDir,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    cnn: Annotated[bool, typer.Option(help="Add the CNN's scores (oof_cnn/test_cnn.parquet) when present.")] = True,
) -> None:
    """Build the feature tables of train (and test) metadata: the same function for both."""
    from lesionstack.preflight import check_data, check_writable
    from lesionstack.tabular.features_stage import FeaturesConfig, features_stage

    paths = DataPaths(data)
    check_data(paths, test=paths.test_metadata.is_file())  # test tables when the folder has test files
    check_writable(artifacts)
    with artifacts_lock("features", artifacts):
        result = features_stage(paths, ArtifactPaths(artifacts), FeaturesConfig(use_cnn=cnn))
    for table in result.tables:
        reused = " (unchanged inputs: reused)" if result.reused else ""
        typer.echo(f"{table}{' (with CNN scores)' if result.with_cnn else ''}{reused}")
    for line in result.warnings:
        typer.echo(f"warning: {line}")


def tune_cmd(
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    config: Annotated[OptPath, config_option("configs/stack/", "StackConfig")] = None,
    model: Annotated[Str, typer.Option(help="Family to tune: lgbm, catboost or xgboost.", show_default="lgbm")] = None,
    n_trials: Annotated[Int, typer.Option(help="Trials for this process.", show_default="20")] = None,
    timeout: Annotated[Float, typer.Option(help="Stop starting trials after this many seconds.",
                                           show_default="none")] = None,
    storage: Annotated[Str, typer.Option(help="Optuna RDB URL shared by workers.",
                                         show_default="sqlite ARTIFACTS/tune/study.db")] = None,
    study_name: Annotated[Str, typer.Option(help="Study name.", show_default="stack-MODEL")] = None,
    seed: Annotated[Int, typer.Option(help="Sampler seed, offset by the trials already stored.",
                                      show_default="0")] = None,
) -> None:
    """Optuna study on the mean fold pAUC (resumable; several workers may share --storage)."""
    from lesionstack.config import load_config
    from lesionstack.folds import read_folds
    from lesionstack.preflight import check_writable, exists
    from lesionstack.tabular.stack_config import StackConfig
    from lesionstack.tabular.tune import TuneConfig, TuneSettings, tune_stage

    settings = load_config(TuneSettings, None, enabled=True, model=model, n_trials=n_trials, timeout=timeout,
                           storage=storage, study_name=study_name, seed=seed)
    cfg = load_config(StackConfig, config)
    art = ArtifactPaths(artifacts)
    read_folds(art.folds)  # a missing one says how to make it
    exists(art.features_train, "feature table (from `lesionstack features`)")
    check_writable(artifacts)
    with artifacts_lock("tune", artifacts):
        tune_stage(art.tables, art, TuneConfig(cfg, settings))


def train_stack_cmd(
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    config: Annotated[OptPath, config_option("configs/stack/", "StackConfig")] = None,
) -> None:
    """Train LightGBM/CatBoost/XGBoost per fold, blend them; write oof_stack.parquet and cv.json."""
    from lesionstack.config import load_config
    from lesionstack.folds import read_folds
    from lesionstack.preflight import check_writable, exists
    from lesionstack.tabular.stack import stack_stage
    from lesionstack.tabular.stack_config import StackConfig

    art = ArtifactPaths(artifacts)
    cfg = load_config(StackConfig, config)
    read_folds(art.folds)  # a missing one says how to make it
    exists(art.features_train, "feature table (from `lesionstack features`)")
    check_writable(artifacts)
    with artifacts_lock("train-stack", artifacts):
        result = stack_stage(art.tables, art, cfg)
    typer.echo(result.text)
    typer.echo(f"wrote {art.oof_stack}, {art.cv_json}, {art.feature_importance}")


def run_cmd(
    data: DataDir,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    config: Annotated[OptPath, config_option("configs/run/", "RunConfig")] = None,
) -> None:
    """The whole pipeline: folds, segmenter, CNN per fold, features, optional tuning, stacker, submission, report.

    Everything it will read is checked first, and the plan printed; resumable: a second run after a kill
    redoes only what was unfinished."""
    from lesionstack.pipeline import format_summary, run
    from lesionstack.preflight import check_run
    from lesionstack.run_config import load_run_config

    cfg = load_run_config(config)
    plan = check_run(DataPaths(data), ArtifactPaths(artifacts), cfg)
    typer.echo("plan (from what is on disk):\n" + "\n".join(str(step) for step in plan), err=True)
    with artifacts_lock("run", artifacts):
        summary = run(data, artifacts, cfg, checked=True)
    typer.echo(format_summary(summary))


def register(app: typer.Typer) -> None:
    for name, command in (("train-seg", train_seg_cmd), ("train-cnn", train_cnn_cmd),
                          ("train-diagnosis", train_diagnosis_cmd), ("features", features_cmd), ("tune", tune_cmd),
                          ("train-stack", train_stack_cmd), ("run", run_cmd)):
        app.command(name)(command)
