"""What every command shares: the one spelling of each concept, the lock list, the old spellings' rewrite.

One concept, one spelling: the artifacts root is `--artifacts`/`-a` (default `artifacts`) wherever a command
reads or writes one; a data folder is the positional argument; `--out` names only a new file or folder; a
fold list is one string, `--folds-only 0,1`. The old spellings still work through `modernise`, which rewrites
them before parsing and says so in one line on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from lesionstack.paths import TRAIN_METADATA

Int = Optional[int]  # noqa: UP045 - typer needs Optional on 3.10
Float = Optional[float]  # noqa: UP045
Str = Optional[str]  # noqa: UP045
OptPath = Optional[Path]  # noqa: UP045

ARTIFACTS_FLAGS = ("--artifacts", "-a")
Artifacts = Annotated[Path, typer.Option(*ARTIFACTS_FLAGS, help="Artifacts root of the run.")]
DataDir = Annotated[Path, typer.Argument(help="A data folder in the competition's layout.", show_default=False)]
RunData = Annotated[OptPath, typer.Argument(
    help="The data folder (default: the one the run recorded in ARTIFACTS/source.json).", show_default=False)]
FoldsOnly = Annotated[str, typer.Option(help="Train only these folds, comma-separated, e.g. 0,1 (default: all).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


def config_option(folder: str, built_in: str) -> object:
    """`--config`: what it reads, and what is used without it (the dataclass defaults, not a file)."""
    return typer.Option(help=f"Config YAML ({folder}). Omitted: no file is read; the built-in {built_in} "
                             "defaults apply.", show_default=False)


def fold_list(text: str, option: str = "--folds-only") -> list[int] | None:
    """'0,1' -> [0, 1]; '' -> None (every fold)."""
    try:
        folds = [int(k) for k in text.replace(" ", "").split(",") if k]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected fold numbers separated by commas, e.g. 0,1",
                                 param_hint=option) from None
    if any(k < 0 for k in folds):
        raise typer.BadParameter(f"{text!r}: fold numbers start at 0", param_hint=option)
    return folds or None


# ---- the lock list: every command that writes under an artifacts root, and how it holds the lock ---------

EXCLUSIVE, SHARED = "exclusive", "shared"
LOCKS: dict[str, str] = {
    "folds": EXCLUSIVE, "train-seg": EXCLUSIVE, "train-cnn": EXCLUSIVE, "train-diagnosis": EXCLUSIVE,
    "features": EXCLUSIVE, "tune": SHARED,  # several tune workers may share one study
    "train-stack": EXCLUSIVE, "report": EXCLUSIVE, "run": EXCLUSIVE, "distill": EXCLUSIVE,
    "phone-eval": EXCLUSIVE, "export": EXCLUSIVE,
}
# commands that take an artifacts root and only read it (their outputs go elsewhere: --out)
READS_ONLY = ("predict", "package", "serve", "score")


@contextlib.contextmanager
def artifacts_lock(command: str, root: Path) -> Iterator[Path]:
    """Hold `root`'s lock as the lock list says for `command` (a command missing from the list is a bug)."""
    from lesionstack.lock import run_lock

    with run_lock(root, shared=LOCKS[command] == SHARED) as path:
        yield path


def run_data_dir(artifacts: Path, data: Path | None) -> Path:
    """DATA, else the data folder the run recorded in ARTIFACTS/source.json."""
    from lesionstack.files import read_json
    from lesionstack.paths import ArtifactPaths

    if data is not None:
        return data
    source = ArtifactPaths(artifacts).source
    if not source.is_file():
        raise typer.BadParameter(f"{source} does not exist, so the data folder is unknown: name it (DATA)",
                                 param_hint="DATA")
    return Path(read_json(source)["data_dir"])


# ---- old spellings ---------------------------------------------------------------------------------------

# command -> {old option: new option}
RENAMED: dict[str, dict[str, str]] = {
    **{c: {"--out": "--artifacts"} for c in ("train-seg", "train-cnn", "train-diagnosis", "features", "tune",
                                            "train-stack", "run", "distill")},
}
DATA_OPTIONS = {"distill": "--data", "phone-eval": "--data", "export": "--data", "report": "--data-dir"}
# commands whose artifacts root was their positional argument
POSITIONAL_ARTIFACTS = ("report", "package", "serve", "phone-eval", "export")
_ARTIFACT_MARKS = ("source.json", "folds.csv", "cv.json", "cnn", "distill", ".lesionstack.lock", "run.json")


