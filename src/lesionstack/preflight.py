"""Checks every command makes before its first stage, so a missing or mismatched input stops it in seconds
with one line naming the file, and nothing is written (not even the artifacts folder).

The checks read (metadata, HDF5 keys, fold files, folder listings) and never write. `run_plan` says, for
`lesionstack run`, which stage runs and which reuses what is on disk.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lesionstack.paths import ArtifactPaths, DataPaths

if TYPE_CHECKING:
    import pandas as pd

    from lesionstack.run_config import RunConfig
    from lesionstack.train.cnn_config import CNNConfig


def check_data(data: DataPaths, *, train: bool = True, test: bool = True) -> None:
    """The data folder holds the files a command reads, with readable metadata whose ids all have a crop."""
    exists(data.root, "data folder", folder=True)
    if train:
        check_split(data.train_metadata, data.train_images, "train")
    if test:
        check_split(data.test_metadata, data.test_images, "test")


def check_crops(data: DataPaths) -> None:
    """What the CNN reads: the training and test HDF5 (it scores the test crops when its last fold ends), and
    the metadata beside them when the folder has it."""
    exists(data.root, "data folder", folder=True)
    for metadata, images, kind in ((data.train_metadata, data.train_images, "train"),
                                   (data.test_metadata, data.test_images, "test")):
        if metadata.is_file():
            check_split(metadata, images, kind)
        else:
            exists(images, f"{kind} images (HDF5)")


def check_split(metadata: Path, images: Path, kind: str) -> pd.DataFrame:
    """One split's metadata CSV and HDF5: both there, schema checked, every metadata id with a crop."""
    from lesionstack.data.hdf5 import H5Images
    from lesionstack.data.metadata import check_images_cover, read_metadata

    exists(metadata, f"{kind} metadata")
    exists(images, f"{kind} images (HDF5)")
    table = read_metadata(metadata, kind=kind)  # type: ignore[arg-type]
    with H5Images(images) as h5:
        check_images_cover(table, set(h5.ids), metadata, images)
    return table


def check_fold_file(folds: Path, data: DataPaths) -> None:
    """The fold file exists, is well formed, and was made from this data: its ids are the training metadata's
    (or, in a folder of crops without metadata, all in the training HDF5)."""
    import pandas as pd

    from lesionstack.data.hdf5 import H5Images
    from lesionstack.data.schema import ID_COLUMN
    from lesionstack.folds import FoldError, read_folds

    table = read_folds(folds)
    if data.train_metadata.is_file():
        source = data.train_metadata
        train = set(pd.read_csv(source, usecols=[ID_COLUMN], dtype=str)[ID_COLUMN])
        absent = len(train - set(table[ID_COLUMN]))
        if absent:
            raise FoldError(f"{folds}: {absent} of the {len(train)} ids of {source} have no fold: the fold file "
                            "was made from other data")
    else:
        source = data.train_images
        with H5Images(source) as h5:
            train = set(h5.ids)
    unknown = sorted(set(table[ID_COLUMN]) - train)
    if unknown:
        raise FoldError(f"{folds}: {len(unknown)} of its {len(table)} ids are not in {source} (e.g. {unknown[0]}): "
                        "the fold file was made from other data")


def check_masks(masks: Path) -> int:
    """A masks folder in the ISIC 2018 Task 1 layout; returns its number of image/mask pairs."""
    from lesionstack.train.segmenter import find_pairs

    exists(masks, "masks folder", folder=True)
    return len(find_pairs(masks))


def check_weights(cfg: CNNConfig, where: str) -> None:
    """Local weight files the CNN config names exist (nothing is downloaded)."""
    from lesionstack.train.cnn_config import check_weights_files

    check_weights_files(cfg.model, where)


def check_writable(root: Path) -> None:
    """The artifacts root is a folder, or can be made as one (its nearest existing parent is writable)."""
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise NotADirectoryError(f"{root}: a file, not a folder; the artifacts root must be a folder")
        probe = root
    else:
        probe = next(p for p in root.absolute().parents if p.exists())
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe}: a file, not a folder, so the artifacts root {root} cannot be made")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{probe}: not writable, so the artifacts root {root} cannot be written")


