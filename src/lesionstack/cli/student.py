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
    import logging

    from lesionstack.preflight import check_data, check_writable, exists
    from lesionstack.train.distill import distill
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
    student = name or (config.stem if config is not None else "default")
    with artifacts_lock("distill", artifacts):
        summary = distill(data, artifacts, cfg, name=student, folds_only=only)
    for fold, m in summary["folds"].items():
        typer.echo(f"fold {fold}: kept epoch {m['best_epoch']}: pAUC {m['best_pauc']:.4f}")
    if "oof_pauc" in summary:
        typer.echo(f"student {student}: OOF pAUC {summary['oof_pauc']:.4f} (folds {summary['fold_pauc_mean']:.4f} "
                   f"+- {summary['fold_pauc_std']:.4f}) -> {art.distill_dir(student)}")


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
    from lesionstack.train.robustness import evaluate_phone

    art = ArtifactPaths(artifacts)
    exists(artifacts, "artifacts folder", folder=True)
    data = run_data_dir(artifacts, data)
    exists(data, "data folder", folder=True)
    check_writable(artifacts)
    with artifacts_lock("phone-eval", artifacts):
        r = evaluate_phone(data, artifacts, model=model, seed=seed)
    for kind in ("clean", "degraded"):
        typer.echo(f"{model} {kind:8s}: OOF pAUC {r[kind]['oof_pauc']:.4f} (folds {r[kind]['fold_pauc_mean']:.4f} "
                   f"+- {r[kind]['fold_pauc_std']:.4f})")
    typer.echo(f"-> {art.robustness_file(model + '.json')}")


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
    from lesionstack.inference.export import export_student
    from lesionstack.preflight import check_writable, exists

    out = out or ArtifactPaths(artifacts).export_dir
    exists(artifacts / "distill", "distilled students folder (from `lesionstack distill`)", folder=True)
    data = run_data_dir(artifacts, data)
    exists(data, "data folder", folder=True)
    check_writable(out)
    with artifacts_lock("export", artifacts):
        r = export_student(data, artifacts, out, name=student, fold=fold, int8=int8,
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


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
    app.command("phone-eval")(phone_eval_cmd)
    app.command("export")(export_cmd)
