"""The project's exceptions: each one in the exit-code table survives pickling (so an error raised in a fold
worker, a DataLoader worker or a scoring pool reaches the user as its one line), and no message a user reads
holds a Python object repr."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import re
from pathlib import Path

import pytest

import lesionstack
from lesionstack.errors import ERROR_KINDS, classify, one_line


def _project_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in the package, by name (importing each module: they do nothing)."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(lesionstack.__path__, "lesionstack."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("lesionstack"):
                found[name] = obj
    return found


EXCEPTIONS = _project_exceptions()
# the table's SQLAlchemy entry is not ours; every other name in it must be a project class
TABLE = sorted(name for name in ERROR_KINDS if name != "OperationalError")


def _build(cls: type[BaseException]) -> BaseException:
    """An instance made from its constructor's own parameters: ints for int, strings for the rest."""
    args = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        args.append(413 if "int" in str(p.annotation) else f"{p.name} of the {cls.__name__}")
    return cls(*args) if args else cls(f"a message of the {cls.__name__}")


def test_every_name_in_the_table_is_a_project_exception() -> None:
    assert set(TABLE) <= set(EXCEPTIONS), set(TABLE) - set(EXCEPTIONS)


@pytest.mark.parametrize("name", sorted(EXCEPTIONS))
def test_every_project_exception_survives_pickling(name: str) -> None:
    err = _build(EXCEPTIONS[name])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert vars(back) == vars(err)  # attributes too (CorruptImageError.isic_id, UploadError.status)


def test_corrupt_image_error_keeps_its_parts_across_pickling() -> None:
    from lesionstack.data.decode import CorruptImageError, ImageTooLargeError

    err = ImageTooLargeError("ISIC_0000005", "12000x12000 px", Path("train-image.hdf5"))
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, CorruptImageError) and back.isic_id == "ISIC_0000005"
    assert str(back) == "image 'ISIC_0000005' in train-image.hdf5: 12000x12000 px"
    assert classify(back) is ERROR_KINDS["CorruptImageError"]


def test_a_corrupt_crop_in_a_fold_worker_reaches_the_parent_naming_it(tmp_path: Path) -> None:
    """Two fold workers, as the demo config runs them: the worker's error is rebuilt in the parent (it used
    to end as BrokenProcessPool) and keeps its one line."""
    from helpers import make_cnn_data, tiny_cnn_config
    from lesionstack.data.decode import CorruptImageError
    from lesionstack.train.cnn import train_cnn

    root = make_cnn_data(tmp_path / "data", corrupt=("ISIC_0000005",))
    cfg = tiny_cnn_config("none", epochs=1, batch_size=4, fold_workers=2)
    with pytest.raises(CorruptImageError) as caught:
        train_cnn(root, root / "folds.csv", cfg, tmp_path / "art")
    line = one_line(caught.value, classify(caught.value))
    assert "ISIC_0000005" in line and "train-image.hdf5" in line and line.startswith("lesionstack: image error:")


REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")


@pytest.mark.parametrize("name", sorted(EXCEPTIONS))
def test_no_message_holds_an_object_repr(name: str) -> None:
    err = _build(EXCEPTIONS[name])
    kind = classify(err)
    if kind is not None:
        assert not REPR.search(one_line(err, kind))


@pytest.mark.parametrize("data", [b"GIF89a not really", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"BM garbage bytes"])
def test_undecodable_bytes_are_described_without_a_repr(data: bytes) -> None:
    """Pillow names its in-memory file `<_io.BytesIO object at 0x...>`; the user reads what failed, no repr."""
    from lesionstack.data.decode import CorruptImageError, decode_image
    from lesionstack.inference.upload import UploadError, decode_upload

    with pytest.raises(CorruptImageError) as caught:
        decode_image(data, where="lesion.png")
    assert not REPR.search(str(caught.value)) and "lesion.png" in str(caught.value)
    assert " )" not in str(caught.value)  # the repr went, with the space before it
    with pytest.raises(UploadError) as refused:
        decode_upload(data)
    assert not REPR.search(str(refused.value))
