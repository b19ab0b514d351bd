"""lesionstack: skin-cancer detection for ISIC 2024, from patient-grouped folds to a Kaggle submission."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("lesionstack")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
