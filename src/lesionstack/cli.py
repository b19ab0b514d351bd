"""The `lesionstack` command: one subcommand per pipeline stage.

Each command only parses arguments and calls the stage's function; the stage modules are imported inside
the commands, so `lesionstack --help` stays fast and importing this module does nothing.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lesionstack.paths import DEFAULT_ARTIFACTS, PROBS, SUBMISSION, ArtifactPaths

# Option defaults live in the stages' config dataclasses; an option left unset (None) keeps the config's
# value (`config.load_config` drops None overrides). The dataclasses are not imported here, so that
# `lesionstack --help` stays fast.
Int = Optional[int]  # noqa: UP045 - typer needs Optional on 3.10
Float = Optional[float]  # noqa: UP045
Str = Optional[str]  # noqa: UP045

app = typer.Typer(
    name="lesionstack",
    help="Skin-cancer detection for ISIC 2024: folds -> segment-then-classify CNN -> GBDT stack -> submission.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DataDir = Annotated[Path, typer.Argument(help="A data folder in the competition's layout.")]


def locked(param: str, *, file: bool = False, shared: bool = False) -> Callable[[Callable], Callable]:
    """Run the command holding the lock of the artifacts folder named by its argument `param` (its parent
    folder when `file`); `shared`: commands of this kind may run together (tune workers), no others."""

    def wrap(command: Callable) -> Callable:
        @functools.wraps(command)  # typer reads the wrapped signature
        def inner(*args: Any, **kwargs: Any) -> Any:
            from lesionstack.lock import run_lock

            root = Path(kwargs[param])
            with run_lock(root.parent if file else root, shared=shared):
                return command(*args, **kwargs)

        return inner

    return wrap


class _Console(logging.StreamHandler):
    """Stage progress as plain lines on stderr (what the stages used to print); warnings say so. The stream
    is looked up at each record, so a CLI run inside a test runner writes to its captured stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream: it would flush a stream a test runner may have closed
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


@app.callback()
def _console_logging() -> None:
    """Stages report through `logging` (and tqdm bars): show lesionstack's INFO lines and up."""
    logger = logging.getLogger("lesionstack")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())


@app.command("demo-data")
def demo_data_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic data set into.")],
    patients: Annotated[Int, typer.Option(help="Number of training patients (default: DemoSpec.patients).")] = None,
    lesions_per_patient: Annotated[
        Float, typer.Option(help="Mean lesions per patient, ~385 in real data (default: DemoSpec.lesions_per_patient).")
    ] = None,
    seed: Annotated[
        Int, typer.Option(help="Random seed; the same seed writes the same files (default: DemoSpec.seed).")
    ] = None,
    positive_rate: Annotated[
        Float, typer.Option(help="Share of malignant lesions, 0.001 in real data (default: DemoSpec.positive_rate).")
    ] = None,
    masks: Annotated[
        Int, typer.Option(help="Training crops copied to masks/ with their masks (default: DemoSpec.mask_count).")
    ] = None,
    test_fraction: Annotated[
        Float, typer.Option(help="Test patients per training patient (default: DemoSpec.test_fraction).")
    ] = None,
    workers: Annotated[
        Optional[int], typer.Option(help="Rendering processes (default: CPU cores); never changes the output.")  # noqa: UP045
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing data set in OUT_DIR.")] = False,
    diagnosis_cues: Annotated[bool, typer.Option(
        help="Malignant crops also show a cue of their iddx diagnosis (for train-diagnosis); metadata unchanged.")
    ] = False,
    ham10000: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Instead: write a HAM10000-layout folder (metadata + image folders) with this many lesions.")
    ] = None,
    archive: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Instead: write a synthetic ISIC Archive download (`isic image download` layout: <isic_id>.JPG + "
             "metadata.csv) with this many images, for the CNN config's `archive` key.")
    ] = None,
) -> None:
    """Write a synthetic data set in exactly the competition's layout, plus masks/ for the segmenter."""
    from lesionstack.config import load_config
    from lesionstack.data.synthetic import DemoDataError, DemoSpec, write_demo_data, write_ham10000_demo

    try:
        if ham10000 is not None:
            typer.echo(write_ham10000_demo(out_dir, lesions=ham10000, seed=seed or DemoSpec.seed,
                                           overwrite=overwrite))
            return
        if archive is not None:
            from lesionstack.data.synthetic_archive import write_archive_demo

            typer.echo(write_archive_demo(out_dir, images=archive, seed=seed or DemoSpec.seed, overwrite=overwrite))
            return
        spec = load_config(DemoSpec, None, patients=patients, lesions_per_patient=lesions_per_patient, seed=seed,
                           positive_rate=positive_rate, mask_count=masks, test_fraction=test_fraction,
                           diagnosis_cues=diagnosis_cues)
        summary = write_demo_data(out_dir, spec, overwrite=overwrite, workers=workers)
    except DemoDataError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(summary)


