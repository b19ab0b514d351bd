"""Every output path of the pipeline, built in one place.

Stages talk only through files under one artifacts root, so a stage can be rerun alone and a crashed run
resumes where it stopped. Every fold folder holds the same file names (`FoldFiles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Names inside the competition's data folder.
TRAIN_METADATA = "train-metadata.csv"
TEST_METADATA = "test-metadata.csv"
TRAIN_IMAGES = "train-image.hdf5"
TEST_IMAGES = "test-image.hdf5"
SAMPLE_SUBMISSION = "sample_submission.csv"
MASKS_DIR = "masks"
DEMO_TRUTH = "demo-truth.csv"  # written only by `demo-data`: the true per-lesion probability

DEFAULT_ARTIFACTS = Path("artifacts")  # the artifacts root when none is named

# Names the artifacts root gives its files (one place, so every reader and writer agree).
SUBMISSION = "submission.csv"
PROBS = "probs.csv"  # `lesionstack score`'s table when --out is not given
CONFIG = "config.yaml"  # the resolved config beside whatever it made
VERSIONS = "versions.json"  # library versions a model bundle was made with
CHECKPOINT = "checkpoint.pt"


# Every stage is `*_stage(data paths, artifacts paths, config) -> frozen result`: the data paths are one of the
# `*Paths` types below (what the stage learns from), the artifacts paths `ArtifactPaths` (where it writes).


@dataclass(frozen=True)
class DataPaths:
    """The files of one data folder in the competition's layout, and the fold file to train on when it is
    not the artifacts root's own `folds.csv` (`train-cnn --folds`)."""

    root: Path
    folds: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.folds is not None:
            object.__setattr__(self, "folds", Path(self.folds))

    def fold_file(self, art: ArtifactPaths) -> Path:
        """The fold file a training stage splits by: `folds` when given, else `art.folds`."""
        return self.folds or art.folds

    @property
    def train_metadata(self) -> Path:
        return self.root / TRAIN_METADATA

    @property
    def test_metadata(self) -> Path:
        return self.root / TEST_METADATA

    @property
    def train_images(self) -> Path:
        return self.root / TRAIN_IMAGES

    @property
    def test_images(self) -> Path:
        return self.root / TEST_IMAGES

    @property
    def sample_submission(self) -> Path:
        return self.root / SAMPLE_SUBMISSION

    @property
    def masks(self) -> Path:
        return self.root / MASKS_DIR

    @property
    def demo_truth(self) -> Path:
        return self.root / DEMO_TRUTH


