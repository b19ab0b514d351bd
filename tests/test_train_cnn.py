"""train-cnn: the OOF contract, resume after a kill, skipping finished folds, refusing a changed config,
local weights, corrupt crops, and DistributedDataParallel on CPU. Tiny nets (timm's test_resnet), 32-px
crops, 24 lesions in 2 folds, 1-2 epochs."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_cnn_data, tiny_cnn_config
from lesionstack.config import ConfigError, save_config
from lesionstack.data.dataset import CropDataset
from lesionstack.data.hdf5 import CorruptImageError
from lesionstack.files import read_json
from lesionstack.folds import read_folds
from lesionstack.metrics import pauc
from lesionstack.paths import ArtifactPaths
from lesionstack.resume import ResumeError
from lesionstack.runtime import DistContext, RunSettings, Runtime, load_weights, predict_logits, sigmoid
from lesionstack.train.cnn import train_cnn
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.train.cnn_scores import check_oof, scoring_model
from lesionstack.train.loop import warmup_cosine

CPU = torch.device("cpu")
METRIC_KEYS = {"epochs", "best_epoch", "best_pauc", "best_auc", "n_train", "n_val"}
EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val_pauc", "val_auc", "images_per_s", "lr"}


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CNNConfig]:
    """Both folds of the tiny data set, trained once for the tests that only read the result."""
    root = make_cnn_data(tmp_path_factory.mktemp("cnn_data"))
    out = tmp_path_factory.mktemp("cnn_art")
    cfg = tiny_cnn_config()
    train_cnn(root, root / "folds.csv", cfg, out)
    return root, out, cfg


def test_oof_scores_every_row_once_with_its_own_folds_model(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = trained
    art, folds = ArtifactPaths(out), read_folds(root / "folds.csv")
    oof = pd.read_parquet(art.oof_cnn)
    assert list(oof.columns) == ["isic_id", "fold", "score"]
    assert sorted(oof["isic_id"]) == sorted(folds["isic_id"]) and not oof["isic_id"].duplicated().any()
    assert oof["score"].between(0, 1).all()
    rt = Runtime(RunSettings.pick(cfg), CPU, None, DistContext())
    test = pd.read_parquet(art.test_cnn)
    test_ds = CropDataset(root / "test-image.hdf5", test["isic_id"], None, cfg.image_size)
    test_mean = np.zeros(len(test))
    for k in (0, 1):
        model = scoring_model(cfg, art.cnn_fold(k).safetensors, CPU)
        rows = oof[oof["fold"] == k]
        assert set(rows["isic_id"]) == set(folds.loc[folds["fold"] == k, "isic_id"])
        val_ds = CropDataset(root / "train-image.hdf5", rows["isic_id"], None, cfg.image_size)
        rescored = sigmoid(predict_logits(model, val_ds, rt))
        np.testing.assert_allclose(rows["score"], rescored, rtol=1e-5, atol=1e-6)
        other = scoring_model(cfg, art.cnn_fold(1 - k).safetensors, CPU)
        assert not np.allclose(rows["score"], sigmoid(predict_logits(other, val_ds, rt)), atol=1e-6)
        test_mean += sigmoid(predict_logits(model, test_ds, rt)) / 2
    np.testing.assert_allclose(test["score"], test_mean, rtol=1e-5, atol=1e-6)


def test_each_fold_folder_holds_the_same_files(trained: tuple[Path, Path, CNNConfig]) -> None:
    _, out, _ = trained
    for k in (0, 1):
        files = ArtifactPaths(out).cnn_fold(k)
        assert sorted(p.name for p in files.dir.iterdir()) == ["DONE", "config.yaml", "inputs.json", "metrics.json",
                                                               "model.safetensors"]
        metrics = read_json(files.metrics)
        assert set(metrics) == METRIC_KEYS and metrics["n_train"] + metrics["n_val"] == 24
        assert [set(e) for e in metrics["epochs"]] == [EPOCH_KEYS] * 2
        # keep: last (the default) keeps the final epoch; its validation watched the scored fold, nothing more
        assert metrics["best_epoch"] == 2 and metrics["best_pauc"] == metrics["epochs"][-1]["val_pauc"]


def test_validating_only_after_the_last_epoch_trains_the_same_weights(
        trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, out, cfg = trained  # validated after every epoch
    assert cfg.val_every == 1 and cfg.keep == "last"
    train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, val_every=cfg.epochs), tmp_path / "art")
    for k in (0, 1):
        every, last = ArtifactPaths(out).cnn_fold(k), ArtifactPaths(tmp_path / "art").cnn_fold(k)
        assert [e["val_pauc"] is None for e in read_json(last.metrics)["epochs"]] == [True] * (cfg.epochs - 1) + [False]
        assert read_json(last.metrics)["best_pauc"] == read_json(every.metrics)["best_pauc"]
        for key, value in load_weights(every.safetensors).items():
            assert torch.equal(value, load_weights(last.safetensors)[key]), (k, key)
    assert pd.read_parquet(ArtifactPaths(tmp_path / "art").oof_cnn).equals(pd.read_parquet(ArtifactPaths(out).oof_cnn))


def test_two_folds_at_once_in_their_own_processes_train_exactly_as_one_after_the_other(
        trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, out, cfg = trained
    summary = train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, fold_workers=2), tmp_path / "art")
    for k in (0, 1):
        alone, side_by_side = ArtifactPaths(out).cnn_fold(k), ArtifactPaths(tmp_path / "art").cnn_fold(k)
        assert read_json(side_by_side.metrics)["epochs"][-1]["val_pauc"] == \
            read_json(alone.metrics)["epochs"][-1]["val_pauc"]
        for key, value in load_weights(alone.safetensors).items():
            assert torch.equal(value, load_weights(side_by_side.safetensors)[key]), (k, key)
    assert summary["oof_pauc"] == train_cnn(root, root / "folds.csv", cfg, out)["oof_pauc"]
    # the scores too, scored in the fold processes (one thread each) as in one process: the same bits
    for name in ("oof_cnn", "test_cnn"):
        alone, pooled = (pd.read_parquet(getattr(ArtifactPaths(a), name)) for a in (out, tmp_path / "art"))
        assert len(pooled) > 0 and pooled.equals(alone), name


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc")
def test_fold_processes_stop_when_the_run_that_started_them_is_killed(tmp_path: Path) -> None:
    """A killed `train-cnn` must not leave fold processes writing checkpoints that a resumed run also writes."""
    root = make_cnn_data(tmp_path / "data")
    code = ("import dataclasses, sys; sys.path.insert(0, sys.argv[1]); from helpers import tiny_cnn_config; "
            "from lesionstack.train.cnn import train_cnn; train_cnn(sys.argv[2], sys.argv[2] + '/folds.csv', "
            "tiny_cnn_config(epochs=500, fold_workers=2), sys.argv[3])")
    run = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(root), str(tmp_path / "art")],
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        children = _wait_for_fold_processes(run.pid, 2)
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 120  # a process still importing torch notices once it is up
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def _wait_for_fold_processes(pid: int, n: int, timeout: float = 120) -> list[int]:
    """The pids of `pid`'s children once there are `n` (fold processes, starting or training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) >= n:
            return [int(c) for c in children]
        time.sleep(0.2)
    raise AssertionError(f"{n} fold processes did not start in {timeout} s")