@app.command("folds")
@locked("out", file=True)
def folds_cmd(
    data_dir: DataDir,
    out: Annotated[
        Path, typer.Option("--out", help="Fold file to write (CSV).")
    ] = ArtifactPaths(DEFAULT_ARTIFACTS).folds,
    n_folds: Annotated[Int, typer.Option(help="Number of folds (default: FoldsConfig.n_folds).")] = None,
    seed: Annotated[Int, typer.Option(help="Random seed (default: FoldsConfig.seed).")] = None,
    method: Annotated[
        Str, typer.Option(help="greedy (balances positives) or sklearn (default: FoldsConfig.method).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing fold file with different content.")] = False,
    group: Annotated[Str, typer.Option(
        help="Column whose values each stay in one fold: attribution gives leave-institution-out folds "
             "(default: FoldsConfig.group, patient_id).")] = None,
) -> None:
    """Patient-grouped, stratified K folds of the training metadata (written once, read everywhere)."""
    from lesionstack.config import load_config
    from lesionstack.folds import FoldsConfig, FoldsResult, fold_group, make_folds_file

    cfg = load_config(FoldsConfig, None, n_folds=n_folds, seed=seed, method=method, group=group)
    table = make_folds_file(data_dir, out, n_folds=cfg.n_folds, seed=cfg.seed, method=cfg.method,  # type: ignore[arg-type]
                            force=force, group=cfg.group)
    folds = FoldsResult.of(table, out)
    typer.echo(f"wrote {out}: {sum(folds.lesions)} rows, {folds.n_patients} patients")
    by = fold_group(table)
    for fold, (n, pos) in enumerate(zip(folds.lesions, folds.positives, strict=True)):
        held = f" ({'; '.join(sorted(table.loc[table['fold'] == fold, by].unique()))})" if by else ""
        typer.echo(f"  fold {fold}: {n} lesions, {pos} positives{held}")


