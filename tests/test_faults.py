"""The fault-injection cases of issue 12, on tiny data, through the real command line.

Each case asserts what a user sees: one clean `lesionstack: <kind> error: ...` line naming the file, the
column/key/fold and the row, a `what to do:` line, no traceback, and the exit code of that kind
(docs/troubleshooting.md's table, `lesionstack.errors`). Most run `cli.main` in this process (fast);
the lock, the kill and the traceback cases run real `lesionstack` processes. A moved artifacts folder:
tests/test_pipeline.py; oversized crops and memory: tests/test_decode.py; the database: tests/test_postgres.py.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.errors import ERROR_KINDS, exit_code_table
from lesionstack.paths import ArtifactPaths, DataPaths

REPO = Path(__file__).resolve().parents[1]
STACK_YAML = "models: [lgbm]\nseeds: [0]\nn_rounds: 20\nneg_pos_ratio: 0\nn_jobs: 1\n"
CNN_YAML = ("model: {classifier: test_resnet, gate: none}\nimage_size: 32\nbatch_size: 8\nepochs: 1\n"
            "num_workers: 0\nprogress: false\ndevice: cpu\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    write_demo_data(root, DemoSpec(patients=16, lesions_per_patient=10, seed=3, positive_rate=0.1, mask_count=0))
    return root


@pytest.fixture(scope="module")
def stacked(data, tmp_path_factory) -> Path:
    """Folds, tabular features and a trained stacker (no CNN): the inputs of the later stages."""
    from lesionstack.folds import make_folds_file
    from lesionstack.tabular.features_stage import FeaturesConfig, features_stage

    out = tmp_path_factory.mktemp("faults_art") / "artifacts"
    make_folds_file(data, ArtifactPaths(out).folds, n_folds=2, seed=0)
    features_stage(DataPaths(data), ArtifactPaths(out), FeaturesConfig(use_cnn=False))
    (out.parent / "stack.yaml").write_text(STACK_YAML)
    return out


def copy_data(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `lesionstack ARGS` through cli.main in this process: (exit code, stdout, stderr)."""
    from lesionstack.cli import main

    with pytest.raises(SystemExit) as end:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return end.value.code, captured.out, captured.err


def assert_clean(code: int, err: str, kind: str, *names: str) -> str:
    """The last two stderr lines are the error and what to do; no traceback; the exit code of `kind`."""
    expected = next(k.code for k in ERROR_KINDS.values() if k.kind == kind) if kind in \
        {k.kind for k in ERROR_KINDS.values()} else {"missing": 20, "exists": 21, "disk full": 22,
                                                       "not writable": 23}[kind]
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) >= 2 and lines[-2].startswith(f"lesionstack: {kind} error: "), err
    assert lines[-1].startswith("  what to do: "), err
    for name in names:
        assert name in lines[-2], f"{name!r} not in {lines[-2]!r}"
    assert code == expected, (code, err)
    return lines[-2]


# ---- bad inputs ----------------------------------------------------------------------------------------


def test_missing_metadata_column_names_the_file_and_column(capsys, data, tmp_path):
    bad = copy_data(data, tmp_path / "data")
    meta = pd.read_csv(bad / "train-metadata.csv").drop(columns=["tbp_lv_H"])
    meta.to_csv(bad / "train-metadata.csv", index=False)
    code, _, err = cli(capsys, "folds", bad, "--out", tmp_path / "art" / "folds.csv")
    assert_clean(code, err, "metadata", str(bad / "train-metadata.csv"), "tbp_lv_H")


def test_non_numeric_metadata_value_names_column_and_line(capsys, data, tmp_path):
    bad = copy_data(data, tmp_path / "data")
    meta = pd.read_csv(bad / "train-metadata.csv")
    meta["age_approx"] = meta["age_approx"].astype(object)
    meta.loc[6, "age_approx"] = "sixty"
    meta.to_csv(bad / "train-metadata.csv", index=False)
    code, _, err = cli(capsys, "folds", bad, "--out", tmp_path / "art" / "folds.csv")
    line = assert_clean(code, err, "metadata", "train-metadata.csv", "age_approx", "sixty")
    assert re.search(r"line 8\b", line), line  # header is line 1: row 6 is line 8


