"""Commands that use a trained run: `predict`, `score`, `serve`, `package`, `report`, `compare`.

Each checks its paths and the trained artifacts it will load before loading any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lesionstack.cli.common import Artifacts, Device, OptPath, RunData, Str, artifacts_lock, config_option
from lesionstack.paths import DEFAULT_ARTIFACTS, PROBS, SUBMISSION, ArtifactPaths, DataPaths


def predict_cmd(
    data: Annotated[Path, typer.Argument(help="Folder with test-metadata.csv and test-image.hdf5.",
                                         show_default=False)],
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    out: Annotated[Path, typer.Option(help="Submission file to write.")] = Path(SUBMISSION),
    device: Device = "auto",
) -> None:
    """Score the test files with trained artifacts; write a validated submission.csv (atomically)."""
    from lesionstack.preflight import check_data, check_stack, check_writable

    check_data(DataPaths(data), train=False)
    check_stack(artifacts)
    check_writable(out.parent)
    from lesionstack.inference.submit import predict

    scores = predict(data, artifacts, out, device=device)
    typer.echo(f"wrote {out}: {len(scores)} rows")


def score_cmd(
    paths: Annotated[list[Path], typer.Argument(help="JPEG/PNG files and folders (searched recursively).",
                                                show_default=False)],
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    out: Annotated[Path, typer.Option(help="CSV to write: path, probability, error.")] = Path(PROBS),
    device: Device = "auto",
) -> None:
    """Score image files with a trained bundle; an unreadable file becomes a row with its error."""
    from lesionstack.preflight import check_bundle, check_paths, check_writable

    check_paths(paths)
    check_bundle(artifacts)
    check_writable(out.parent)
    from lesionstack.inference.score import score

    table = score(paths, artifacts, out, device=device)
    failed = int((table["error"] != "").sum())
    typer.echo(f"wrote {out}: {len(table)} rows, {failed} unreadable")


def serve_cmd(
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token: Annotated[Str, typer.Option(help="Required on every request: Authorization: Bearer TOKEN (or as the "
                                            "HTTP Basic password in a browser).", envvar="LESIONSTACK_TOKEN",
                                       show_default=False)] = None,
    device: Device = "auto",
    model: Annotated[str, typer.Option(help="cnn: the CNN fold ensemble; student: the ONNX student (ONNX "
                                            "Runtime); auto: the CNN when the bundle has one, else "
                                            "ARTIFACTS/export's student.")] = "auto",
    student_onnx: Annotated[OptPath, typer.Option(
        "--student-onnx", help="An `export` folder to serve the ONNX student from; implies --model student.",
        show_default="ARTIFACTS/export")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Serve student.int8.onnx instead of the fp32 file.")] = False,
) -> None:
    """A local web page and JSON API (POST /api/predict) that score one lesion photo; uploads are never stored."""
    from lesionstack.preflight import check_bundle, exists

    if student_onnx is not None:
        exists(student_onnx, "export folder", folder=True)
    else:
        check_bundle(artifacts)  # before the web stack and the models load
    from lesionstack.inference.serve import check_host, serve

    try:
        check_host(host, token)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--host") from err
    if student_onnx is not None and model == "cnn":
        raise typer.BadParameter("--student-onnx serves the ONNX student; drop --model cnn", param_hint="--model")
    typer.echo(f"loading {artifacts}; then serving http://{host}:{port}/ (API docs at /docs)")
    model = "student" if student_onnx is not None else model
    serve(artifacts, host=host, port=port, token=token, device=device, model=model, student_dir=student_onnx,
          int8=int8)


def package_cmd(
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    out: Annotated[Path, typer.Option(help="Folder to build (for `kaggle datasets create -p`).")] = Path(
        "kaggle-dataset"),
    dataset_id: Annotated[str, typer.Option(help="Kaggle dataset id, USER/SLUG.")] = (
        "your-kaggle-username/lesionstack-model"),
    python: Annotated[Str, typer.Option(help="Target Pythons, comma-separated, e.g. 3.12,3.13.",
                                        show_default="kaggle/image.yaml's pythons")] = None,
    platform: Annotated[Str, typer.Option(help="Target platform tag, e.g. manylinux2014_x86_64.",
                                          show_default="Kaggle's, from kaggle/image.yaml")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Ship the fold CNN weights as float16 (half the size).")] = False,
) -> None:
    """Build the Kaggle dataset: wheels of what Kaggle's image lacks (for each of its Pythons and its
    platform, tags checked), the trained models, the kernel, dataset-metadata.json; prints the bundle's size."""
    from dataclasses import replace

    from lesionstack.inference.package import describe, image_targets, package, read_image
    from lesionstack.preflight import check_stack, check_writable

    check_stack(artifacts)
    check_writable(out)
    targets = image_targets(read_image())
    if python:
        targets = [replace(targets[0], python=p.strip()) for p in python.split(",") if p.strip()]
    targets = [replace(t, platform=platform or t.platform) for t in targets]
    path = package(artifacts, out, dataset_id=dataset_id, targets=targets, fp16=fp16)
    typer.echo(describe(path))
    typer.echo(f"upload with: kaggle datasets create -p {path}")


def report_cmd(
    data: RunData = None,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    out: Annotated[OptPath, typer.Option(help="Report folder.", show_default="ARTIFACTS/report")] = None,
    config: Annotated[OptPath, config_option("configs/report/", "ReportConfig")] = None,
) -> None:
    """Write the evaluation report: an offline HTML page with PNG figures beside it."""
    from lesionstack.preflight import check_writable, exists
    from lesionstack.report import write_report

    exists(artifacts, "artifacts folder", folder=True)
    if data is not None:
        exists(data, "data folder", folder=True)
    check_writable(out or ArtifactPaths(artifacts).report_dir)
    with artifacts_lock("report", artifacts):
        page = write_report(artifacts, data_dir=data, out_dir=out, config=config)
    typer.echo(f"report: {page}")


def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(
        help="Artifacts roots: RUN_A RUN_B, or A1..An B1..Bn (one pair per CV seed; the first half is A).",
        show_default=False)],
    out: Annotated[Path, typer.Option(help="JSON file to write.")] = Path("compare.json"),
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


def register(app: typer.Typer) -> None:
    for name, command in (("predict", predict_cmd), ("package", package_cmd), ("serve", serve_cmd),
                          ("score", score_cmd), ("report", report_cmd), ("compare", compare_cmd)):
        app.command(name)(command)


