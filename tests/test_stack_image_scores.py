"""The stacker's image-score options (`cnn_standardise`, `cnn_noise`, `use_lof`) end to end: train_stack
then predict_stack, on the real-metadata rows with a proxy CNN score (tests/test_stack.py's inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import TINY_STACK, make_stack_inputs
from lesionstack.config import ConfigError
from lesionstack.files import read_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular import image_scores, stack
from lesionstack.tabular.estimator import load_models
from lesionstack.tabular.image_scores import logit
from lesionstack.tabular.outliers import LOF_COLUMN
from lesionstack.tabular.stack import train_stack
from lesionstack.tabular.stack_config import StackConfig
from lesionstack.tabular.stack_predict import predict_stack

ONE = {**TINY_STACK, "models": ("lgbm",)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, ArtifactPaths, pd.DataFrame]:
    return make_stack_inputs(tmp_path_factory.mktemp("inputs"), n=300)


def _art(tmp: Path, src: ArtifactPaths) -> ArtifactPaths:
    art = ArtifactPaths(tmp)
    art.root.mkdir(parents=True, exist_ok=True)
    art.folds.write_bytes(src.folds.read_bytes())
    return art


def test_features_carry_lof_and_the_stacker_uses_it_only_when_asked(inputs: tuple, tmp_path: Path) -> None:
    feats, src, cnn = inputs
    assert LOF_COLUMN in feats and feats[LOF_COLUMN].between(0, 1e3).all() and feats[LOF_COLUMN].std() > 0
    for use in (False, True):
        art = _art(tmp_path / str(use), src)
        train_stack(feats, art.folds, art, StackConfig(**ONE, use_lof=use), cnn_oof=cnn)
        names = load_models(art.stack_fold(0).dir)["lgbm"].feature_names_in_
        assert (LOF_COLUMN in names) is use


def test_standardised_scores_are_saved_and_applied_to_test_rows(inputs: tuple, tmp_path: Path) -> None:
    feats, src, cnn = inputs
    art = _art(tmp_path, src)
    seen: list[pd.DataFrame] = []
    real = stack.GBDTStacker.predict_proba

    def spy(self: stack.GBDTStacker, X: pd.DataFrame) -> np.ndarray:
        seen.append(X)
        return real(self, X)

    cv = train_stack(feats, art.folds, art, StackConfig(**ONE, cnn_standardise=True), cnn_oof=cnn)
    scales = read_json(art.cv_json)["cnn_scales"]
    z = logit(cnn["score"][cnn["fold"] == 1].to_numpy())
    assert scales["1"] == pytest.approx([z.mean(), z.std()]) and cv["cnn_scales"] == scales
    stack.GBDTStacker.predict_proba = spy  # type: ignore[method-assign]
    try:
        predict_stack(feats.head(30), art, pairing="mean")
    finally:
        stack.GBDTStacker.predict_proba = real  # type: ignore[method-assign]
    expect = (logit(feats["cnn_score"].head(30).to_numpy()) - scales["all"][0]) / scales["all"][1]
    np.testing.assert_allclose(seen[0]["cnn_score"].to_numpy(), expect, rtol=1e-4, atol=1e-4)
    plain = _art(tmp_path / "plain", src)
    train_stack(feats, plain.folds, plain, StackConfig(**ONE), cnn_oof=cnn)
    assert read_json(plain.cv_json)["cnn_scales"] is None


def test_noise_touches_training_rows_only_and_is_seeded(inputs: tuple, tmp_path: Path, monkeypatch) -> None:
    feats, src, cnn = inputs
    calls: list[tuple[int, list[str], float]] = []
    real = image_scores.add_noise

    def spy(X: pd.DataFrame, columns: list[str], sigma: float, seed) -> pd.DataFrame:
        calls.append((len(X), list(columns), sigma))
        return real(X, columns, sigma, seed)

    monkeypatch.setattr(stack, "add_noise", spy)
    runs = []
    for name in ("a", "b"):
        art = _art(tmp_path / name, src)
        train_stack(feats, art.folds, art, StackConfig(**ONE, cnn_noise=0.1), cnn_oof=cnn)
        runs.append(pd.read_parquet(art.oof_stack))
    pd.testing.assert_frame_equal(runs[0], runs[1])  # seeded: the same noise twice
    folds = pd.read_csv(src.folds)
    n_train = {int((folds["fold"] != k).sum()) for k in range(3)}
    with_cnn = [c for c in calls if c[1]]
    assert with_cnn and {n for n, _, _ in with_cnn} <= n_train  # fitted rows only, never a scored fold
    assert all(set(cols) == {c for c in feats if c.startswith("cnn_")} and s == 0.1 for _, cols, s in with_cnn)
    n_calls = len(calls)
    predict_stack(feats.head(30), ArtifactPaths(tmp_path / "a"), pairing="mean")
    assert len(calls) == n_calls  # scoring adds no noise
    clean = _art(tmp_path / "clean", src)
    train_stack(feats, clean.folds, clean, StackConfig(**ONE), cnn_oof=cnn)
    assert not pd.read_parquet(clean.oof_stack).equals(runs[0])
    with pytest.raises(ConfigError, match=r"^cnn_noise: expected a number in \[0, 1\], got -0.1$"):
        StackConfig(cnn_noise=-0.1)
