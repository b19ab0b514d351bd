"""The `lesionstack` command: one subcommand per pipeline stage.

Each command parses its arguments, checks everything it will need (`lesionstack.preflight`), takes the
artifacts lock when it writes there (`common.LOCKS`), and calls the stage's function. The stage modules are
imported inside the commands, so `lesionstack --help` stays fast and importing this package does nothing
but build the command table. The commands live by group: `prepare` (data, folds), `train` (the training
stages and `run`), `student` (distillation, phone evaluation, export), `use` (predict, score, serve,
package, report).
"""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from lesionstack.cli.common import Console, Group

app = typer.Typer(
    name="lesionstack",
    cls=Group,
    help="Skin-cancer detection for ISIC 2024: folds -> segment-then-classify CNN -> GBDT stack -> submission.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _console_logging(
    debug: Annotated[bool, typer.Option(
        "--debug", help="On an error, show the full traceback instead of one line (also anywhere on the line, "
                        "or LESIONSTACK_DEBUG=1).")] = False,
) -> None:
    """Stages report through `logging` (and tqdm bars): show lesionstack's INFO lines and up."""
    logger = logging.getLogger("lesionstack")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, Console) for h in logger.handlers):
        logger.addHandler(Console())


def _register() -> None:
    from lesionstack.cli import prepare, student, train, use

    for module in (prepare, train, student, use):
        module.register(app)


_register()


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
