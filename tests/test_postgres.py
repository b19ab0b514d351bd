"""Optuna's shared study on a real PostgreSQL server (issue 12.8): two `lesionstack tune` workers in two
processes, one killed and restarted; the study resumes and its best parameters reach `train-stack`.

The server is a throwaway cluster in a temp dir on a free local port (Debian's `postgresql`, installed by
`make test`). initdb refuses to run as root, so as root (CI) the cluster belongs to the `postgres` system
user and its tools run through `runuser`.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.folds import make_folds_file
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.tabular.features_stage import FeaturesConfig, features_stage

STUDY = "shared-lgbm"


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """postgresql://... of a fresh server, stopped and deleted after the module."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the dev extras (pip install -e '.[dev]')")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found; `make test` installs Debian's postgresql")
    as_user: list[str] = []
    root = tmp_path_factory.mktemp("pg")
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres system user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` system user to own the cluster")
        os.chmod(root, 0o755)
        for parent in root.parents:  # the postgres user must reach the cluster folder
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "cluster", _free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)

    done = pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "lesionstack", "--no-sync")
    assert done.returncode == 0, done.stderr
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    done = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w",
              "start")
    assert done.returncode == 0, done.stderr + (root / "server.log").read_text()
    try:
        yield f"postgresql+psycopg2://lesionstack@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")


@pytest.fixture(scope="module")
def tune_inputs(tmp_path_factory) -> Path:
    """An artifacts root holding folds.csv and tabular features (no CNN) of a tiny demo data set."""
    root = tmp_path_factory.mktemp("pgtune")
    write_demo_data(root / "data", DemoSpec(patients=16, lesions_per_patient=10, seed=3, positive_rate=0.1,
                                            mask_count=0, test_fraction=0.0))
    out = root / "artifacts"
    make_folds_file(root / "data", ArtifactPaths(out).folds, n_folds=2, seed=0)
    features_stage(DataPaths(root / "data"), ArtifactPaths(out), FeaturesConfig(use_cnn=False))
    config = root / "stack.yaml"
    config.write_text("models: [lgbm]\nseeds: [0]\nn_rounds: 20\nneg_pos_ratio: 0\nn_jobs: 1\n")
    return out


def _lesionstack(*args: str) -> list[str]:
    return [sys.executable, "-m", "lesionstack.cli", *args]


def _tune(out: Path, url: str, n_trials: int) -> list[str]:
    return _lesionstack("tune", "--artifacts", str(out), "--config", str(out.parent / "stack.yaml"), "--model", "lgbm",
                        "--storage", url, "--study-name", STUDY, "--n-trials", str(n_trials))


def _trials(url: str) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name=STUDY, storage=url)
    return {state.name: sum(t.state == state for t in study.trials) for state in optuna.trial.TrialState}


def test_two_tune_workers_share_a_postgres_study_survive_a_kill_and_feed_train_stack(postgres_url, tune_inputs):
    out, url = tune_inputs, postgres_url
    env = dict(os.environ, OMP_NUM_THREADS="1")
    victim = subprocess.Popen(_tune(out, url, 1000), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    steady = subprocess.Popen(_tune(out, url, 4), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill the victim once the shared study holds finished trials
        time.sleep(0.5)
        try:
            if _trials(url)["COMPLETE"] >= 2:
                break
        except KeyError:  # the study is not created yet
            continue
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    before = _trials(url)
    restarted = subprocess.run(_tune(out, url, 2), env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    steady_out = steady.communicate(timeout=300)[0].decode()
    assert steady.returncode == 0, steady_out
    after = _trials(url)
    # the restarted worker added its 2 trials to the same study, on top of what both workers had finished
    assert after["COMPLETE"] + after["PRUNED"] >= before["COMPLETE"] + before["PRUNED"] + 2, (before, after)

    import optuna

    best = optuna.load_study(study_name=STUDY, storage=url).best_trial
    saved = json.loads(ArtifactPaths(out).best_params.read_text())
    assert saved["params"] == best.params and saved["study_name"] == STUDY
    stacked = subprocess.run(_lesionstack("train-stack", "--artifacts", str(out), "--config",
                                          str(out.parent / "stack.yaml")),
                             env=env, capture_output=True, text=True, timeout=300)
    assert stacked.returncode == 0, stacked.stdout + stacked.stderr
    said = stacked.stdout + stacked.stderr  # the stage's log lines go to stderr
    assert f"using tuned params for lgbm from {ArtifactPaths(out).best_params}" in said
    assert str(best.params["learning_rate"])[:6] in said