def test_bad_hdf5_stops_run_before_any_stage_and_keeps_source_json(capsys, data, tmp_path):
    bad = copy_data(data, tmp_path / "data")
    DataPaths(bad).train_images.write_bytes(b"this is not HDF5" * 100)
    out = tmp_path / "art"
    code, _, err = cli(capsys, "run", bad, "--artifacts", out)
    assert_clean(code, err, "image", str(DataPaths(bad).train_images), "not a readable HDF5")
    assert not ArtifactPaths(out).source.exists()  # source.json never points at data that failed
    assert not ArtifactPaths(out).folds.exists()


def test_folds_that_leave_a_fold_without_positives_are_refused_at_fold_time(capsys, data, tmp_path):
    """Two malignant lesions in three folds: positives per fold [1, 1, 0] pass the balance check (spread 1),
    then the stacker died on fold 2; `folds` now refuses them with the reason."""
    two = copy_data(data, tmp_path / "data")
    meta = pd.read_csv(two / "train-metadata.csv")
    first_rows = meta.groupby("patient_id").head(1).index[:2]  # two patients, one positive each
    meta["target"] = 0
    meta.loc[first_rows, "target"] = 1
    meta.to_csv(two / "train-metadata.csv", index=False)
    code, _, err = cli(capsys, "folds", two, "--out", tmp_path / "folds.csv", "--n-folds", "3")
    assert_clean(code, err, "folds", "fold 2 has no positives", "[1, 1, 0]", "at most 2 folds")
    assert not (tmp_path / "folds.csv").exists()


def test_a_fold_file_with_a_one_class_fold_names_fold_and_file(capsys, stacked, tmp_path):
    """Positives per fold [1, 1, 0] pass the balance check (spread 1); the stacker used to die on fold 2."""
    art = tmp_path / "art"
    shutil.copytree(stacked, art)
    folds = pd.read_csv(ArtifactPaths(art).folds)
    patients = sorted(folds["patient_id"].unique())
    folds["fold"] = folds["patient_id"].map({p: i % 3 for i, p in enumerate(patients)})
    folds["target"] = 0
    for k in (0, 1):
        folds.loc[folds.index[folds["fold"] == k][0], "target"] = 1
    folds.to_csv(ArtifactPaths(art).folds, index=False)
    code, _, err = cli(capsys, "train-stack", "--artifacts", art, "--config", stacked.parent / "stack.yaml")
    assert_clean(code, err, "folds", str(ArtifactPaths(art).folds), "fold 2 has no positives", "[1, 1, 0]")