@dataclass(frozen=True)
class MaskPaths:
    """A folder of segmentation masks in the ISIC 2018 Task 1 layout (`X.jpg` + `X_segmentation.png`,
    subfolders allowed): what the segmenter learns from (`DataPaths.masks` for a demo data folder)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class TablePaths:
    """What the stacker and its tuner learn from: a training feature table and the fold file that splits it
    (`ArtifactPaths.tables`: the `features` and `folds` stages' outputs)."""

    features: Path
    folds: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", Path(self.features))
        object.__setattr__(self, "folds", Path(self.folds))


@dataclass(frozen=True)
class FoldFiles:
    """The same file names in every fold folder (CNN and stacker alike)."""

    dir: Path

    @property
    def weights(self) -> Path:
        """Network weights (CNN: the kept epoch's; segmenter: best held-out Dice)."""
        return self.dir / "model.pt"

    @property
    def checkpoint(self) -> Path:
        """Last-epoch checkpoint (model, optimiser, scheduler, epoch) for resuming a killed run."""
        return self.dir / CHECKPOINT

    @property
    def models(self) -> Path:
        """Stack fold: the manifest of the fitted GBDT estimators of every variant (params, columns,
        category vocabularies, seeds, importances); the native model files lie beside it."""
        return self.dir / "models.json"

    @property
    def pickled_models(self) -> Path:
        """Stack fold: what releases before the native model files wrote; refused, never unpickled."""
        return self.dir / "models.pkl"

    @property
    def oof(self) -> Path:
        """Stack fold: this fold's out-of-fold scores, one column per variant."""
        return self.dir / "oof.parquet"

    @property
    def importance(self) -> Path:
        """Stack fold: long table model, fold, feature, importance."""
        return self.dir / "importance.csv"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def config(self) -> Path:
        """The resolved config that made this fold."""
        return self.dir / CONFIG

    @property
    def inputs(self) -> Path:
        """Fingerprints of what the fold was made from (fold file, features); compared on reuse."""
        return self.dir / "inputs.json"

    @property
    def safetensors(self) -> Path:
        """Kept weights as safetensors (CNN, diagnosis and student folds; portable, no pickle)."""
        return self.dir / "model.safetensors"

    @property
    def kept_weights(self) -> Path:
        """The weights a finished network fold is scored with: `model.safetensors`, or the `model.pt` that
        releases before safetensors wrote (still read, with torch's weights_only loader)."""
        return self.weights if self.weights.is_file() and not self.safetensors.is_file() else self.safetensors

    @property
    def done(self) -> Path:
        """Written last, atomically: its presence means the fold finished."""
        return self.dir / "DONE"

    def member(self, index: int) -> FoldFiles:
        """CNN fold: the files of seed-ensemble member `index` (`seeds_per_fold`): member 0 is the fold
        folder itself (a one-seed fold's layout), member r >= 1 a `member_r` folder inside it."""
        return self if index == 0 else FoldFiles(self.dir / f"member_{index}")

    def members(self, count: int) -> list[FoldFiles]:
        return [self.member(r) for r in range(count)]


@dataclass(frozen=True)
class ArtifactPaths:
    """Every artifact of one run, under one root (default `artifacts/`)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # folds
    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def source(self) -> Path:
        """JSON naming the data folder these artifacts were made from ({"data_dir": ...})."""
        return self.root / "source.json"

    @property
    def lock(self) -> Path:
        """Held (fcntl) by the one command writing under this root; it names that process."""
        return self.root / ".lesionstack.lock"

    # segmenter
    @property
    def segmenter(self) -> FoldFiles:
        return FoldFiles(self.root / "segmenter")

    # CNN
    @property
    def cnn_dir(self) -> Path:
        return self.root / "cnn"

    def cnn_fold(self, fold: int) -> FoldFiles:
        return FoldFiles(self.cnn_dir / f"fold_{fold}")

    @property
    def oof_cnn(self) -> Path:
        return self.root / "oof_cnn.parquet"

    @property
    def test_cnn(self) -> Path:
        return self.root / "test_cnn.parquet"

    @property
    def cnn_scores_inputs(self) -> Path:
        """What oof_cnn / test_cnn were scored from (fold models, crops); they are rescored on a change."""
        return self.cnn_dir / "scores_inputs.json"

    # diagnosis (multi-class)
    @property
    def diagnosis_dir(self) -> Path:
        return self.root / "diagnosis"

    def diagnosis_fold(self, fold: int) -> FoldFiles:
        return FoldFiles(self.diagnosis_dir / f"fold_{fold}")

    @property
    def diagnosis_folds(self) -> Path:
        """isic_id, group, label, fold: lesion- or patient-grouped, stratified on the class."""
        return self.diagnosis_dir / "folds.csv"

    @property
    def oof_diagnosis(self) -> Path:
        """isic_id, fold, label, y, then one probability column per class."""
        return self.diagnosis_dir / "oof.parquet"

    @property
    def diagnosis_cv(self) -> Path:
        """Classes, balanced accuracy, macro AUC, per-class table and confusion matrix of the OOF scores."""
        return self.diagnosis_dir / "cv.json"

    # tabular features
    @property
    def features(self) -> FoldFiles:
        """The features stage's folder: its inputs.json records what the tables were built from."""
        return FoldFiles(self.root / "features")

    @property
    def features_train(self) -> Path:
        return self.root / "features" / "train.parquet"

    @property
    def tables(self) -> TablePaths:
        """The training feature table and the fold file, as `tune` and `train-stack` read them."""
        return TablePaths(self.features_train, self.folds)

    @property
    def features_test(self) -> Path:
        return self.root / "features" / "test.parquet"

    @property
    def features_test_folds(self) -> Path:
        """isic_id, fold, cnn_*: the test rows' CNN features on each CNN fold model's score (stack fold k
        predicts with fold k's: train and test CNN features then come from one model each)."""
        return self.root / "features" / "test_folds.parquet"

    @property
    def features_ranges(self) -> Path:
        """The training features' ranges and vocabularies, to flag test values the models never saw."""
        return self.root / "features" / "train_ranges.json"

    # tuning
    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    @property
    def study_db(self) -> Path:
        return self.tune_dir / "study.db"

    @property
    def best_params(self) -> Path:
        return self.tune_dir / "best_params.json"

    @property
    def tune(self) -> FoldFiles:
        """The study's config.yaml and inputs.json: a study is resumed only on the same features and folds."""
        return FoldFiles(self.tune_dir)

    # stacker
    @property
    def stack_dir(self) -> Path:
        return self.root / "stack"

    def stack_fold(self, fold: int) -> FoldFiles:
        return FoldFiles(self.stack_dir / f"fold_{fold}")

    @property
    def feature_importance(self) -> Path:
        """Long table: model, fold, feature, importance (gain, normalised to sum 1 per model and fold)."""
        return self.stack_dir / "feature_importance.csv"

    @property
    def test_stack(self) -> Path:
        return self.root / "test_stack.parquet"

    @property
    def oof_stack(self) -> Path:
        return self.root / "oof_stack.parquet"

    @property
    def cv_json(self) -> Path:
        return self.root / "cv.json"

    @property
    def score_shift(self) -> Path:
        """OOF vs test distributions of the CNN features and the stack's fold probabilities, with test
        features from the mean of the CNN folds (before pairing) and paired by fold (`tabular.pairing`)."""
        return self.root / "score_shift.json"

    # distillation: one folder per student config (train.distill)
    def distill_dir(self, name: str) -> Path:
        return self.root / "distill" / name

    def distill_fold(self, name: str, fold: int) -> FoldFiles:
        return FoldFiles(self.distill_dir(name) / f"fold_{fold}")

    def distill_file(self, name: str, file: str) -> Path:
        """teacher.parquet, teacher_inputs.json, oof.parquet, metrics.json, robustness.json of a student."""
        return self.distill_dir(name) / file

    @property
    def export_dir(self) -> Path:
        """`lesionstack export`'s default output: the ONNX student a bundle serves with (inference.export)."""
        return self.root / "export"

    def robustness_file(self, file: str) -> Path:
        """Phone-quality evaluation (train.robustness): MODEL.json and the degraded crops it scored."""
        return self.root / "robustness" / file

    # prediction and report
    @property
    def submission(self) -> Path:
        return self.root / SUBMISSION

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_html(self) -> Path:
        return ReportFiles(self.report_dir).page

    @property
    def run_config(self) -> Path:
        """The resolved config of `lesionstack run`."""
        return self.root / CONFIG

    @property
    def run_summary(self) -> Path:
        """`lesionstack run`'s summary: paths and scores."""
        return self.root / "run.json"

    @property
    def provenance(self) -> Path:
        """`lesionstack run`'s record for the report: library versions, code commit, each stage's seconds."""
        return self.root / "provenance.json"

    @property
    def versions(self) -> Path:
        """Library versions the trained models were made with (written by `package`)."""
        return self.root / VERSIONS


@dataclass(frozen=True)
class ReportFiles:
    """The report folder: the page, its config, and the figures beside it (linked by bare name)."""

    dir: Path

    @property
    def page(self) -> Path:
        return self.dir / "index.html"

    @property
    def config(self) -> Path:
        return self.dir / CONFIG