def notice(text: str) -> None:
    typer.echo(f"lesionstack: deprecated: {text}", err=True)


def modernise(name: str, command: typer.core.TyperCommand, args: list[str]) -> list[str]:
    """Rewrite the old spellings of `name`'s arguments into today's, one notice line each."""
    args = list(args)
    for old, new in RENAMED.get(name, {}).items():
        args = [_rename(a, old, new, name) for a in args]
    data = _pop_option(args, DATA_OPTIONS.get(name), name)
    if name == "train-diagnosis":
        args = _merge_fold_lists(args)
    if name in POSITIONAL_ARTIFACTS:
        args = _positional_artifacts(name, command, args, data)
    elif data is not None:
        args.append(data)
    return args


def _rename(arg: str, old: str, new: str, name: str) -> str:
    if arg == old or arg.startswith(old + "="):
        notice(f"`{name} {old}` is now `{name} {new}` (or -a)")
        return new + arg[len(old):]
    return arg


def _pop_option(args: list[str], flag: str | None, name: str) -> str | None:
    """Remove `flag VALUE` (or flag=VALUE) from args; return VALUE."""
    if flag is None:
        return None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i: i + 2]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
            del args[i]
        else:
            continue
        notice(f"`{name} {flag} DATA` is now the positional argument: `{name} DATA`")
        return value
    return None


def _merge_fold_lists(args: list[str]) -> list[str]:
    """`--folds-only 0 --folds-only 1` (train-diagnosis's old list type) -> `--folds-only 0,1`."""
    picked = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--folds-only"]
    if len(picked) < 2:
        return args
    notice("repeat --folds-only no more: write `--folds-only " + ",".join(picked) + "`")
    rest, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--folds-only":
            skip = True
            continue
        rest.append(a)
    return [*rest, "--folds-only", ",".join(picked)]


def _positionals(command: typer.core.TyperCommand, args: list[str]) -> list[int]:
    """Indexes of the positional arguments in args (options that take a value skip theirs)."""
    takes_value = {o for p in command.params if p.param_type_name == "option" and not p.is_flag
                   for o in p.opts + p.secondary_opts}
    found, i = [], 0
    while i < len(args):
        if args[i] == "--":
            return found + list(range(i + 1, len(args)))
        if args[i].startswith("-") and len(args[i]) > 1:
            i += 2 if args[i] in takes_value else 1
            continue
        found.append(i)
        i += 1
    return found


def _positional_artifacts(name: str, command: typer.core.TyperCommand, args: list[str],
                          data: str | None) -> list[str]:
    """`serve ARTIFACTS` -> `serve --artifacts ARTIFACTS`. Where DATA is today's positional (report,
    phone-eval, export), a lone positional is the old ARTIFACTS when --data named the data folder, or when
    it is a folder of artifacts rather than of data."""
    given = any(a in ARTIFACTS_FLAGS or a.startswith("--artifacts=") for a in args)
    spots = _positionals(command, args)
    takes_data = name in DATA_OPTIONS
    if spots and not given and (not takes_data or data is not None or _artifacts_folder(args[spots[0]])):
        value = args.pop(spots[0])
        notice(f"`{name} ARTIFACTS` is now `{name} --artifacts ARTIFACTS` (or -a)")
        args = ["--artifacts", value, *args]
    return [*args, data] if data is not None else args


def _artifacts_folder(path: str) -> bool:
    folder = Path(path)
    return not (folder / TRAIN_METADATA).is_file() and any((folder / m).exists() for m in _ARTIFACT_MARKS)


class Group(TyperGroup):
    """Typer's group, rewriting old spellings before a command parses its arguments."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):  # type: ignore[no-untyped-def]
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and command is not None:
            rest = modernise(name, command, rest)  # type: ignore[arg-type]
        return name, command, rest


# ---- console -----------------------------------------------------------------------------------------------

class Console(logging.StreamHandler):
    """Stage progress as plain lines on stderr (what the stages used to print); warnings say so. The stream
    is looked up at each record, so a CLI run inside a test runner writes to its captured stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream: it would flush a stream a test runner may have closed
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


