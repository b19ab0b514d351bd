"""lesionstack's Kaggle training notebook: `lesionstack run` on the competition data on a Kaggle GPU, offline,
resumed across 12-hour sessions, then `package` for the inference kernel (kaggle/kernel.py).

Inputs (attach them to the notebook; internet off; kaggle/train-metadata.json lists them):
  * the competition data        -> {INPUT_ROOT}/isic-2024-challenge/  (train/test HDF5 + metadata)
  * the ImageNet weights        -> {INPUT_ROOT}/lesionstack-weights/*.safetensors  (one timm backbone's
                                   state dict; which file: LESIONSTACK_WEIGHTS_FILE, else the only one)
  * the ISIC 2018 Task 1 masks  -> {INPUT_ROOT}/isic2018-task1/  (X.jpg + X_segmentation.png, any depth)
  * the lesionstack source      -> {INPUT_ROOT}/lesionstack-source/  (the repository: pyproject.toml, src/,
                                   configs/, kaggle/; imported from there, never installed from the internet),
                                   with wheels/ holding simplejpeg's wheel for the image's Python (the one
                                   library training needs that the Kaggle image lacks)
  * from the second session on: this notebook's previous output -> {INPUT_ROOT}/lesionstack-train/
Each session copies the previous output into /kaggle/working (unless it is there already), then runs the
pipeline, which reuses every finished stage and fold and resumes an unfinished fold from its checkpoint. The
run is stopped before Kaggle's limit (LESIONSTACK_TIME_BUDGET_H, default 11.5 h from the notebook's start),
so the session ends cleanly and saves its output: attach that output to the next version and run it again.
A finished run is packaged into /kaggle/working/lesionstack-model (the inference kernel's dataset).

Environment variables override every location (the project's tests lay out a fake /kaggle/input this way):
LESIONSTACK_INPUT_ROOT, _COMPETITION, _WEIGHTS, _WEIGHTS_FILE, _MASKS, _SOURCE, _PREVIOUS, _OUTPUT,
_RUN_CONFIG (a run config path inside the source; default configs/run/isic2024.yaml), _DATASET_ID (the
inference bundle's Kaggle dataset id) and _TIME_BUDGET_H.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

START = time.monotonic()
INPUT_ROOT = Path(os.environ.get("LESIONSTACK_INPUT_ROOT", "/kaggle/input"))
COMPETITION = INPUT_ROOT / os.environ.get("LESIONSTACK_COMPETITION", "isic-2024-challenge")
WEIGHTS = INPUT_ROOT / os.environ.get("LESIONSTACK_WEIGHTS", "lesionstack-weights")
MASKS = INPUT_ROOT / os.environ.get("LESIONSTACK_MASKS", "isic2018-task1")
SOURCE = INPUT_ROOT / os.environ.get("LESIONSTACK_SOURCE", "lesionstack-source")
PREVIOUS = INPUT_ROOT / os.environ.get("LESIONSTACK_PREVIOUS", "lesionstack-train")
OUTPUT = Path(os.environ.get("LESIONSTACK_OUTPUT", "/kaggle/working"))
RUN_CONFIG = os.environ.get("LESIONSTACK_RUN_CONFIG", "configs/run/isic2024.yaml")
DATASET_ID = os.environ.get("LESIONSTACK_DATASET_ID", "your-kaggle-username/lesionstack-model")
BUDGET_S = float(os.environ.get("LESIONSTACK_TIME_BUDGET_H", "11.5")) * 3600
ARTIFACTS, BUNDLE, CONFIG = OUTPUT / "artifacts", OUTPUT / "lesionstack-model", OUTPUT / "run-config.yaml"
SITE = OUTPUT / "lesionstack-site"  # the source dataset's wheels, installed offline


def use_source() -> Path:
    """lesionstack from the attached source (copied: building its wheel writes beside pyproject.toml, and
    /kaggle/input is read-only); its libraries are the Kaggle image's own."""
    if not (SOURCE / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{SOURCE}: no lesionstack source (attach the lesionstack-source dataset)")
    copy = OUTPUT / "lesionstack-src"
    if not copy.is_dir():
        shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build"))
    install_wheels(copy / "wheels")
    sys.path.insert(0, str(copy / "src"))
    return copy


def install_wheels(folder: Path) -> None:
    """Each wheel of the source dataset's wheels/ on its own, offline, beside (not over) the image's
    libraries; a wheel for another Python is skipped. Then simplejpeg must import (the segmenter needs it)."""
    for wheel in sorted(folder.glob("*.whl")):
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                 "--upgrade", "--target", str(SITE), str(wheel)], capture_output=True, text=True)
        print(f"{'installed' if result.returncode == 0 else 'skipped (not for this Python)'} {wheel.name}")
    sys.path.insert(0, str(SITE))
    try:
        import simplejpeg  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"simplejpeg is not importable ({err}): put its wheel for this Python in the source "
                         f"dataset's wheels/ (docs/kaggle.md, 'Training on Kaggle')") from err