def test_check_oof_catches_a_broken_contract(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, _ = trained
    folds, oof = read_folds(root / "folds.csv"), pd.read_parquet(ArtifactPaths(out).oof_cnn)
    with pytest.raises(AssertionError, match="repeat"):
        check_oof(pd.concat([oof, oof.iloc[:1]]), folds)
    with pytest.raises(AssertionError, match="differ"):
        check_oof(oof.iloc[1:], folds)
    swapped = oof.assign(fold=np.where(oof["isic_id"] == oof["isic_id"].iloc[0], 1 - oof["fold"], oof["fold"]))
    with pytest.raises(AssertionError, match="scored by fold"):
        check_oof(swapped, folds)


def test_rerun_skips_finished_folds(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = trained
    weights = ArtifactPaths(out).cnn_fold(0).safetensors
    before = weights.stat().st_mtime_ns

    def must_not_train(fold: int, epoch: int) -> None:
        raise AssertionError(f"fold {fold} trained again")

    summary = train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, progress=True), out,
                        on_epoch_end=must_not_train)  # a runtime-only key may differ
    assert weights.stat().st_mtime_ns == before
    # the summary is the saved OOF scores' pAUC, and the dark-square cue was learnt: every fold ranks its
    # positives above its negatives far better than chance (pAUC above 0.8 TPR: chance ~0.02, perfect 0.2)
    oof = pd.read_parquet(ArtifactPaths(out).oof_cnn).merge(read_folds(root / "folds.csv")[["isic_id", "target"]])
    assert summary["oof_pauc"] == pytest.approx(pauc(oof["target"], oof["score"]))
    assert min(summary["fold_pauc"].values()) > 0.1 and summary["oof_pauc"] > 0.05


