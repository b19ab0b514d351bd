"""Commands that make a run's inputs: `demo-data` (a synthetic data folder) and `folds` (the fold file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lesionstack.cli.common import Artifacts, DataDir, Float, Int, OptPath, Str, artifacts_lock
from lesionstack.paths import DEFAULT_ARTIFACTS, ArtifactPaths


def demo_data_cmd(
    out: Annotated[Path, typer.Argument(help="New folder to write the synthetic data set into.",
                                        show_default=False)],
    patients: Annotated[Int, typer.Option(help="Number of training patients.", show_default="100")] = None,
    lesions_per_patient: Annotated[Float, typer.Option(help="Mean lesions per patient, ~385 in real data.",
                                                       show_default="30.0")] = None,
    seed: Annotated[Int, typer.Option(help="Random seed; the same seed writes the same files.",
                                      show_default="0")] = None,
    positive_rate: Annotated[Float, typer.Option(help="Share of malignant lesions, 0.001 in real data.",
                                                 show_default="0.03")] = None,
    masks: Annotated[Int, typer.Option(help="Training crops copied to masks/ with their masks.",
                                       show_default="300")] = None,
    test_fraction: Annotated[Float, typer.Option(help="Test patients per training patient.",
                                                 show_default="0.1")] = None,
    workers: Annotated[Int, typer.Option(help="Rendering processes; never changes the output.",
                                         show_default="CPU cores")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing data set in OUT.")] = False,
    diagnosis_cues: Annotated[bool, typer.Option(
        help="Malignant crops also show a cue of their iddx diagnosis (for train-diagnosis); metadata unchanged.")
    ] = False,
    ham10000: Annotated[Int, typer.Option(
        help="Instead: write a HAM10000-layout folder (metadata + image folders) with this many lesions.")
    ] = None,
    archive: Annotated[Int, typer.Option(
        help="Instead: write a synthetic ISIC Archive download (`isic image download` layout: <isic_id>.JPG + "
             "metadata.csv) with this many images, for the CNN config's `archive` key.")
    ] = None,
) -> None:
    """Write a synthetic data set in exactly the competition's layout, plus masks/ for the segmenter."""
    from lesionstack.config import load_config
    from lesionstack.data.synthetic import DemoDataError, DemoSpec, write_demo_data, write_ham10000_demo

    try:
        if ham10000 is not None:
            typer.echo(write_ham10000_demo(out, lesions=ham10000, seed=seed or DemoSpec.seed, overwrite=overwrite))
            return
        if archive is not None:
            from lesionstack.data.synthetic_archive import write_archive_demo

            typer.echo(write_archive_demo(out, images=archive, seed=seed or DemoSpec.seed, overwrite=overwrite))
            return
        spec = load_config(DemoSpec, None, patients=patients, lesions_per_patient=lesions_per_patient, seed=seed,
                           positive_rate=positive_rate, mask_count=masks, test_fraction=test_fraction,
                           diagnosis_cues=diagnosis_cues)
        summary = write_demo_data(out, spec, overwrite=overwrite, workers=workers)
    except DemoDataError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(summary)


def folds_cmd(
    data: DataDir,
    artifacts: Artifacts = DEFAULT_ARTIFACTS,
    out: Annotated[OptPath, typer.Option(help="Write the fold file here instead of ARTIFACTS/folds.csv (e.g. "
                                              "into the repository's folds/ folder).", show_default=False)] = None,
    n_folds: Annotated[Int, typer.Option(help="Number of folds.", show_default="5")] = None,
    seed: Annotated[Int, typer.Option(help="Random seed.", show_default="42")] = None,
    method: Annotated[Str, typer.Option(help="greedy (balances positives) or sklearn.",
                                        show_default="greedy")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing fold file with different content.")] = False,
    group: Annotated[Str, typer.Option(
        help="Column whose values each stay in one fold: attribution gives leave-institution-out folds.",
        show_default="patient_id")] = None,
) -> None:
    """Patient-grouped, stratified K folds of the training metadata (written once, read everywhere)."""
    from lesionstack.paths import DataPaths
    from lesionstack.preflight import check_data, check_writable

    path = out or ArtifactPaths(artifacts).folds
    check_data(DataPaths(data), test=False)  # before the fold code (scikit-learn) is even imported
    check_writable(path.parent)
    from lesionstack.config import load_config
    from lesionstack.folds import FoldsConfig, FoldsResult, fold_group, make_folds_file

    cfg = load_config(FoldsConfig, None, n_folds=n_folds, seed=seed, method=method, group=group)
    with artifacts_lock("folds", path.parent):
        table = make_folds_file(data, path, n_folds=cfg.n_folds, seed=cfg.seed, method=cfg.method,  # type: ignore[arg-type]
                                force=force, group=cfg.group)
    folds = FoldsResult.of(table, path)
    typer.echo(f"wrote {path}: {sum(folds.lesions)} rows, {folds.n_patients} patients")
    by = fold_group(table)
    for fold, (n, pos) in enumerate(zip(folds.lesions, folds.positives, strict=True)):
        held = f" ({'; '.join(sorted(table.loc[table['fold'] == fold, by].unique()))})" if by else ""
        typer.echo(f"  fold {fold}: {n} lesions, {pos} positives{held}")


def register(app: typer.Typer) -> None:
    app.command("demo-data")(demo_data_cmd)
    app.command("folds")(folds_cmd)
