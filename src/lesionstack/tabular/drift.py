"""What the training metadata looked like (`training_ranges`, saved beside the feature tables) and the test
values the models never saw (`drift_warnings`: unseen categories, values far outside the training range).
Named, never refused: the features stage and `predict` log them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesionstack.files import read_json
from lesionstack.tabular.features import CATEGORICAL_SOURCES, EPS, OTHER, RAW_NUMERIC

FAR_OUTSIDE = 0.5  # a value beyond the training [min, max] by more than this share of (max - min)


def training_ranges(metadata: pd.DataFrame) -> dict[str, Any]:
    """Per raw column of the training metadata: numeric min/max and missing share, categorical values seen.
    Written beside the features (`ArtifactPaths.features_ranges`) and read by `drift_warnings`."""
    numeric: dict[str, Any] = {}
    for col in RAW_NUMERIC:
        values = pd.to_numeric(metadata[col], errors="coerce").astype(float)
        ok = values[np.isfinite(values)]
        numeric[col] = {"min": float(ok.min()) if len(ok) else None, "max": float(ok.max()) if len(ok) else None,
                        "missing": int(len(values) - len(ok))}
    categorical = {col: sorted({str(v).strip() for v in metadata[col].dropna() if str(v).strip()})
                   for col in CATEGORICAL_SOURCES}
    return {"rows": len(metadata), "far_outside": FAR_OUTSIDE, "numeric": numeric, "categorical": categorical}


def drift_warnings(metadata: pd.DataFrame, ranges: dict[str, Any], where: str) -> list[str]:
    """One line per column of `metadata` (test) that differs from training in a way that moves scores:
    absent from the file, all missing, categories never seen in training, values far outside its range."""
    lines = [f"{where}: column {c!r} is absent: all {len(metadata)} rows are scored as if it were missing"
             for c in metadata.attrs.get("absent_columns", [])]
    absent = set(metadata.attrs.get("absent_columns", []))
    for col, seen in ranges["numeric"].items():
        if col in absent or col not in metadata.columns:
            continue
        values = pd.to_numeric(metadata[col], errors="coerce").astype(float).to_numpy()
        finite = np.isfinite(values)
        if not finite.any() and seen["missing"] < ranges["rows"]:
            lines.append(f"{where}: column {col!r} is missing in all {len(values)} rows (training had values)")
        elif seen["min"] is not None:
            span = FAR_OUTSIDE * max(seen["max"] - seen["min"], EPS)
            far = finite & ((values < seen["min"] - span) | (values > seen["max"] + span))
            if far.any():
                lines.append(f"{where}: column {col!r}: {int(far.sum())} row(s) far outside the training range "
                             f"[{seen['min']:.4g}, {seen['max']:.4g}] (e.g. line {int(np.argmax(far)) + 2}: "
                             f"{values[np.argmax(far)]:.4g})")
    for col, seen in ranges["categorical"].items():
        if col in absent or col not in metadata.columns:
            continue
        text = metadata[col].dropna().astype(str).str.strip()
        new = text[(text != "") & ~text.isin(set(seen))]
        if len(new):
            examples = sorted(new.unique())[:3]
            lines.append(f"{where}: column {col!r}: {len(new)} row(s) hold categories never seen in training "
                         f"(e.g. {examples}); scored as {OTHER!r}")
    return lines


def read_drift_warnings(metadata: pd.DataFrame, ranges_path: Path, where: str) -> list[str]:
    """`drift_warnings` against the saved training ranges; none (and one line saying so) if there are none."""
    if not Path(ranges_path).is_file():
        return [f"{ranges_path}: no training ranges saved (features built by an older release); "
                "unseen categories and out-of-range values are not checked"]
    return drift_warnings(metadata, read_json(ranges_path), where)