def check_bundle(artifacts: Path) -> None:
    """A trained artifacts folder: finished CNN folds, or an exported student (what score and serve load)."""
    exists(artifacts, "artifacts folder", folder=True)
    art = ArtifactPaths(artifacts)
    if not any(art.cnn_dir.glob("fold_*/DONE")) and not (art.export_dir / "export.json").is_file():
        what = "a data folder, not an artifacts folder" if DataPaths(artifacts).train_metadata.is_file() else \
            "no trained model"
        raise FileNotFoundError(f"{artifacts}: {what}: neither finished CNN folds ({art.cnn_dir}/fold_*/DONE) nor "
                             f"an exported student ({art.export_dir}/export.json)")


def check_stack(artifacts: Path) -> None:
    """A trained stacker (what predict scores the test set with), checked before any crop is scored."""
    exists(artifacts, "artifacts folder", folder=True)
    art = ArtifactPaths(artifacts)
    if not any(art.stack_dir.glob("fold_*/DONE")):
        raise FileNotFoundError(f"{artifacts}: no trained stacker ({art.stack_dir}/fold_*/DONE); train it with "
                             "`lesionstack train-stack` or `lesionstack run`")


def check_paths(paths: list[Path]) -> None:
    """Files or folders named on the command line all exist."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: no such file or folder{more}")


def exists(path: Path, what: str, *, folder: bool = False) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    if folder and not path.is_dir():
        raise NotADirectoryError(f"{path}: the {what} is a file, not a folder")


# ---- lesionstack run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    stage: str
    action: str  # run, reuse, skip
    why: str

    def __str__(self) -> str:
        return f"  {self.stage:<10} {self.action:<6} {self.why}"


def check_run(data: DataPaths, art: ArtifactPaths, cfg: RunConfig) -> list[Step]:
    """Everything `run` will read, checked up front; returns the plan (stage, run or reuse, why)."""
    check_writable(art.root)
    check_data(data)
    check_weights(cfg.cnn, "run config cnn")
    if art.folds.is_file():
        check_fold_file(art.folds, data)
    seg = _segmenter_step(data, art, cfg)
    return [_done("folds", art.folds.is_file(), art.folds), seg,
            _done("cnn", _all_done(art.cnn_dir, cfg.folds.n_folds), art.oof_cnn),
            _done("features", art.features_train.is_file(), art.features_train),
            Step("tune", "skip", "tune.enabled is false") if not cfg.tune.enabled else
            _done("tune", art.best_params.is_file(), art.best_params),
            _done("stack", art.cv_json.is_file(), art.cv_json),
            Step("predict", "run", f"-> {art.submission}"),
            Step("diagnosis", "skip", "diagnosis_stage is false") if not cfg.diagnosis_stage else
            _done("diagnosis", art.diagnosis_cv.is_file(), art.diagnosis_cv),
            Step("report", "run", f"-> {art.report_html}") if cfg.report else Step("report", "skip", "report is false")]


def _segmenter_step(data: DataPaths, art: ArtifactPaths, cfg: RunConfig) -> Step:
    from lesionstack.config import ConfigError
    from lesionstack.train.cnn_config import resolve_untrained_segmenter

    model = cfg.cnn.model
    if model.gate == "none":
        return Step("segmenter", "skip", "the CNN has no segmenter gate")
    if model.segmenter_weights:
        return Step("segmenter", "skip", f"using {model.segmenter_weights}")
    if art.segmenter.done.is_file():
        return Step("segmenter", "reuse", f"{art.segmenter.dir} (if its config and masks are unchanged)")
    masks = Path(cfg.masks_dir) if cfg.masks_dir else data.masks
    if not masks.exists():
        resolve_untrained_segmenter(cfg.cnn, f" and there is no masks folder {masks} (masks_dir)")  # may refuse
        return Step("segmenter", "skip", f"no {masks}: {cfg.cnn.untrained_segmenter}")
    if cfg.segmenter.encoder != model.segmenter_encoder:
        raise ConfigError(f"segmenter.encoder {cfg.segmenter.encoder!r} differs from the CNN's "
                          f"model.segmenter_encoder {model.segmenter_encoder!r}; the CNN could not load it")
    return Step("segmenter", "run", f"on {check_masks(masks)} image/mask pairs in {masks}")


def _all_done(folder: Path, n_folds: int) -> bool:
    return all((folder / f"fold_{k}" / "DONE").is_file() for k in range(n_folds))


def _done(stage: str, done: bool, path: Path) -> Step:
    return Step(stage, "reuse", f"{path} (if its inputs are unchanged)") if done else Step(stage, "run", f"-> {path}")
