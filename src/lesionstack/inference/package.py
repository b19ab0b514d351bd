"""Package trained artifacts as a Kaggle dataset for the offline kernel (`kaggle/kernel.py`).

The kernel runs on Kaggle's own image (recorded in `kaggle/image.yaml`): torch, timm, numpy, pandas,
polars, scikit-learn and the GBDT libraries come from it. The bundle ships only what the image lacks
(simplejpeg, lesionstack itself), as wheels built or downloaded for the image's Python and platform, never
the packaging machine's, and every shipped wheel's tags are checked against that target.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lesionstack.files import read_json, write_json
from lesionstack.paths import ArtifactPaths
from lesionstack.tabular.gbdt import FAMILIES, find_pickles

# What a packaged model needs at prediction time, relative to the artifacts root.
PACKAGED_FILES = ("cv.json", "folds.csv", "config.yaml", "tune/best_params.json", "versions.json",
                  "features/train_ranges.json",  # predict warns about test values training never saw
                  "training_data.json")  # predict warns when the models learnt from synthetic data
PACKAGED_DIRS = ("cnn", "stack")
# Libraries whose versions are recorded beside the models and compared at prediction time.
VERSIONED = ("torch", "timm", *(f.package for f in FAMILIES.values()), "scikit-learn", "polars", "pandas", "numpy")
# The bundle's manifest: what it holds and for which target (read by `make kaggle-check` and by people).
MANIFEST = "bundle.json"


class PackageError(ValueError):
    """A bundle that would not run on the target image."""


# ---- the target image ---------------------------------------------------------------------------------


def source_root() -> Path:
    """The lesionstack source checkout (the wheel and kaggle/ come from it)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{root}: not a lesionstack source checkout; `package` builds the wheel from one")
    return root


def read_image(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The Kaggle image record (`kaggle/image.yaml`): python, platform, packages, compat substitutions."""
    import yaml

    path = Path(path) if path else source_root() / "kaggle" / "image.yaml"
    with open(path) as fh:
        image = yaml.safe_load(fh)
    for key in ("python", "platform", "implementation", "packages"):
        if key not in image:
            raise KeyError(f"{path}: key '{key}' is missing")
    return image


def compat_requirements(image: dict[str, Any]) -> list[str]:
    """`name==version` for every library of the image, with the `compat` substitutions applied
    (what `make kaggle-check` installs; local version labels such as +cu128 dropped)."""
    versions = {**image["packages"], **image.get("compat", {})}
    return [f"{name}=={str(v).split('+')[0]}" for name, v in versions.items() if v is not None]


def shipped_requirements(image: dict[str, Any]) -> list[str]:
    """The image's missing libraries (`null` in its record), at the versions installed here."""
    from importlib import metadata

    return [f"{name}=={metadata.version(name)}" for name, v in image["packages"].items() if v is None]


@dataclass(frozen=True)
class Target:
    """A Python + platform a bundle's wheels must install on."""

    python: str = "3.12"  # major.minor
    platform: str = "manylinux2014_x86_64"
    implementation: str = "cp"

    @classmethod
    def from_image(cls, image: dict[str, Any]) -> Target:
        return cls(str(image["python"]), str(image["platform"]), str(image["implementation"]))

    @property
    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    def platforms(self) -> list[str]:
        """Platform tags the target accepts: a manylinux tag accepts every older glibc (PEP 600)."""
        legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
        m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", self.platform) or re.fullmatch(
            r"manylinux_(\d+)_(\d+)_(\w+)", self.platform)
        if not m:
            return [self.platform]
        if m.re.groups == 2:
            (major, minor), arch = legacy[m.group(1)], m.group(2)
        else:
            major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
        tags = [f"manylinux_{major}_{g}_{arch}" for g in range(minor, 4, -1)]
        tags += [f"{name}_{arch}" for name, glibc in legacy.items() if glibc <= (major, minor)]
        return tags

    def tags(self) -> set[str]:
        """Every wheel tag (interpreter-abi-platform) that installs on the target."""
        from packaging import tags

        interp = f"{self.implementation}{self.version_tuple[0]}{self.version_tuple[1]}"
        found = tags.cpython_tags(self.version_tuple, platforms=self.platforms()) if self.implementation == "cp" \
            else tags.generic_tags(interp, platforms=self.platforms())
        compatible = tags.compatible_tags(self.version_tuple, interp, platforms=self.platforms())
        return {str(t) for t in (*found, *compatible)}

    def __str__(self) -> str:
        return f"{self.implementation}{self.python.replace('.', '')} {self.platform}"


