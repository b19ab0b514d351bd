"""The `features` stage: the train (and test) feature tables under an artifacts root, rebuilt only when what
they are made from changed.

The features themselves are `tabular.features` (one pure function for train and test); the test CNN
features of each fold model are `tabular.pairing`'s; the training ranges and drift warnings `tabular.drift`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lesionstack.config import check_fields
from lesionstack.data import schema
from lesionstack.data.metadata import read_metadata
from lesionstack.files import atomic_path, read_json, write_json
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.resume import changed_inputs, describe, files_digest, frame_digest
from lesionstack.tabular import drift, features, outliers, pairing
from lesionstack.tabular.drift import read_drift_warnings, training_ranges
from lesionstack.tabular.features import FeatureError, build_features, fill_unscored

log = logging.getLogger(__name__)

# the code the tables are made of: a change to any of it rebuilds them (the stage's own bookkeeping, the
# stacker and the score-shift measurement are not in it)
FEATURE_CODE = tuple(Path(m.__file__) for m in (features, schema, pairing, outliers, drift))


@dataclass(frozen=True)
class FeaturesConfig:
    """The `features` stage's one choice (`features --no-cnn`; `run` keeps the default)."""

    use_cnn: bool = True  # join the CNN's scores when `oof_cnn.parquet` exists

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FeatureTable:
    kind: str  # train or test
    path: Path
    n_rows: int
    n_features: int

    def __str__(self) -> str:
        return f"{self.kind}: {self.n_rows} rows x {self.n_features} features -> {self.path}"


@dataclass(frozen=True)
class FeaturesResult:
    """What the `features` stage wrote (or reused, when its recorded inputs were unchanged)."""

    tables: tuple[FeatureTable, ...]
    with_cnn: bool
    reused: bool
    warnings: tuple[str, ...] = ()  # test columns unlike training's (`drift_warnings`), also logged

    def __str__(self) -> str:
        note = " (with CNN scores)" if self.with_cnn else ""
        note += " (unchanged inputs: reused)" if self.reused else ""
        drift = [f"{len(self.warnings)} drift warning(s)"] if self.warnings else []
        return "; ".join([*(f"{t}{note}" for t in self.tables), *drift])


def features_stage(data: DataPaths, art: ArtifactPaths, cfg: FeaturesConfig) -> FeaturesResult:
    """The `features` stage: train (and test, when present) feature tables under the artifacts root.

    CNN scores join when `cfg.use_cnn` and `oof_cnn.parquet` exists (test: `test_cnn.parquet`, whose per-fold
    scores also give `features/test_folds.parquet`, the test CNN features of each fold model). Contract:
    recomputed on any change. `features/inputs.json` records digests of what the tables were built from
    (metadata values, CNN scores, the feature code `FEATURE_CODE`); when they all match and the tables exist, the
    tables are reused, otherwise rebuilt and the log names what changed.
    """
    jobs = [("train", data.train_metadata, art.oof_cnn, art.features_train)]
    if data.test_metadata.is_file():
        jobs.append(("test", data.test_metadata, art.test_cnn, art.features_test))
    with_cnn = cfg.use_cnn and art.oof_cnn.is_file()
    code = files_digest(FEATURE_CODE)
    inputs: dict[str, object] = {"with_cnn": with_cnn, "code": code}
    sources = []
    for kind, meta_path, cnn_path, target in jobs:
        if with_cnn and not cnn_path.is_file():
            raise FeatureError(f"{cnn_path}: CNN scores missing (the train table uses {art.oof_cnn}); "
                               "run train-cnn to the end, or pass --no-cnn")
        meta = read_metadata(meta_path, kind=kind)
        scores = _read_scores(cnn_path, kind) if with_cnn else None
        inputs[f"{kind}_metadata"] = frame_digest(meta)
        inputs[f"{kind}_cnn_scores"] = frame_digest(scores) if scores is not None else None
        sources.append((kind, meta_path, meta, cnn_path, scores, target))
    record = art.features.inputs
    before = read_json(record) if record.is_file() else {}
    diff = changed_inputs(inputs, before)
    outputs = [*(src[-1] for src in sources), art.features_ranges]
    outputs += [art.features_test_folds] if with_cnn and len(sources) > 1 else []
    reuse = not diff and all(p.is_file() for p in outputs)
    if not reuse:
        if before:
            log.info("rebuilding the feature tables: %s", describe(diff))
        record.unlink(missing_ok=True)  # tables and record are replaced together: the record comes last
        for kind, meta_path, meta, cnn_path, scores, target in sources:
            _write_table(kind, meta_path, meta, cnn_path, scores, target, art)
        write_json(record, inputs)
    # test values the models never saw are named on every run, reused tables or not
    warnings = tuple(line for kind, meta_path, meta, *_ in sources if kind == "test"
                     for line in read_drift_warnings(meta, art.features_ranges, str(meta_path)))
    for line in warnings:
        log.warning(line)
    tables = tuple(_table_summary(kind, target) for kind, *_, target in sources)
    return FeaturesResult(tables, with_cnn, reused=reuse, warnings=warnings)


def _read_scores(cnn_path: Path, kind: str) -> pd.DataFrame:
    """oof_cnn's (isic_id, score); test_cnn's mean score and each fold model's (refused without them)."""
    scores = pd.read_parquet(cnn_path)
    folds = list(pairing.fold_score_columns(scores, str(cnn_path)).values()) if kind == "test" else []
    return scores[[schema.ID_COLUMN, "score", *folds]]


def _write_table(kind: str, meta_path: Path, meta: pd.DataFrame, cnn_path: Path, scores: pd.DataFrame | None,
                 target: Path, art: ArtifactPaths) -> None:
    """One feature table; the training one also records its ranges (`training_ranges`); the test one, with
    CNN scores, also the CNN features of each fold model's scores (`features_test_folds`, for pairing)."""
    if scores is not None and kind == "test":
        scores = fill_unscored(scores, str(cnn_path), columns=tuple(c for c in scores if c != schema.ID_COLUMN))
        folds = pairing.fold_cnn_features(meta, scores, str(cnn_path))
        with atomic_path(art.features_test_folds) as tmp:
            folds.to_parquet(tmp, index=False)
    table = build_features(meta, scores[[schema.ID_COLUMN, "score"]] if scores is not None else None,
                           where=str(meta_path))
    if kind == "train":
        write_json(art.features_ranges, training_ranges(meta))
    with atomic_path(target) as tmp:
        table.to_parquet(tmp, index=False)


def _table_summary(kind: str, path: Path) -> FeatureTable:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata  # the footer only: no need to read the table back
    return FeatureTable(kind, path, meta.num_rows, meta.num_columns - 1)
