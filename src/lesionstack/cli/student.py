"""Commands on image-only students: `distill` (train), `phone-eval` (robustness), `export` (ONNX)."""

from __future__ import annotations

from typing import Annotated

import typer

from lesionstack.cli.common import (
    Artifacts,
    FoldsOnly,
    Int,
    OptPath,
    RunData,
    Str,
    artifacts_lock,
    config_option,
    fold_list,
    run_data_dir,
)
from lesionstack.paths import DEFAULT_ARTIFACTS, ArtifactPaths, DataPaths


def distill_cmd(
    data: RunData = None,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    config: Annotated[OptPath, config_option("configs/distill/", "DistillConfig")] = None,
    name: Annotated[Str, typer.Option(help="Student name: ARTIFACTS/distill/NAME.",
                                      show_default="the config's file stem, or default")] = None,
    folds_only: FoldsOnly = "",
) -> None:
    """Distil the stacker into an image-only student per fold (no-leak nested teacher); write OOF scores."""
    import dataclasses
    import logging

    from lesionstack.preflight import check_data, check_writable, exists
    from lesionstack.train.distill import distill_stage
    from lesionstack.train.distill_config import load_distill_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    art = ArtifactPaths(artifacts)
    only = fold_list(folds_only)
    cfg = load_distill_config(config)
    exists(artifacts, "artifacts folder", folder=True)
    data = run_data_dir(artifacts, data)
    check_data(DataPaths(data), test=False)
    exists(art.folds, "fold file (from `lesionstack folds` or `run`)")
    check_writable(artifacts)
    cfg = dataclasses.replace(cfg, name=name or cfg.name or (config.stem if config is not None else "default"))
    with artifacts_lock("distill", artifacts):
        result = distill_stage(DataPaths(data), art, cfg, folds_only=only)
    typer.echo(result)


def phone_eval_cmd(
    data: RunData = None,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    model: Annotated[str, typer.Option(help="'cnn' or the name of a distilled student (ARTIFACTS/distill/NAME).")] = (
        "cnn"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the degraded copy (the same for every model).")] = 0,
) -> None:
    """OOF pAUC of an image model on its validation crops, clean and degraded like phone photos."""
    from lesionstack.preflight import check_writable, exists
    from lesionstack.train.robustness import PhoneEvalConfig, phone_stage

    art = ArtifactPaths(artifacts)
    exists(artifacts, "artifacts folder", folder=True)
    data = run_data_dir(artifacts, data)
    exists(data, "data folder", folder=True)
    check_writable(artifacts)
    with artifacts_lock("phone-eval", artifacts):
        result = phone_stage(DataPaths(data), art, PhoneEvalConfig(model=model, seed=seed))
    typer.echo(result)


def export_cmd(
    data: RunData = None,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    out: Annotated[OptPath, typer.Option(help="Output folder.", show_default="ARTIFACTS/export")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write the static QDQ int8 model (student.int8.onnx).")] = (
        False
    ),
    student: Annotated[Str, typer.Option(help="Student name.",
                                         show_default="the only one under ARTIFACTS/distill")] = None,
    fold: Annotated[int, typer.Option(help="Which fold's student to export (checked on that fold's crops).")] = 0,
    calibration_crops: Annotated[int, typer.Option(help="Training crops that calibrate the int8 model.")] = 300,
    int8_recipe: Annotated[str, typer.Option(help="s8s8: signed int8 activations (fast on phones and VNNI CPUs); "
                                                  "u8s8: unsigned (fast on AVX2-only x86); a16w8: 16-bit "
                                                  "activations, int8 weights (accurate; QNN HTP).")] = "s8s8",
    int8_weight_bits: Annotated[Int, typer.Option(
        help="7: correct on every CPU; 8: full range, for phones, VNNI CPUs and a16w8.",
        show_default="7 with 8-bit activations, 8 with a16w8")] = None,
) -> None:
    """Export a distilled student to ONNX (fp32, optional int8) with its preprocessing; check parity and pAUC."""
    from lesionstack.inference.export import ExportOptions, Int8Options, export_stage
    from lesionstack.preflight import check_writable, exists

    out = out or ArtifactPaths(artifacts).export_dir
    exists(artifacts / "distill", "distilled students folder (from `lesionstack distill`)", folder=True)
    data = run_data_dir(artifacts, data)
    exists(data, "data folder", folder=True)
    check_writable(out)
    with artifacts_lock("export", artifacts):
        options = ExportOptions(out, student, fold, int8,
                                Int8Options(int8_recipe, int8_weight_bits, calibration_crops))
        result = export_stage(DataPaths(data), ArtifactPaths(artifacts), options)
    typer.echo(result)


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
    app.command("phone-eval")(phone_eval_cmd)
    app.command("export")(export_cmd)