def resume_previous() -> None:
    """This notebook's previous output, copied into /kaggle/working: the run reuses what it finished."""
    if ARTIFACTS.exists() or not (PREVIOUS / "artifacts").is_dir():
        print(f"previous output: {'already in ' + str(ARTIFACTS) if ARTIFACTS.exists() else 'none attached'}")
        return
    for name in ("artifacts", "lesionstack-model"):
        if (PREVIOUS / name).is_dir():
            shutil.copytree(PREVIOUS / name, OUTPUT / name)  # copy2: times kept, as the stages compare them
    print(f"resuming from {PREVIOUS}: copied into {OUTPUT}")


def weights_file() -> Path:
    named = os.environ.get("LESIONSTACK_WEIGHTS_FILE")
    found = [WEIGHTS / named] if named else sorted(WEIGHTS.glob("**/*.safetensors"))
    if len(found) != 1 or not found[0].is_file():
        raise FileNotFoundError(f"{WEIGHTS}: expected one .safetensors weights file (or set "
                                f"LESIONSTACK_WEIGHTS_FILE), found {[p.name for p in found]}")
    return found[0]


def write_run_config(source: Path) -> Path:
    """The source's run config with this notebook's inputs: the masks folder and the weights file (the
    classifier's, and the segmenter encoder's when it is the same backbone). The same file every session,
    so the stages' config checks let the run resume."""
    import dataclasses

    from lesionstack.config import save_config
    from lesionstack.run_config import load_run_config

    cfg = load_run_config(source / RUN_CONFIG)
    weights = str(weights_file())
    model = dataclasses.replace(cfg.cnn.model, classifier_weights=weights)
    cfg = dataclasses.replace(cfg, masks_dir=str(MASKS), cnn=dataclasses.replace(cfg.cnn, model=model))
    if cfg.segmenter.encoder == model.classifier:
        cfg = dataclasses.replace(cfg, segmenter=dataclasses.replace(cfg.segmenter, encoder_weights=weights))
    save_config(cfg, CONFIG)
    return CONFIG


def run_within_budget(source: Path, config: Path) -> bool:
    """`lesionstack run` in a child process, stopped when the budget runs out; True when it finished."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(source / "src"), str(SITE)])}
    cmd = [sys.executable, "-m", "lesionstack.cli", "run", str(COMPETITION), "--artifacts", str(ARTIFACTS),
           "--config", str(config)]
    print("running:", " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: workers stop with it
    try:
        code = child.wait(timeout=max(BUDGET_S - (time.monotonic() - START), 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        print(f"time budget of {BUDGET_S / 3600:.1f} h reached: the run stopped; attach this version's output "
              "as an input of the next version (it resumes from there)", flush=True)
        return False
    if code != 0:
        raise SystemExit(f"`lesionstack run` failed with exit code {code} (its message is above)")
    return True


def package_once() -> None:
    from lesionstack.inference.package import describe, package

    if (BUNDLE / "bundle.json").is_file():
        print(f"{BUNDLE} already packaged")
        return
    # offline: the bundle ships the lesionstack wheel only; the inference kernel decodes with Pillow where
    # a bundle made with internet access would add simplejpeg's wheel
    package(ARTIFACTS, BUNDLE, dataset_id=DATASET_ID, ship=())
    print(describe(BUNDLE))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    source = use_source()
    resume_previous()
    if run_within_budget(source, write_run_config(source)):
        package_once()
        print(f"finished: {ARTIFACTS} and the inference bundle {BUNDLE} (make it a dataset for kaggle/kernel.py)")


if __name__ == "__main__":
    main()
