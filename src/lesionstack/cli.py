"""The `lesionstack` command: one subcommand per pipeline stage.

Each command only parses arguments and calls the stage's function; the stage modules are imported inside
the commands, so `lesionstack --help` stays fast and importing this module does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="lesionstack",
    help="Skin-cancer detection for ISIC 2024: folds -> segment-then-classify CNN -> GBDT stack -> submission.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DataDir = Annotated[Path, typer.Argument(help="A data folder in the competition's layout.")]


@app.command("demo-data")
def demo_data_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic data set into.")],
    patients: Annotated[int, typer.Option(help="Number of training patients.")] = 100,
    lesions_per_patient: Annotated[
        float, typer.Option(help="Mean lesions per patient (about 385 in the real data).")
    ] = 30.0,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing data set in OUT_DIR.")] = False,
) -> None:
    """Write a synthetic data set in exactly the competition's layout, plus masks/ for the segmenter."""
    from lesionstack.data.synthetic import DemoSpec, write_demo_data

    spec = DemoSpec(patients=patients, lesions_per_patient=lesions_per_patient, seed=seed)
    summary = write_demo_data(out_dir, spec, overwrite=overwrite)
    typer.echo(summary)


@app.command("folds")
def folds_cmd(
    data_dir: DataDir,
    out: Annotated[Path, typer.Option("--out", help="Fold file to write (CSV).")] = Path("artifacts/folds.csv"),
    n_folds: Annotated[int, typer.Option(help="Number of folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    force: Annotated[bool, typer.Option(help="Overwrite an existing fold file with different content.")] = False,
) -> None:
    """Patient-grouped, stratified K folds of the training metadata (written once, read everywhere)."""
    from lesionstack.folds import make_folds_file

    folds = make_folds_file(data_dir, out, n_folds=n_folds, seed=seed, force=force)
    counts = folds.groupby("fold")["target"].agg(["size", "sum"])
    typer.echo(f"wrote {out}: {len(folds)} rows, {folds['patient_id'].nunique()} patients")
    for fold, row in counts.iterrows():
        typer.echo(f"  fold {fold}: {row['size']} lesions, {row['sum']} positives")


def main(argv: Optional[list[str]] = None) -> None:  # noqa: UP045 - typer needs Optional on 3.10
    """Console entry point."""
    from lesionstack._compat import set_offline_env

    set_offline_env()
    app(args=argv)


if __name__ == "__main__":
    main()