def image_targets(image: dict[str, Any]) -> list[Target]:
    """One target per Python the image record's `pythons` names (default: its `python` alone): the bundle
    ships a simplejpeg wheel for each, and the kernel installs the one that fits the Python it finds."""
    base = Target.from_image(image)
    return [replace(base, python=str(p)) for p in image.get("pythons", [base.python])]


def check_wheels(wheels: Sequence[Path], target: Target) -> None:
    """Raise unless every wheel installs on `target` (its filename tags against the target's)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    accepted = target.tags()
    for wheel in wheels:
        try:
            _, _, _, wheel_tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename as err:
            raise PackageError(f"{wheel}: not a wheel file name ({err})") from err
        if not {str(t) for t in wheel_tags} & accepted:
            raise PackageError(f"{wheel.name}: tags {sorted(map(str, wheel_tags))} do not install on {target}")


# ---- wheels -------------------------------------------------------------------------------------------


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def build_own_wheel(dest: Path) -> Path:
    """lesionstack as a pure-Python wheel (py3-none-any): it installs on any target."""
    before = set(dest.glob("lesionstack-*.whl"))
    result = subprocess.run(_pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dest),
                                 str(source_root())), capture_output=True, text=True)
    if result.returncode != 0:
        raise PackageError(f"building the lesionstack wheel from {source_root()} failed: {result.stderr[-1000:]}")
    (wheel,) = set(dest.glob("lesionstack-*.whl")) - before
    return wheel


def download_wheels(specs: Sequence[str], dest: Path, target: Target) -> list[Path]:
    """Binary wheels of `specs` (no dependencies) for the target's Python and platform."""
    before = set(dest.glob("*.whl"))
    for spec in specs:
        cmd = _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
                   "--python-version", target.python, "--implementation", target.implementation)
        for platform in target.platforms():
            cmd += ["--platform", platform]
        result = subprocess.run([*cmd, spec], capture_output=True, text=True)
        if result.returncode != 0:
            raise PackageError(f"no wheel of {spec} for {target}: {result.stderr.strip()[-500:]}")
    return sorted(set(dest.glob("*.whl")) - before)


# ---- artifacts ----------------------------------------------------------------------------------------


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in VERSIONED:
        for dist in (name, f"{name}-cpu"):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def check_versions(art: ArtifactPaths) -> list[str]:
    """Differences between the libraries that trained the models and these; printed as warnings."""
    path = art.root / "versions.json"
    if not path.is_file():
        return []
    trained, here = read_json(path), library_versions()
    return [f"{name} {trained[name]} trained the models, {here.get(name)} is installed"
            for name in trained if trained[name] and here.get(name)
            and trained[name].split(".")[:2] != here[name].split(".")[:2]]


