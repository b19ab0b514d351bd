"""`lesionstack score PATHS... --artifacts A --out probs.csv`: JPEG/PNG files and folders -> one CSV row each.

Scoring goes through the bundle's Predictor (`score_files`), in chunks under one progress bar. A file
that cannot be read or decoded becomes a row with an empty probability and its error, never a crash.
Class probabilities appear as extra columns when the bundle's Predictor returns them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from lesionstack.files import atomic_path
from lesionstack.provenance import warn_if_synthetic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CHUNK = 64  # files per Predictor call: the bar moves, memory stays bounded


def image_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every file named, plus every JPEG/PNG under each folder named (recursively, sorted). A named file is
    kept whatever its suffix, so a mislabelled image is still tried and a non-image gets its error row."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)  # a missing file too: score_files reports it in its row
    return found


def score_paths(predictor: Any, paths: Sequence[Path], progress: bool = True) -> pd.DataFrame:
    frames = []
    with tqdm(total=len(paths), desc="score", unit="image", disable=not progress) as bar:
        for start in range(0, len(paths), CHUNK):
            chunk = list(paths[start:start + CHUNK])
            frames.append(predictor.score_files(chunk))
            bar.update(len(chunk))
    if not frames:
        return pd.DataFrame(columns=["path", "probability", "error"])
    return pd.concat(frames, ignore_index=True)


def score(paths: Sequence[str | os.PathLike[str]], artifacts: str | os.PathLike[str],
          out: str | os.PathLike[str], device: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Score files and folders with a trained bundle; write `out` (atomically) and return the table."""
    from lesionstack.inference.serve import load_predictor

    files = image_paths(paths)
    if not files:
        raise FileNotFoundError(f"no JPEG/PNG files in {[str(p) for p in paths]}")
    warn_if_synthetic(artifacts)  # a demo model's probabilities must not be read as real ones
    table = score_paths(load_predictor(artifacts, device=device), files, progress=progress)
    table["error"] = table["error"].fillna("")
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    return table