def test_changed_config_is_refused(trained: tuple[Path, Path, CNNConfig]) -> None:
    root, out, cfg = trained
    with pytest.raises(ConfigError, match="lr"):
        train_cnn(root, root / "folds.csv", dataclasses.replace(cfg, lr=0.01), out)


def test_finished_folds_are_not_reused_with_another_fold_file(trained: tuple[Path, Path, CNNConfig],
                                                              tmp_path: Path) -> None:
    """A fold model scored on another split would score rows it trained on: refused, not reused."""
    root, out, cfg = trained
    folds = read_folds(root / "folds.csv")
    folds["fold"] = 1 - folds["fold"]  # the same patients, the two folds swapped
    other = tmp_path / "other-folds.csv"
    folds.to_csv(other, index=False)
    with pytest.raises(ConfigError, match="other inputs .*folds"):
        train_cnn(root, other, cfg, out)


def test_killed_fold_resumes_from_its_checkpoint(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, reference, cfg = trained
    files = ArtifactPaths(tmp_path).cnn_fold(0)

    def crash(fold: int, epoch: int) -> None:
        raise Crash(f"killed after epoch {epoch}")

    with pytest.raises(Crash):
        train_cnn(root, root / "folds.csv", cfg, tmp_path, folds_only=[0], on_epoch_end=crash)
    assert files.checkpoint.exists() and not files.done.exists() and not files.metrics.exists()
    seen: list[tuple[int, int]] = []
    train_cnn(root, root / "folds.csv", cfg, tmp_path, folds_only=[0], on_epoch_end=lambda f, e: seen.append((f, e)))
    assert seen == [(0, 2)]  # continued with epoch 2; epoch 1 was not redone
    assert files.done.exists() and not files.checkpoint.exists()
    assert not ArtifactPaths(tmp_path).oof_cnn.exists()  # fold 1 not trained yet: no partial OOF file
    resumed, straight = read_json(files.metrics), read_json(ArtifactPaths(reference).cnn_fold(0).metrics)
    for a, b in zip(resumed["epochs"], straight["epochs"], strict=True):  # identical to an uninterrupted run
        for key in ("train_loss", "val_loss", "val_pauc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_classifier_weights_come_from_a_local_file(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    from lesionstack._compat import ensure_timm_importable

    ensure_timm_importable()
    import timm

    root = trained[0]
    state = timm.create_model("test_resnet", num_classes=1).state_dict()
    state = {k: 0.1 * torch.randn_like(v) if v.ndim == 4 else v for k, v in state.items()}  # distinctive convs
    weights = tmp_path / "test_resnet.pth"
    torch.save(state, weights)
    cfg = tiny_cnn_config(gate="none", epochs=1, lr=1e-9)  # lr ~0: the saved model is the loaded one
    cfg.model = dataclasses.replace(cfg.model, classifier_weights=str(weights))
    train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])
    saved = load_weights(ArtifactPaths(tmp_path / "art").cnn_fold(0).safetensors)
    convs = [k for k, v in state.items() if v.ndim == 4]
    assert convs
    for key in convs:
        torch.testing.assert_close(saved[f"classifier.{key}"], state[key])
    moved = tmp_path / "elsewhere.pth"  # the same bytes elsewhere: provenance only, the fold is reused
    moved.write_bytes(weights.read_bytes())
    cfg.model = dataclasses.replace(cfg.model, classifier_weights=str(moved))
    train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])
    torch.save({k: v + 1 if v.ndim == 4 else v for k, v in state.items()}, moved)  # other weights, same path
    with pytest.raises(ResumeError, match="model.classifier_weights changed"):
        train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])


def test_corrupt_crop_stops_the_run_naming_it(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data", corrupt=("ISIC_0000005",))  # a fold-1 negative: fold 0 trains on it
    with pytest.raises(CorruptImageError, match="ISIC_0000005"):
        cfg = tiny_cnn_config(gate="none", epochs=1, batch_size=4)  # 3 full batches: every drawn crop is read
        train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])
    assert not ArtifactPaths(tmp_path / "art").cnn_fold(0).checkpoint.exists()  # stopped inside epoch 1