def test_features_of_other_data_name_the_feature_file_and_the_fold_file(capsys, stacked, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(stacked, art)
    features = pd.read_parquet(ArtifactPaths(art).features_train)
    features.iloc[:-3].to_parquet(ArtifactPaths(art).features_train)  # three training rows lost
    code, _, err = cli(capsys, "train-stack", "--artifacts", art, "--config", stacked.parent / "stack.yaml")
    assert_clean(code, err, "stack", str(ArtifactPaths(art).features_train), str(ArtifactPaths(art).folds),
                 "3 missing")


def test_a_missing_fold_file_says_how_to_make_it(capsys, tmp_path):
    code, _, err = cli(capsys, "train-stack", "--artifacts", tmp_path / "empty")
    assert_clean(code, err, "folds", str(tmp_path / "empty" / "folds.csv"), "lesionstack folds")


def test_unknown_config_key_names_file_and_key(capsys, stacked, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n_rounds: 20\nlearning_rat: 0.1\n")
    code, _, err = cli(capsys, "train-stack", "--artifacts", stacked, "--config", cfg)
    assert_clean(code, err, "config", str(cfg), "learning_rat")


@pytest.mark.parametrize("kind", ["corrupt", "oversized"])
def test_a_bad_crop_in_training_names_its_id(capsys, tmp_path, kind):
    """skip_corrupt is false: train-cnn stops at the first bad crop, naming its id and file."""
    from helpers import make_cnn_data

    root = make_cnn_data(tmp_path / "d", n=16, corrupt=("ISIC_0000005",) if kind == "corrupt" else ())
    if kind == "oversized":  # a 40,000 x 40,000 px JPEG header on a few bytes: refused before decoding
        with h5py.File(root / "train-image.hdf5", "a") as h5:
            jpeg = bytes(h5["ISIC_0000005"][()])
            sof = jpeg.index(b"\xff\xc0")
            big = jpeg[:sof + 5] + (40_000).to_bytes(2, "big") + (40_000).to_bytes(2, "big") + jpeg[sof + 9:]
            del h5["ISIC_0000005"]
            h5["ISIC_0000005"] = np.bytes_(big)
    (tmp_path / "cnn.yaml").write_text(CNN_YAML)
    code, _, err = cli(capsys, "train-cnn", root, "--folds", root / "folds.csv", "--config", tmp_path / "cnn.yaml",
                       "--artifacts", tmp_path / "art")
    line = assert_clean(code, err, "image", "ISIC_0000005", str(root / "train-image.hdf5"))
    if kind == "oversized":
        assert "40000x40000" in line and "limit" in line


def test_unseen_categories_and_missing_columns_warn_with_column_and_rows(capsys, data, tmp_path):
    drifted = copy_data(data, tmp_path / "data")
    test = pd.read_csv(drifted / "test-metadata.csv")
    test.loc[:2, "anatom_site_general"] = "tail"
    test["tbp_lv_H"] = np.nan
    test.drop(columns=["tbp_lv_stdL"]).to_csv(drifted / "test-metadata.csv", index=False)
    code, out, _ = cli(capsys, "features", drifted, "--artifacts", tmp_path / "art", "--no-cnn")
    assert code == 0
    assert "column 'anatom_site_general': 3 row(s) hold categories never seen in training (e.g. ['tail'])" in out
    assert f"column 'tbp_lv_H' is missing in all {len(test)} rows" in out
    assert f"column 'tbp_lv_stdL' is absent: all {len(test)} rows" in out
    assert ArtifactPaths(tmp_path / "art").features_ranges.is_file()


# ---- disks ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_mount(tmp_path):
    """Mount a tmpfs at a temp folder (root only, as in CI); yields a function taking mount options."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                        "test_full_disk_simulated_at_the_write covers ENOSPC")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_full_disk_names_the_file_being_written(capsys, data, tiny_mount):
    full = tiny_mount("size=64k")  # too small for the feature tables
    code, _, err = cli(capsys, "features", data, "--artifacts", full / "art", "--no-cnn")
    assert_clean(code, err, "disk full", "No space left on device", str(full / "art"))
    assert not list(full.rglob("*.tmp")), "a partial temporary file was left behind"


def test_full_disk_simulated_at_the_write(capsys, data, tmp_path, monkeypatch):
    """The same without a tmpfs (no root): ENOSPC raised by the write of the fold file's temporary file."""
    write_text = Path.write_text

    def no_space(self: Path, *args, **kwargs):
        if self.name.startswith(".folds.csv."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", no_space)
    code, _, err = cli(capsys, "folds", data, "--out", tmp_path / "art" / "folds.csv", "--n-folds", "2")
    assert_clean(code, err, "disk full", str(tmp_path / "art" / "folds.csv"))
    assert not list((tmp_path / "art").glob(".folds.csv.*")), "a partial temporary file was left behind"


def test_read_only_disk_names_the_path(capsys, data, tiny_mount):
    ro = tiny_mount("ro,size=64k")
    code, _, err = cli(capsys, "folds", data, "--out", ro / "art" / "folds.csv")
    assert_clean(code, err, "not writable", str(ro / "art"))


# ---- processes: two at once, kills, tracebacks -------------------------------------------------------

HOLDER = """
import sys, time
from lesionstack.lock import run_lock
with run_lock(sys.argv[1], command="lesionstack run data --out " + sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def lesionstack(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesionstack.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


def test_two_commands_on_one_artifacts_folder_and_a_stale_lock(stacked, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(stacked, art)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(art)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = lesionstack("train-stack", "--artifacts", art, "--config", stacked.parent / "stack.yaml")
        line = assert_clean(second.returncode, second.stderr, "locked", str(art), f"pid {holder.pid}",
                            "lesionstack run data --out", "since ")
        assert "in use by another lesionstack command" in line
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file still names it
        holder.wait()
    assert str(holder.pid) in ArtifactPaths(art).lock.read_text()
    partial = art / "features" / ".train.parquet.killed.tmp"  # what a kill mid-write leaves
    partial.write_text("{")
    third = lesionstack("train-stack", "--artifacts", art, "--config", stacked.parent / "stack.yaml")
    assert third.returncode == 0, third.stderr
    assert f"took over the lock of {art} left by pid {holder.pid}" in third.stderr
    assert ArtifactPaths(art).lock.read_text() == ""  # released on a clean exit
    assert not partial.exists()  # the killed holder's partial write: swept once its lock was taken over


def test_a_stage_killed_midway_leaves_no_partial_file_and_reruns(stacked, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(stacked, art)
    args = [sys.executable, "-m", "lesionstack.cli", "train-stack", "--artifacts", str(art), "--config",
            str(stacked.parent / "stack.yaml")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ArtifactPaths(art).stack_fold(0).config.exists():
        time.sleep(0.05)  # kill once the stage has started writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = lesionstack("train-stack", "--artifacts", art, "--config", stacked.parent / "stack.yaml")
    assert rerun.returncode == 0, rerun.stderr
    assert not [p for p in art.rglob("*") if p.name.endswith(".tmp")]
    assert ArtifactPaths(art).cv_json.is_file()


def test_debug_shows_the_traceback_and_bugs_keep_theirs(capsys, monkeypatch, tmp_path):
    from lesionstack.cli import main
    from lesionstack.folds import FoldError

    code, _, err = cli(capsys, "train-stack", "--artifacts", tmp_path / "none")
    assert code == 6 and "Traceback" not in err
    with pytest.raises(FoldError):  # re-raised: Python prints the traceback, exit code 1
        main(["--debug", "train-stack", "--artifacts", str(tmp_path / "none")])
    monkeypatch.setenv("LESIONSTACK_DEBUG", "1")
    with pytest.raises(FoldError):
        main(["train-stack", "--artifacts", str(tmp_path / "none")])


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch, tmp_path):
    import lesionstack.folds as folds
    from lesionstack.cli import main

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(folds, "read_folds", bug)  # the first thing train-stack calls
    with pytest.raises(ZeroDivisionError):
        main(["train-stack", "--artifacts", str(tmp_path / "art")])


def test_a_one_class_validation_fold_in_the_cnn_names_fold_and_fold_file(monkeypatch, tmp_path):
    """Skipped corrupt crops can still empty a class from a CNN fold: the error names fold and file."""
    import lesionstack.train.cnn as cnn
    from helpers import make_cnn_data, tiny_cnn_config
    from lesionstack.metrics import MetricError

    root = make_cnn_data(tmp_path / "d", n=16)

    def one_class(fold, *args, **kwargs):
        raise MetricError("fold validation set: pAUC needs both classes; got 8 negatives only")

    monkeypatch.setattr(cnn, "train_fold", one_class)
    with pytest.raises(MetricError, match=f"fold 0 of {re.escape(str(root / 'folds.csv'))}: .*both classes"):
        cnn.train_cnn(root, root / "folds.csv", tiny_cnn_config(device="cpu"), tmp_path / "art")


# ---- the exit-code table -------------------------------------------------------------------------------


def test_each_kind_has_its_own_code_and_the_readme_lists_them_all():
    codes: dict[int, str] = {}
    for kind in ERROR_KINDS.values():
        assert codes.setdefault(kind.code, kind.kind) == kind.kind, f"code {kind.code} serves two kinds"
    readme = (REPO / "docs" / "troubleshooting.md").read_text()
    for code, _, names in exit_code_table():
        row = next((line for line in readme.splitlines() if line.startswith(f"| {code} |")), None)
        assert row is not None, f"docs/troubleshooting.md lacks the row of exit code {code}"
        for name in names:
            assert name.split()[0] in row, f"docs/troubleshooting.md row {code} does not name {name}"
