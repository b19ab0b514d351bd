"""The errors the tool anticipates, as the command line reports them: one line, a hint, an exit code.

`lesionstack` ends an anticipated error with one or two lines on stderr (the message names the file, the
column or key and the row; the hint says what to do) and a distinct exit code per kind, so a script can
tell a bad config from a full disk. The traceback is shown only with `--debug` or `LESIONSTACK_DEBUG=1`.
An exception not listed here is a bug: it keeps its full traceback (exit code 1).

Errors are matched by class name along the exception's MRO, so this module imports no stage module and
`lesionstack --help` stays fast.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKind:
    code: int
    kind: str
    hint: str


# class name -> what the user reads; docs/troubleshooting.md's exit-code table is this table
ERROR_KINDS: dict[str, ErrorKind] = {
    "ConfigError": ErrorKind(3, "config", "fix the config key named above (a config changed under an existing run: "
                                      "put the old one back, or use a new --artifacts folder)"),
    "MetadataError": ErrorKind(4, "metadata", "fix the CSV file, column and row named above (or the HDF5 "
                                "file it names)"),
    "CorruptImageError": ErrorKind(5, "image", "replace or drop the image named above"),
    "ImageFileError": ErrorKind(5, "image", "check the HDF5 file named above (copy it again if truncated)"),
    "FoldError": ErrorKind(6, "folds", "make the fold file again with `lesionstack folds DATA` on this data "
                                 "(another seed or K if a fold lacks a class)"),
    "MetricError": ErrorKind(7, "metric", "each fold's validation set needs both classes: rebuild the folds"),
    "FeatureError": ErrorKind(8, "features", "rebuild the features with `lesionstack features`"),
    "StackError": ErrorKind(9, "stack", "rebuild the features (or the CNN scores) from the fold file named above"),
    "PairingError": ErrorKind(9, "stack", "rescore the test crops per fold (`lesionstack train-cnn`), or retrain "
                              "the stacker on the CNN's fold file, as named above"),
    "SubmissionError": ErrorKind(10, "submission", "check the test files and the trained artifacts named above"),
    "ReportError": ErrorKind(11, "report", "run the stage that writes the missing file, then the report"),
    "MaskDataError": ErrorKind(12, "masks", "fix the masks folder named above"),
    "CompareError": ErrorKind(19, "compare", "compare runs trained on one fold file, scoring the same lesions "
                              "(one pair per CV seed: A runs first, then as many B runs)"),
    "DiagnosisDataError": ErrorKind(18, "diagnosis data", "fix the data folder, or the label file, column and "
                                    "row, named above (or the class mapping in the diagnosis config)"),
    "WeightsError": ErrorKind(15, "weights", "point the config at weights of the named architecture"),
    "DemoDataError": ErrorKind(16, "demo-data", "change the demo-data option named above"),
    "PredictorError": ErrorKind(17, "predictor", "check the trained artifacts folder named above (a finished run?)"),
    "RunLockedError": ErrorKind(13, "locked", "wait for the other command to finish, or use another "
                                "--artifacts folder"),
    # SQLAlchemy's: Optuna could not reach or use the --storage database
    "OperationalError": ErrorKind(14, "storage", "check the --storage URL (server running? user, database?)"),
}
MISSING = ErrorKind(20, "missing", "check the path (a typo, or a stage not run yet?)")
EXISTS = ErrorKind(21, "exists", "choose another output path, or remove the one named above")
DISK_FULL = ErrorKind(22, "disk full", "free space there, or write elsewhere (--artifacts, --out); then rerun "
                                                      "(it resumes)")
NOT_WRITABLE = ErrorKind(23, "not writable", "choose a writable --artifacts (or --out) folder, or fix "
                                                            "the permissions")
INTERRUPTED = ErrorKind(130, "interrupted", "rerun the same command to resume where it stopped")

_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def classify(err: BaseException) -> ErrorKind | None:
    """The kind of an anticipated error, or None for a bug (which keeps its traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    for cls in type(err).__mro__:
        if cls.__name__ in ERROR_KINDS:
            return ERROR_KINDS[cls.__name__]
    if isinstance(err, FileNotFoundError | NotADirectoryError):
        return MISSING
    if isinstance(err, FileExistsError):
        return EXISTS
    if isinstance(err, OSError):
        if err.errno in _DISK_FULL or (err.errno is None and "No space left on device" in str(err)):
            return DISK_FULL
        if err.errno in _NOT_WRITABLE:
            return NOT_WRITABLE
    return None


_ERRNO = re.compile(r"^\[Errno \d+\] ")
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def plain(err: BaseException) -> str:
    """A library's message without the Python object reprs some put in it (Pillow names the in-memory file it
    read as `<_io.BytesIO object at 0x...>`): "cannot identify image file <...>" reads "cannot identify image
    file"."""
    return _OBJECT_REPR.sub("", str(err))


def one_line(err: BaseException, kind: ErrorKind) -> str:
    """`lesionstack: <kind> error: <message>` + the hint on a second line."""
    message = " ".join(plain(err).split()) or type(err).__name__  # one line whatever the message held
    message = _ERRNO.sub("", message)  # "[Errno 13] ..." -> "..."
    if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
        message = f"{message}: {err.filename}"
    return f"lesionstack: {kind.kind} error: {message}\n  what to do: {kind.hint}"


def exit_code_table() -> list[tuple[int, str, list[str]]]:
    """(code, kind, exception names) for every code, in order: docs/troubleshooting.md's table is checked
    against it."""
    rows: dict[int, tuple[str, list[str]]] = {}
    for name, k in ERROR_KINDS.items():
        rows.setdefault(k.code, (k.kind, []))[1].append(name)
    rows[MISSING.code] = (MISSING.kind, ["FileNotFoundError", "NotADirectoryError"])
    rows[EXISTS.code] = (EXISTS.kind, ["FileExistsError"])
    rows[DISK_FULL.code] = (DISK_FULL.kind, ["OSError ENOSPC/EDQUOT"])
    rows[NOT_WRITABLE.code] = (NOT_WRITABLE.kind, ["OSError EROFS/EACCES/EPERM"])
    rows[INTERRUPTED.code] = (INTERRUPTED.kind, ["KeyboardInterrupt"])
    return [(code, kind, names) for code, (kind, names) in sorted(rows.items())]