def _copy_artifacts(art: ArtifactPaths, dest: Path) -> None:
    for name in PACKAGED_FILES:
        if (art.root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(art.root / name, dest / name)
    for name in PACKAGED_DIRS:
        if (art.root / name).is_dir():
            shutil.copytree(art.root / name, dest / name, ignore=shutil.ignore_patterns("checkpoint.pt"))


def convert_legacy_weights(cnn_dir: Path) -> int:
    """Fold CNNs trained before safetensors kept `model.pt` (a torch pickle of tensors): rewrite each as
    `model.safetensors` in the bundle copy (loaded with torch's weights_only loader, so nothing runs)."""
    from lesionstack.paths import FoldFiles
    from lesionstack.runtime import load_weights

    legacy = [FoldFiles(p.parent) for p in sorted(cnn_dir.glob("fold_*/model.pt"))]
    for files in legacy:
        _save_safetensors(load_weights(files.weights), files.safetensors)
        files.weights.unlink()
    return len(legacy)


def _save_safetensors(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def refuse_pickles(copied: Path, art: ArtifactPaths) -> None:
    """Raise if anything under `copied` is a pickle (it loads only with the same library versions, and
    Kaggle's are not ours)."""
    found = find_pickles(copied)
    if found:
        names = [str(art.root / p.relative_to(copied)) for p in found]
        raise PackageError(f"{len(found)} pickle(s) would leave the machine, e.g. {names[:5]}: a pickle only "
                           "loads with the same library versions; retrain with this release (native model files)")


def halve_cnn_weights(cnn_dir: Path) -> int:
    """Rewrite the fold CNNs' floating-point weights as float16 in place; returns the files rewritten.

    `load_state_dict` copies each tensor into the fp32 model, so the loader needs no change; the scores
    move by fp16 rounding of the weights only (measured: docs/kaggle.md, fp16 weights).
    """
    from safetensors.torch import load_file

    safetensors = sorted(cnn_dir.glob("fold_*/**/*.safetensors"))  # seed-ensemble members included
    for path in safetensors:
        _save_safetensors(_half(load_file(path)), path)
    return len(safetensors)


def _half(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


# ---- the bundle ---------------------------------------------------------------------------------------


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def package(artifacts_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
            dataset_id: str = "your-kaggle-username/lesionstack-model", targets: Sequence[Target] | None = None,
            ship: Sequence[str] | None = None, fp16: bool = False) -> Path:
    """Build a folder that `kaggle datasets create -p OUT` accepts: wheels/ (for every one of `targets`,
    default the Kaggle image's Pythons), artifacts/, the kernel, dataset-metadata.json and bundle.json. Built
    beside OUT and renamed into place, so a failure leaves nothing."""
    from lesionstack.tabular.pairing import check_fold_pairing
    from lesionstack.trained.loaders import cnn_folds

    art, out = ArtifactPaths(artifacts_dir), Path(out)
    image = read_image()
    targets = list(targets or image_targets(image))
    ship = shipped_requirements(image) if ship is None else ship
    if not art.cv_json.is_file() or not art.stack_dir.is_dir():
        raise FileNotFoundError(f"{art.root}: no trained stacker to package (run `lesionstack run` first)")
    if read_json(art.cv_json).get("with_cnn"):
        cnn_folds(art)  # raises unless every CNN fold finished
        # the kernel pairs stack fold k with CNN fold k: refuse here, not on Kaggle, when it could not
        check_fold_pairing(art, int(read_json(art.cv_json)["n_folds"]))
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        build = Path(tmp) / "dataset"
        wheels = build / "wheels"
        wheels.mkdir(parents=True)
        _copy_artifacts(art, build / "artifacts")
        convert_legacy_weights(build / "artifacts" / "cnn")
        refuse_pickles(build / "artifacts", art)
        halved = halve_cnn_weights(build / "artifacts" / "cnn") if fp16 else 0
        own = build_own_wheel(wheels)
        by_python = {t.python: [own.name, *(w.name for w in _wheels_for(ship, wheels, t, Path(tmp)))]
                     for t in targets}
        for target in targets:
            check_wheels([wheels / name for name in by_python[target.python]], target)
        write_json(build / "artifacts" / "versions.json", library_versions())
        shutil.copy2(source_root() / "kaggle" / "kernel.py", build / "kernel.py")
        write_json(build / "dataset-metadata.json", {
            "title": dataset_id.split("/")[-1], "id": dataset_id, "licenses": [{"name": "CC0-1.0"}]})
        write_json(build / MANIFEST, {
            "targets": [{"python": t.python, "platform": t.platform, "implementation": t.implementation}
                        for t in targets],
            "wheels": sorted(p.name for p in wheels.glob("*.whl")), "wheels_by_python": by_python,
            "cnn_weights": "float16" if halved else "float32",
            "bytes": {"wheels": folder_size(wheels), "artifacts": folder_size(build / "artifacts"),
                      "cnn": folder_size(build / "artifacts" / "cnn")}})
        os.replace(build, out)
    return out


def _wheels_for(specs: Sequence[str], wheels: Path, target: Target, scratch: Path) -> list[Path]:
    """`specs`' wheels for one target, downloaded into a folder of their own (two targets may share a
    pure wheel), then moved into `wheels`."""
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix=f"wheels-{target.python}-"))
    found = download_wheels(specs, folder, target)
    check_wheels(found, target)
    for wheel in found:
        if not (wheels / wheel.name).exists():
            shutil.move(wheel, wheels / wheel.name)
    return [wheels / w.name for w in found]


def describe(bundle: Path) -> str:
    """One line per part of a bundle with its size, for the CLI."""
    manifest = read_json(bundle / MANIFEST)
    size = manifest["bytes"]
    total = folder_size(bundle)
    targets = ", ".join(str(Target(**t)) for t in manifest.get("targets", [manifest.get("target")]))
    return "\n".join([
        f"bundle {bundle}: {total / 1e6:.1f} MB for {targets}",
        f"  artifacts {size['artifacts'] / 1e6:.1f} MB (fold CNNs {size['cnn'] / 1e6:.1f} MB, "
        f"{manifest['cnn_weights']})",
        f"  wheels    {size['wheels'] / 1e6:.1f} MB: {', '.join(manifest['wheels'])}",
    ])