def test_corrupt_crop_is_skipped_and_logged_when_configured(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    root = make_cnn_data(tmp_path / "data", corrupt=("ISIC_0000005",))
    cfg = tiny_cnn_config(gate="none", epochs=1, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        train_cnn(root, root / "folds.csv", cfg, tmp_path / "art")
    assert "ISIC_0000005" in caplog.text and "(1 skipped so far)" in caplog.text
    oof = pd.read_parquet(ArtifactPaths(tmp_path / "art").oof_cnn).set_index("isic_id")
    assert len(oof) == 24 and np.isnan(oof.loc["ISIC_0000005", "score"])  # listed, but unscored
    assert oof["score"].drop("ISIC_0000005").between(0, 1).all()


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.505) and f(100) == pytest.approx(0.01)


def test_two_processes_with_gloo_write_the_same_files(trained: tuple[Path, Path, CNNConfig], tmp_path: Path) -> None:
    root, reference, cfg = trained
    config = save_config(cfg, tmp_path / "tiny.yaml")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lesionstack.cli", "train-cnn", str(root),
           "--folds", str(root / "folds.csv"), "--config", str(config), "--artifacts", str(tmp_path / "art")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OOF pAUC" in done.stdout

    def listing(base: Path) -> list[str]:
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and "cnn" in p.parts
                      or p.name.endswith(".parquet"))

    assert listing(tmp_path / "art") == listing(reference)
    check_oof(pd.read_parquet(ArtifactPaths(tmp_path / "art").oof_cnn), read_folds(root / "folds.csv"))
    metrics = read_json(ArtifactPaths(tmp_path / "art").cnn_fold(0).metrics)
    assert metrics["n_train"] == read_json(ArtifactPaths(reference).cnn_fold(0).metrics)["n_train"]


def test_keep_best_on_the_scored_fold_is_refused_with_the_alternatives() -> None:
    with pytest.raises(ConfigError, match="keep: last.*keep: best_inner"):
        tiny_cnn_config(keep="best")


def test_best_inner_picks_the_epoch_on_training_rows_never_on_the_scored_fold(tmp_path: Path) -> None:
    """The scored fold's labels cannot change what best_inner keeps: move its positives to other crops and
    the kept epoch and weights stay bit-identical; the validated rows are an inner split of the training folds."""
    root = make_cnn_data(tmp_path / "data")
    cfg = tiny_cnn_config(gate="none", epochs=3, patience=5, keep="best_inner", inner_folds=2)
    folds = read_folds(root / "folds.csv")
    scored = folds["fold"] == 0
    flipped = folds.copy()
    flipped.loc[scored, "target"] = np.roll(folds.loc[scored, "target"].to_numpy(), 1)  # same counts, other crops
    assert (flipped["target"] != folds["target"]).any()
    flipped.to_csv(tmp_path / "flipped.csv", index=False)
    kept = {}
    for name, fold_file in (("as_is", root / "folds.csv"), ("flipped", tmp_path / "flipped.csv")):
        train_cnn(root, fold_file, cfg, tmp_path / name, folds_only=[0])
        files = ArtifactPaths(tmp_path / name).cnn_fold(0)
        metrics = read_json(files.metrics)
        assert metrics["n_val"] == 8 and metrics["n_train"] == 4  # 2 training patients: one trains, one picks
        kept[name] = metrics["best_epoch"], load_weights(files.safetensors)
    assert kept["as_is"][0] == kept["flipped"][0]
    for key, value in kept["as_is"][1].items():
        assert torch.equal(value, kept["flipped"][1][key]), key


def test_keep_last_scores_with_the_final_epoch_and_ignores_patience(tmp_path: Path) -> None:
    root = make_cnn_data(tmp_path / "data")
    cfg = tiny_cnn_config(gate="none", epochs=3, patience=0, keep="last")  # patience only stops best_inner
    train_cnn(root, root / "folds.csv", cfg, tmp_path / "art", folds_only=[0])
    metrics = read_json(ArtifactPaths(tmp_path / "art").cnn_fold(0).metrics)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["best_epoch"] == 3 and metrics["best_pauc"] == metrics["epochs"][-1]["val_pauc"]
