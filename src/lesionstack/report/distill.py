"""Read what `lesionstack distill` wrote (students' metrics.json, nested teachers' scores) for the report:
result files only, so the report needs neither torch nor the distillation code."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from lesionstack.data.schema import ID_COLUMN, TARGET_COLUMN
from lesionstack.files import read_json
from lesionstack.folds import read_folds
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths


def read_student_metrics(artifacts: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """name -> metrics.json of every finished student under ARTIFACTS/distill (for the report)."""
    root = ArtifactPaths(artifacts).root / "distill"
    found = sorted(root.glob("*/metrics.json")) if root.is_dir() else []
    return {p.parent.name: read_json(p) for p in found}


def comparison(artifacts: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The distillation table: every finished student, the nested teachers, and from cv.json the stacker's
    blend, its tabular variant and the CNN. Rows: model, what it sees, OOF pAUC, fold mean and std."""
    art = ArtifactPaths(artifacts)
    rows = [{"model": f"student {name}, " + ("labels alone" if m["alpha"] >= 1 else
                                             f"distilled (alpha {m['alpha']}, T {m['temperature']})"),
             "sees": f"image ({m['student']}, {m['image_size']} px)",
             "oof_pauc": m["oof_pauc"], "mean": m["fold_pauc_mean"], "std": m["fold_pauc_std"]}
            for name, m in read_student_metrics(art.root).items()]
    for name, m in read_student_metrics(art.root).items():
        if m["teacher"] == "nested" and m["alpha"] < 1 and (teacher := nested_teacher_spread(art, name)):
            rows.append(teacher)
    cv = read_json(art.cv_json) if art.cv_json.is_file() else {"models": {}}
    sees = {"cnn": "image (gated CNN)", "tabular": "metadata + patient context", "blend": "image + metadata"}
    for key, label in (("cnn", "full CNN"), ("tabular", "stacker, tabular variant"), ("blend", "stacker blend")):
        if key in cv["models"]:
            m = cv["models"][key]
            rows.append({"model": label, "sees": sees[key], "oof_pauc": m["pauc_oof"], "mean": m["pauc_mean"],
                         "std": m["pauc_std"]})
    return rows


def nested_teacher_spread(art: ArtifactPaths, name: str) -> dict[str, Any] | None:
    """pAUC of a student's nested teacher on each student fold's training rows (inner OOF), when it has one."""
    path = art.distill_file(name, "teacher.parquet")
    if not path.is_file() or not art.folds.is_file():
        return None
    teacher = pd.read_parquet(path).merge(read_folds(art.folds)[[ID_COLUMN, TARGET_COLUMN]], on=ID_COLUMN)
    per = [pauc(g[TARGET_COLUMN], g["score"]) for _, g in teacher.groupby("student_fold")]
    return {"model": f"teacher of {name} (inner OOF per student fold)", "sees": "metadata + patient context",
            "oof_pauc": None, "mean": float(np.mean(per)), "std": float(np.std(per))}
