"""lesionstack's Kaggle kernel: make submission.csv for ISIC 2024 offline, with one call.

Inputs (attach both to the notebook; internet off):
  * the competition data   -> {INPUT_ROOT}/isic-2024-challenge/{test-metadata.csv, test-image.hdf5}
  * the packaged model     -> {INPUT_ROOT}/lesionstack-model/{wheels/, artifacts/}  (`lesionstack package`)
INPUT_ROOT defaults to /kaggle/input and the output folder to /kaggle/working; the environment variables
LESIONSTACK_INPUT_ROOT, LESIONSTACK_COMPETITION, LESIONSTACK_MODEL and LESIONSTACK_OUTPUT override them
(the project's tests lay out a fake /kaggle/input in a temporary folder this way).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

INPUT_ROOT = Path(os.environ.get("LESIONSTACK_INPUT_ROOT", "/kaggle/input"))
COMPETITION = INPUT_ROOT / os.environ.get("LESIONSTACK_COMPETITION", "isic-2024-challenge")
MODEL = INPUT_ROOT / os.environ.get("LESIONSTACK_MODEL", "lesionstack-model")
OUTPUT = Path(os.environ.get("LESIONSTACK_OUTPUT", "/kaggle/working"))


def fits_here(wheel: Path) -> bool:
    """Whether a wheel's tags install on this interpreter (the bundle holds one simplejpeg wheel per Python
    it was packaged for; only the one for this Python is tried). Without `packaging`, pip decides."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return True
    here = {str(t) for t in sys_tags()}
    return any(str(t) in here for t in parse_wheel_filename(wheel.name)[3])


def install_offline() -> list[str]:
    """Install each packaged wheel that fits this Python on its own, offline, beside (not over) Kaggle's
    libraries.

    --no-deps: torch, timm, numpy, pandas, polars, scikit-learn and the GBDT libraries are the image's own;
    the bundle holds only what the image lacks. Wheels for another Python are skipped; the others go one per
    pip call, so a refused wheel costs only itself: without simplejpeg, JPEGs decode with Pillow (slower,
    the same pixels where Pillow decodes at the same DCT scale). Returns the names of the wheels that failed
    or were skipped; only lesionstack itself is indispensable.
    """
    site = OUTPUT / "lesionstack-site"
    wheels = sorted((MODEL / "wheels").glob("*.whl"))
    if not any(w.name.startswith("lesionstack-") for w in wheels):
        raise FileNotFoundError(f"{MODEL / 'wheels'}: no lesionstack wheel (is the lesionstack-model dataset "
                                "attached?)")
    failed = []
    for wheel in wheels:
        if not fits_here(wheel):
            failed.append(wheel.name)
            print(f"skipped {wheel.name}: built for another Python or platform than Python "
                  f"{sys.version_info.major}.{sys.version_info.minor} here")
            continue
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                 "--upgrade", "--target", str(site), str(wheel)], capture_output=True, text=True)
        if result.returncode == 0:
            print(f"installed {wheel.name}")
        else:
            failed.append(wheel.name)
            print(f"warning: {wheel.name} did not install, going on without it: "
                  f"{(result.stderr or result.stdout).strip()[-400:]}")
    if any(name.startswith("lesionstack-") for name in failed):
        raise RuntimeError("the lesionstack wheel did not install (see the pip message above)")
    sys.path.insert(0, str(site))
    return failed


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    install_offline()
    import lesionstack
    from lesionstack.data.decode import jpeg_decoder
    from lesionstack.inference.submit import predict

    print(f"lesionstack {lesionstack.__version__} from {lesionstack.__file__}")
    print(f"JPEG decoder: {jpeg_decoder()}")
    start = time.perf_counter()
    scores = predict(COMPETITION, MODEL / "artifacts", OUTPUT / "submission.csv")
    seconds = time.perf_counter() - start
    print(f"wrote {OUTPUT / 'submission.csv'}: {len(scores)} crops in {seconds:.1f} s, "
          f"{len(scores) / seconds:.1f} crops/s end to end")


if __name__ == "__main__":
    main()
