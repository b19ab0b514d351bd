"""cv.json's "selection" flags (scores chosen on the folds they are measured on) and the caveat printed
by the run summary and the report."""

from __future__ import annotations

from pathlib import Path

from lesionstack.config import save_config
from lesionstack.files import write_text
from lesionstack.paths import ArtifactPaths
from lesionstack.pipeline import format_summary
from lesionstack.report.inputs import selection_caveat
from lesionstack.tabular.selection import selection_flags
from lesionstack.train.cnn_config import CNNConfig


def cnn_folds(root: Path, keeps: list[str]) -> ArtifactPaths:
    """CNN fold configs; "best" is a fold made before keep: best was refused (picked on the scored fold)."""
    art = ArtifactPaths(root)
    for k, keep in enumerate(keeps):
        art.cnn_fold(k).config.parent.mkdir(parents=True, exist_ok=True)
        if keep == "best":
            write_text(art.cnn_fold(k).config, "keep: best\nlr: 0.001\n")
        else:
            save_config(CNNConfig(keep=keep), art.cnn_fold(k).config)
    return art


def test_flags_follow_tuning_and_each_cnn_folds_keep(tmp_path: Path) -> None:
    last = cnn_folds(tmp_path / "last", ["last", "best_inner"])
    assert selection_flags(False, True, last, 2) == {"tuned_on_same_folds": False,
                                                     "cnn_epoch_selected_on_scored_fold": False}
    mixed = cnn_folds(tmp_path / "mixed", ["last", "best"])
    assert selection_flags(True, True, mixed, 2) == {"tuned_on_same_folds": True,
                                                     "cnn_epoch_selected_on_scored_fold": True}
    assert not selection_flags(False, False, mixed, 2)["cnn_epoch_selected_on_scored_fold"]  # no CNN features


def test_caveat_only_when_something_was_chosen_on_the_scored_folds() -> None:
    assert selection_caveat({}) is None
    assert selection_caveat({"selection": {"tuned_on_same_folds": False,
                                           "cnn_epoch_selected_on_scored_fold": False}}) is None
    text = selection_caveat({"selection": {"tuned_on_same_folds": True,
                                           "cnn_epoch_selected_on_scored_fold": True}})
    assert text and "tuned on these same folds" in text and "keep: best" in text
    summary = {"pauc_oof": {"blend": 0.1}, "pauc": {"blend": 0.1}, "cv_json": "cv.json", "submission": None,
               "report": None, "caveat": text}
    assert text in format_summary(summary)


def test_train_stack_writes_the_flags_into_cv_json(tmp_path: Path, shared_data: Path) -> None:
    from helpers import TINY_STACK, make_stack_inputs
    from lesionstack.files import read_json
    from lesionstack.tabular.stack import train_stack
    from lesionstack.tabular.stack_config import StackConfig

    cfg = StackConfig(**{**TINY_STACK, "models": ["lgbm"]})
    feats, art, cnn = make_stack_inputs(tmp_path / "plain", n=300)
    train_stack(feats, art.folds, art, cfg, cnn_oof=cnn)
    assert read_json(art.cv_json)["selection"] == {"tuned_on_same_folds": False,
                                                   "cnn_epoch_selected_on_scored_fold": False}
    feats, art, cnn = make_stack_inputs(tmp_path / "tuned", n=300)
    cnn_folds(art.root, ["best"] * 3)  # blend weights fitted on the OOF: tuned on the same folds
    train_stack(feats, art.folds, art, StackConfig(**{**TINY_STACK, "models": ["lgbm", "xgboost"], "blend": "weights"}),
                cnn_oof=cnn)
    assert read_json(art.cv_json)["selection"] == {"tuned_on_same_folds": True,
                                                   "cnn_epoch_selected_on_scored_fold": True}
