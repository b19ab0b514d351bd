"""Where a bundle's training data came from, so nobody mistakes a demo model's output for a real one.

* `demo-data` (every layout it writes) leaves a marker in the data folder: `DATA_MARKER`, a small JSON
  file saying the folder is synthetic, what wrote it and with which settings.
* Each training stage records the folder it learnt from in `ARTIFACTS/training_data.json` (`record`): one
  entry per stage (a later stage run on other data replaces only its own entry); `run` records all of its
  stages at once. A folder without a marker is taken as the user's own (real) data.
* `package` ships the file in the Kaggle bundle; `serve` shows a banner, and `score` and `predict` print a
  warning line on stderr, when any stage learnt from synthetic data (`synthetic_warning`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lesionstack.files import read_json, write_json

DATA_MARKER = "lesionstack-synthetic.json"  # in a data folder written by demo-data
# in an artifacts root, and in the packaged bundle's artifacts/ (run's provenance.json is another record: code and
# library versions, stage times)
ARTIFACTS_FILE = "training_data.json"
SYNTHETIC_NOTE = ("learnt from synthetic data made by `lesionstack demo-data`, not from photos of real lesions: "
                  "the scores show that the pipeline runs and say nothing about a real lesion")


def mark_synthetic(folder: str | os.PathLike[str], layout: str, **settings: Any) -> Path:
    """Write the synthetic-data marker into a data folder being built (`layout`: what kind of folder)."""
    from lesionstack import __version__

    return write_json(Path(folder) / DATA_MARKER, {
        "synthetic": True, "generator": "lesionstack demo-data", "layout": layout,
        "lesionstack_version": __version__, "settings": settings})


def data_provenance(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What a data folder is: its marker's content (synthetic), else the user's own data."""
    marker = Path(folder) / DATA_MARKER
    if marker.is_file():
        found = read_json(marker)
        return {"data": Path(folder).resolve().name, "synthetic": bool(found.get("synthetic", True)),
                "marker": found}
    return {"data": Path(folder).resolve().name, "synthetic": False, "marker": None}


def record(artifacts: str | os.PathLike[str], data: str | os.PathLike[str], stages: tuple[str, ...]) -> dict:
    """Record in ARTIFACTS/training_data.json that `stages` learnt from the folder `data`; return the record.
    Only the folder's name is kept (the file travels in the bundle; a home path should not)."""
    path = Path(artifacts) / ARTIFACTS_FILE
    current = read_json(path) if path.is_file() else {}
    entries = {**current.get("stages", {}), **{stage: data_provenance(data) for stage in stages}}
    out = {"synthetic": any(e["synthetic"] for e in entries.values()), "stages": entries}
    if out != current:
        write_json(path, out)
    return out


def read(artifacts: str | os.PathLike[str]) -> dict[str, Any] | None:
    """ARTIFACTS/training_data.json, or None for a bundle that never recorded one."""
    path = Path(artifacts) / ARTIFACTS_FILE
    return read_json(path) if path.is_file() else None


def synthetic_stages(found: dict[str, Any] | None) -> list[str]:
    return sorted(k for k, e in (found or {}).get("stages", {}).items() if e.get("synthetic"))


def synthetic_warning(artifacts: str | os.PathLike[str]) -> str | None:
    """One line for a bundle that learnt from synthetic data (None otherwise)."""
    stages = synthetic_stages(read(artifacts))
    if not stages:
        return None
    return f"warning: the models in {artifacts} ({', '.join(stages)}) {SYNTHETIC_NOTE}"


def warn_if_synthetic(artifacts: str | os.PathLike[str]) -> str | None:
    """Print `synthetic_warning` on stderr (what `score` and `predict` do before scoring); return it."""
    line = synthetic_warning(artifacts)
    if line:
        print(line, file=sys.stderr, flush=True)
    return line


def describe(artifacts: str | os.PathLike[str]) -> dict[str, Any]:
    """What `serve` tells the page: recorded or not, synthetic or not, which stages, and the sentence."""
    found = read(artifacts)
    stages = synthetic_stages(found)
    return {"recorded": found is not None, "synthetic": None if found is None else bool(stages),
            "synthetic_stages": stages,
            "note": f"This model {SYNTHETIC_NOTE}." if stages else None}