@app.command("train-seg")
@locked("out")
def train_seg_cmd(
    masks_dir: Annotated[
        Path, typer.Argument(help="Folder of X.jpg + X_segmentation.png (ISIC 2018 Task 1 layout; subfolders ok).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Artifacts root; writes segmenter/ under it.")] = DEFAULT_ARTIFACTS,
    config: Annotated[Optional[Path], typer.Option(help="Segmenter config YAML (configs/seg/).")] = None,  # noqa: UP045
    epochs: Annotated[Optional[int], typer.Option(help="Override the config's epochs.")] = None,  # noqa: UP045
    encoder: Annotated[Optional[str], typer.Option(help="Override the config's timm encoder.")] = None,  # noqa: UP045
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train the U-Net lesion segmenter (BCE + Dice); report held-out Dice/IoU; save the best weights."""
    from lesionstack.config import load_config
    from lesionstack.train.segmenter import SegConfig, segmenter_stage

    cfg = load_config(SegConfig, config, epochs=epochs, encoder=encoder)
    m = segmenter_stage(masks_dir, ArtifactPaths(out), cfg, progress=progress)
    typer.echo(
        f"segmenter {m.encoder}: held-out Dice {m.dice:.4f}, IoU {m.iou:.4f} (best epoch {m.best_epoch} of "
        f"{m.n_epochs}; {m.n_train} train / {m.n_val} val; {m.seconds:.0f} s) -> {m.weights}"
    )


@app.command("train-cnn")
@locked("out")
def train_cnn_cmd(
    data_dir: DataDir,
    folds: Annotated[
        Path, typer.Option("--folds", help="Fold file from `lesionstack folds`.")
    ] = ArtifactPaths(DEFAULT_ARTIFACTS).folds,
    config: Annotated[Optional[Path], typer.Option(help="CNN config YAML (configs/cnn/).")] = None,  # noqa: UP045
    out: Annotated[
        Path, typer.Option("--out", help="Artifacts root (cnn/fold_k, oof_cnn, test_cnn).")
    ] = DEFAULT_ARTIFACTS,
    folds_only: Annotated[str, typer.Option(help="Train only these folds, e.g. '0,1'.")] = "",
    segmenter: Annotated[
        Optional[Path], typer.Option(help="Segmenter weights (train-seg's model.pt); overrides the config.")  # noqa: UP045
    ] = None,
) -> None:
    """Train the gated CNN per fold (resumable; DDP under torchrun); write OOF and test scores."""
    from lesionstack.paths import DataPaths
    from lesionstack.train.cnn import cnn_stage
    from lesionstack.train.cnn_config import load_cnn_config

    cfg = load_cnn_config(config, segmenter=segmenter)
    only = [int(k) for k in folds_only.split(",") if k.strip()] or None
    result = cnn_stage(DataPaths(data_dir), ArtifactPaths(out), cfg, folds=folds, folds_only=only)
    for m in result.folds:
        typer.echo(f"{m} (keep: {result.keep})")
    if result.oof_pauc is not None:
        typer.echo(f"OOF pAUC {result.oof_pauc:.4f}, AUC {result.oof_auc:.4f} -> {out}")


@app.command("train-diagnosis")
def train_diagnosis_cmd(
    data_dir: Annotated[Path, typer.Argument(
        help="ISIC 2024 (train-metadata.csv + HDF5), HAM10000 (metadata + image folders) or Task 3 CSV + images.")],
    out: Annotated[Path, typer.Option("--out", help="Artifacts root; writes diagnosis/ under it.")] = Path("artifacts"),
    config: Annotated[Optional[Path], typer.Option(help="configs/diagnosis/NAME.yaml.")] = None,  # noqa: UP045
    segmenter: Annotated[Optional[Path], typer.Option(help="train-seg model.pt for the gate.")] = None,  # noqa: UP045
    folds_only: Annotated[Optional[list[int]], typer.Option(help="Train only these folds.")] = None,  # noqa: UP045
) -> None:
    """Multi-class diagnosis per fold (lesion/patient-grouped): OOF class probabilities, balanced accuracy."""
    from lesionstack.train.diagnosis import train_diagnosis
    from lesionstack.train.diagnosis_config import load_diagnosis_config

    summary = train_diagnosis(data_dir, load_diagnosis_config(config, segmenter), out, folds_only)
    for fold, m in summary["folds"].items():
        typer.echo(f"fold {fold}: balanced accuracy {m['best_balanced_accuracy']:.4f} (epoch {m['best_epoch']})")
    if "balanced_accuracy" in summary:
        typer.echo(f"OOF balanced accuracy {summary['balanced_accuracy']:.4f}, macro AUC {summary['macro_auc']:.4f} "
                   f"over {summary['n']} images; wrote {out}/diagnosis/oof.parquet and cv.json")


@app.command("features")
@locked("out")
def features_cmd(
    data_dir: DataDir,
    out: Annotated[
        Path, typer.Option("--out", help="Artifacts root (features/, and oof_cnn/test_cnn if any).")
    ] = DEFAULT_ARTIFACTS,
    cnn: Annotated[bool, typer.Option(help="Add the CNN's scores (oof_cnn/test_cnn.parquet) when present.")] = True,
) -> None:
    """Build the feature tables of train (and test) metadata: the same function for both."""
    from lesionstack.paths import DataPaths
    from lesionstack.tabular.features import features_stage

    result = features_stage(DataPaths(data_dir), ArtifactPaths(out), use_cnn=cnn)
    for table in result.tables:
        reused = " (unchanged inputs: reused)" if result.reused else ""
        typer.echo(f"{table}{' (with CNN scores)' if result.with_cnn else ''}{reused}")
    for line in result.warnings:
        typer.echo(f"warning: {line}")


@app.command("tune")
@locked("out", shared=True)
def tune_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Artifacts root (features, folds.csv, tune/).")
    ] = DEFAULT_ARTIFACTS,
    config: Annotated[Optional[Path], typer.Option(help="Stack config YAML (configs/stack/).")] = None,  # noqa: UP045
    model: Annotated[
        Str, typer.Option(help="Family to tune: lgbm, catboost or xgboost (default: TuneSettings.model).")
    ] = None,
    n_trials: Annotated[Int, typer.Option(help="Trials for this process (default: TuneSettings.n_trials).")] = None,
    timeout: Annotated[Float, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    storage: Annotated[
        Str, typer.Option(help="Optuna RDB URL shared by workers (default: sqlite OUT/tune/study.db).")
    ] = None,
    study_name: Annotated[Str, typer.Option(help="Study name (default: stack-MODEL).")] = None,
    seed: Annotated[
        Int, typer.Option(help="Sampler seed, offset by the trials already stored (default: TuneSettings.seed).")
    ] = None,
) -> None:
    """Optuna study on the mean fold pAUC (resumable; several workers may share --storage)."""
    from lesionstack.config import load_config
    from lesionstack.tabular.stack_config import StackConfig
    from lesionstack.tabular.tune import TuneSettings, tune_stage

    settings = load_config(TuneSettings, None, enabled=True, model=model, n_trials=n_trials, timeout=timeout,
                           storage=storage, study_name=study_name, seed=seed)
    tune_stage(ArtifactPaths(out), load_config(StackConfig, config), settings)


@app.command("train-stack")
@locked("out")
def train_stack_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Artifacts root (features, folds.csv, oof_cnn, stack/).")
    ] = DEFAULT_ARTIFACTS,
    config: Annotated[Optional[Path], typer.Option(help="Stack config YAML (configs/stack/).")] = None,  # noqa: UP045
) -> None:
    """Train LightGBM/CatBoost/XGBoost per fold, blend them; write oof_stack.parquet and cv.json."""
    from lesionstack.config import load_config
    from lesionstack.tabular.stack import stack_stage
    from lesionstack.tabular.stack_config import StackConfig

    art = ArtifactPaths(out)
    result = stack_stage(art, load_config(StackConfig, config))
    typer.echo(result.text)
    typer.echo(f"wrote {art.oof_stack}, {art.cv_json}, {art.feature_importance}")


@app.command("report")
@locked("artifacts_dir")
def report_cmd(
    artifacts_dir: Annotated[Path, typer.Argument(help="Artifacts root of a run (holds cv.json, oof_stack).")],
    data_dir: Annotated[
        Optional[Path], typer.Option(help="Data folder for the crops and demo-truth.csv (default: source.json).")  # noqa: UP045
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Report folder (default: ARTIFACTS_DIR/report).")  # noqa: UP045
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="Report config YAML (configs/report/).")] = None,  # noqa: UP045
) -> None:
    """Write the evaluation report: an offline HTML page with PNG figures beside it."""
    from lesionstack.report import write_report

    page = write_report(artifacts_dir, data_dir=data_dir, out_dir=out, config=config)
    typer.echo(f"report: {page}")


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(
        help="Artifacts roots: RUN_A RUN_B, or A1..An B1..Bn (one pair per CV seed; the first half is A).")],
    out: Annotated[Path, typer.Option("--out", help="JSON file to write.")] = Path("compare.json"),
    resamples: Annotated[int, typer.Option(help="Paired patient-bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Is a change real? pAUC of B - A (CNN, tabular, blend) on one fold file, with a paired patient-bootstrap
    95% interval; with several pairs (CV seeds), a paired t-test over seeds."""
    from lesionstack.report.compare import CompareError, compare_runs, format_comparison, write_comparison

    if len(runs) < 2 or len(runs) % 2:
        raise CompareError(f"compare takes an even number of artifacts roots (A runs, then as many B runs); "
                           f"got {len(runs)}")
    half = len(runs) // 2
    result = compare_runs(runs[:half], runs[half:], n_resamples=resamples, seed=seed)
    typer.echo(format_comparison(result))
    typer.echo(f"wrote {write_comparison(result, out)}")


@app.command("run")
@locked("out")
def run_cmd(
    data_dir: DataDir,
    out: Annotated[
        Path, typer.Option("--out", help="Artifacts root for everything the run writes.")
    ] = DEFAULT_ARTIFACTS,
    config: Annotated[Optional[Path], typer.Option(help="Run config YAML (configs/run/).")] = None,  # noqa: UP045
) -> None:
    """The whole pipeline: folds, segmenter, CNN per fold, features, optional tuning, stacker, submission, report.

    Resumable: a second run after a kill redoes only what was unfinished."""
    from lesionstack.pipeline import format_summary, load_run_config, run

    summary = run(data_dir, out, load_run_config(config))
    typer.echo(format_summary(summary))


@app.command("predict")
def predict_cmd(
    data_dir: Annotated[Path, typer.Argument(help="Folder with test-metadata.csv and test-image.hdf5.")],
    artifacts: Annotated[
        Path, typer.Option("--artifacts", help="Artifacts root of a trained run.")
    ] = DEFAULT_ARTIFACTS,
    out: Annotated[Path, typer.Option("--out", help="Submission file to write.")] = Path(SUBMISSION),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Score the test files with trained artifacts; write a validated submission.csv (atomically)."""
    from lesionstack.inference.submit import predict

    scores = predict(data_dir, artifacts, out, device=device)
    typer.echo(f"wrote {out}: {len(scores)} rows")


@app.command("package")
def package_cmd(
    artifacts_dir: Annotated[Path, typer.Argument(help="Artifacts root of a trained run.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to build (for `kaggle datasets create -p`).")] = Path(
        "kaggle-dataset"
    ),
    dataset_id: Annotated[str, typer.Option(help="Kaggle dataset id, USER/SLUG.")] = (
        "your-kaggle-username/lesionstack-model"
    ),
    python: Annotated[
        Optional[str], typer.Option(help="Target Python, e.g. 3.12 (default: Kaggle's, from kaggle/image.yaml).")  # noqa: UP045
    ] = None,
    platform: Annotated[
        Optional[str], typer.Option(help="Target platform tag, e.g. manylinux2014_x86_64 (default: Kaggle's).")  # noqa: UP045
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Ship the fold CNN weights as float16 (half the size).")] = False,
) -> None:
    """Build the Kaggle dataset: wheels of what Kaggle's image lacks (for its Python and platform, tags
    checked), the trained models, the kernel, dataset-metadata.json; prints the bundle's size."""
    from dataclasses import replace

    from lesionstack.inference.package import Target, describe, package, read_image

    target = Target.from_image(read_image())
    target = replace(target, python=python or target.python, platform=platform or target.platform)
    path = package(artifacts_dir, out, dataset_id=dataset_id, target=target, fp16=fp16)
    typer.echo(describe(path))
    typer.echo(f"upload with: kaggle datasets create -p {path}")


@app.command("serve")
def serve_cmd(
    artifacts: Annotated[Path, typer.Argument(help="Artifacts root of a trained run (the bundle to load).")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[
        Optional[str], typer.Option(help="Required on every request: Authorization: Bearer TOKEN (or as the "  # noqa: UP045
                                         "HTTP Basic password in a browser).", envvar="LESIONSTACK_TOKEN")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    model: Annotated[str, typer.Option(help="cnn: the CNN fold ensemble; student: the ONNX student (ONNX "
                                            "Runtime); auto: the CNN when the bundle has one, else "
                                            "ARTIFACTS/export's student.")] = "auto",
    student_onnx: Annotated[
        Optional[Path], typer.Option("--student-onnx", help="An `export` folder to serve the ONNX student from "  # noqa: UP045
                                                            "(default ARTIFACTS/export); implies --model student.")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Serve student.int8.onnx instead of the fp32 file.")] = False,
) -> None:
    """A local web page and JSON API (POST /api/predict) that score one lesion photo; uploads are never stored."""
    from lesionstack.inference.serve import check_host, serve

    try:
        check_host(host, token)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--host") from err
    typer.echo(f"loading {artifacts}; then serving http://{host}:{port}/ (API docs at /docs)")
    if student_onnx is not None and model == "cnn":
        raise typer.BadParameter("--student-onnx serves the ONNX student; drop --model cnn", param_hint="--model")
    model = "student" if student_onnx is not None else model
    serve(artifacts, host=host, port=port, token=token, device=device, model=model, student_dir=student_onnx,
          int8=int8)


@app.command("score")
def score_cmd(
    paths: Annotated[list[Path], typer.Argument(help="JPEG/PNG files and folders (searched recursively).")],
    artifacts: Annotated[
        Path, typer.Option("--artifacts", help="Artifacts root of a trained run.")
    ] = DEFAULT_ARTIFACTS,
    out: Annotated[Path, typer.Option("--out", help="CSV to write: path, probability, error.")] = Path(PROBS),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Score image files with a trained bundle; an unreadable file becomes a row with its error."""
    from lesionstack.inference.score import score

    table = score(paths, artifacts, out, device=device)
    failed = int((table["error"] != "").sum())
    typer.echo(f"wrote {out}: {len(table)} rows, {failed} unreadable")


def _run_data_dir(artifacts: Path, data: Optional[Path]) -> Path:  # noqa: UP045
    """--data, else the data folder the run recorded in ARTIFACTS/source.json."""
    from lesionstack.files import read_json
    from lesionstack.paths import ArtifactPaths

    source = ArtifactPaths(artifacts).source
    if data is not None:
        return data
    if not source.is_file():
        raise typer.BadParameter(f"{source} does not exist: pass --data")
    return Path(read_json(source)["data_dir"])


@app.command("distill")
def distill_cmd(
    out: Annotated[Path, typer.Option("--out", help="Artifacts root of a run (folds, features, stack).")] = Path(
        "artifacts"
    ),
    config: Annotated[Optional[Path], typer.Option(help="Student config YAML (configs/distill/).")] = None,  # noqa: UP045
    data: Annotated[
        Optional[Path], typer.Option(help="Data folder (default: the run's source.json).")  # noqa: UP045
    ] = None,
    name: Annotated[
        Optional[str], typer.Option(help="Student name: OUT/distill/NAME (default: the config's file stem).")  # noqa: UP045
    ] = None,
    folds_only: Annotated[str, typer.Option(help="Train only these folds, e.g. '0,1'.")] = "",
) -> None:
    """Distil the stacker into an image-only student per fold (no-leak nested teacher); write OOF scores."""
    import logging

    from lesionstack.paths import ArtifactPaths
    from lesionstack.train.distill import distill
    from lesionstack.train.distill_config import load_distill_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    art = ArtifactPaths(out)
    data = _run_data_dir(out, data)
    student = name or (config.stem if config is not None else "default")
    only = [int(k) for k in folds_only.split(",") if k.strip()] or None
    summary = distill(data, out, load_distill_config(config), name=student, folds_only=only)
    for fold, m in summary["folds"].items():
        typer.echo(f"fold {fold}: kept epoch {m['best_epoch']}: pAUC {m['best_pauc']:.4f}")
    if "oof_pauc" in summary:
        typer.echo(f"student {student}: OOF pAUC {summary['oof_pauc']:.4f} (folds {summary['fold_pauc_mean']:.4f} "
                   f"+- {summary['fold_pauc_std']:.4f}) -> {art.distill_dir(student)}")


@app.command("phone-eval")
def phone_eval_cmd(
    artifacts_dir: Annotated[Path, typer.Argument(help="Artifacts root of a run (folds.csv, cnn/, distill/).")],
    model: Annotated[str, typer.Option(help="'cnn' or the name of a distilled student (ARTIFACTS/distill/NAME).")] = (
        "cnn"
    ),
    data: Annotated[
        Optional[Path], typer.Option(help="Data folder (default: the run's source.json).")  # noqa: UP045
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the degraded copy (the same for every model).")] = 0,
) -> None:
    """OOF pAUC of an image model on its validation crops, clean and degraded like phone photos."""
    from lesionstack.paths import ArtifactPaths
    from lesionstack.train.robustness import evaluate_phone

    art = ArtifactPaths(artifacts_dir)
    r = evaluate_phone(_run_data_dir(artifacts_dir, data), artifacts_dir, model=model, seed=seed)
    for kind in ("clean", "degraded"):
        typer.echo(f"{model} {kind:8s}: OOF pAUC {r[kind]['oof_pauc']:.4f} (folds {r[kind]['fold_pauc_mean']:.4f} "
                   f"+- {r[kind]['fold_pauc_std']:.4f})")
    typer.echo(f"-> {art.robustness_file(model + '.json')}")


@app.command("export")
def export_cmd(
    artifacts_dir: Annotated[Path, typer.Argument(help="Artifacts root holding a distilled student (distill/NAME).")],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder (default: ARTIFACTS/export).")  # noqa: UP045
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write the static QDQ int8 model (student.int8.onnx).")] = (
        False
    ),
    student: Annotated[
        Optional[str], typer.Option(help="Student name (default: the only one under ARTIFACTS/distill).")  # noqa: UP045
    ] = None,
    fold: Annotated[int, typer.Option(help="Which fold's student to export (checked on that fold's crops).")] = 0,
    data: Annotated[
        Optional[Path], typer.Option(help="Data folder (default: the run's source.json).")  # noqa: UP045
    ] = None,
    calibration_crops: Annotated[int, typer.Option(help="Training crops that calibrate the int8 model.")] = 300,
    int8_recipe: Annotated[str, typer.Option(help="s8s8: signed int8 activations (fast on phones and VNNI CPUs); "
                                                  "u8s8: unsigned (fast on AVX2-only x86); a16w8: 16-bit "
                                                  "activations, int8 weights (accurate; QNN HTP).")] = "s8s8",
    int8_weight_bits: Annotated[
        Optional[int], typer.Option(help="7 (default with 8-bit activations): correct on every CPU; 8: full "  # noqa: UP045
                                         "range, for phones, VNNI CPUs and a16w8 (its default; README, Export).")
    ] = None,
) -> None:
    """Export a distilled student to ONNX (fp32, optional int8) with its preprocessing; check parity and pAUC."""
    from lesionstack.inference.export import export_student
    from lesionstack.paths import ArtifactPaths

    out = out or ArtifactPaths(artifacts_dir).export_dir
    r = export_student(_run_data_dir(artifacts_dir, data), artifacts_dir, out, name=student, fold=fold, int8=int8,
                       calibration_crops=calibration_crops, int8_recipe=int8_recipe,
                       int8_weight_bits=int8_weight_bits)
    typer.echo(f"{r['student']} fold {fold} ({r['classifier']}, {r['image_size']} px) via the "
               f"{r['export']['exporter']} exporter, opset {r['export']['opset']}")
    typer.echo(f"  torch pAUC {r['torch']['pauc']:.4f} on {r['n_val']} validation crops (no TTA)")
    diff = r["fp32"]["max_abs_diff_vs_torch"]
    typer.echo(f"  fp32  pAUC {r['fp32']['pauc']:.4f}, max |logit diff| vs torch {diff:.1e}, "
               f"{r['fp32']['bytes'] / 1e6:.2f} MB")
    if int8:
        q = r["int8"]
        typer.echo(f"  int8  pAUC {q['pauc']:.4f} ({q['pauc_minus_fp32']:+.4f} vs fp32), logit corr with fp32 "
                   f"{q['logit_corr_with_fp32']:.3f}, {q['bytes'] / 1e6:.2f} MB, {int8_recipe}, "
                   f"{q['weight_bits']}-bit weights ({'within' if q['within_tolerance'] else 'OUTSIDE'} the "
                   f"0.005 tolerance)")
    typer.echo(f"-> {out}")


def main(argv: Optional[list[str]] = None) -> None:  # noqa: UP045 - typer needs Optional on 3.10
    """Console entry point: an anticipated error ends in one line on stderr and its own exit code (see
    `lesionstack.errors`); `--debug` (anywhere on the line) or LESIONSTACK_DEBUG=1 shows the traceback."""
    import os
    import sys

    from lesionstack._compat import set_offline_env

    set_offline_env()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LESIONSTACK_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args)
    except (Exception, KeyboardInterrupt) as err:  # SystemExit (typer's normal end) passes through
        from lesionstack.errors import classify, one_line

        kind = classify(err)
        if kind is None or debug:
            raise
        typer.echo(one_line(err, kind), err=True)
        sys.exit(kind.code)


if __name__ == "__main__":
    main()
