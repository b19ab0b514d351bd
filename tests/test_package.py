"""Packaging for the Kaggle image: wheel tags against the target, the image record, the kernel's
one-wheel-at-a-time install with its fallbacks."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from lesionstack.inference.package import (
    PackageError,
    Target,
    check_versions,
    check_wheels,
    compat_requirements,
    image_targets,
    library_versions,
    read_image,
    shipped_requirements,
)

REPO = Path(__file__).resolve().parents[1]
KAGGLE = Target(python="3.12", platform="manylinux2014_x86_64")


@pytest.mark.parametrize("name", [
    "simplejpeg-1.9.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "lightgbm-4.6.0-py3-none-manylinux_2_12_x86_64.whl",
    "lesionstack-0.1.0-py3-none-any.whl",
    "numpy-2.0.2-cp312-cp312-manylinux_2_5_x86_64.manylinux1_x86_64.whl",
    "pkg-1.0-cp312-abi3-manylinux_2_17_x86_64.whl",
])
def test_wheels_for_the_target_pass(tmp_path, name):
    check_wheels([tmp_path / name], KAGGLE)


@pytest.mark.parametrize(("name", "why"), [
    ("simplejpeg-1.9.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "cp311"),
    ("catboost-1.2.10-cp312-cp312-manylinux_2_28_x86_64.whl", "newer glibc than manylinux2014"),
    ("simplejpeg-1.9.0-cp312-cp312-macosx_11_0_arm64.whl", "another platform"),
    ("simplejpeg-1.9.0-cp312-cp312-manylinux_2_17_aarch64.whl", "another architecture"),
    ("simplejpeg-1.9.0-cp312-cp312-linux_x86_64.whl", "a local, non-portable build"),
])
def test_wheels_for_another_target_are_refused_by_name(tmp_path, name, why):
    with pytest.raises(PackageError, match=name.replace(".", r"\.") + ": tags"):
        check_wheels([tmp_path / name], KAGGLE)


def test_a_newer_manylinux_target_accepts_older_glibc_wheels(tmp_path):
    target = Target(python="3.12", platform="manylinux_2_35_x86_64")
    check_wheels([tmp_path / "catboost-1.2.10-cp312-cp312-manylinux_2_28_x86_64.whl"], target)
    assert "manylinux2014_x86_64" in target.platforms() and "manylinux_2_36_x86_64" not in target.platforms()


def test_the_image_record_names_its_target_source_and_date():
    image = read_image()
    assert Target.from_image(image) == KAGGLE
    assert [t.python for t in image_targets(image)] == ["3.12", "3.13"]  # today's image and Colab's next
    assert image["read_on"] and any("pip-freeze" in s for s in image["sources"])
    assert shipped_requirements(image) == [f"simplejpeg=={metadata.version('simplejpeg')}"]
    reqs = compat_requirements(image)
    assert "pandas==2.2.2" in reqs and "torch==2.13.0" in reqs and not any("+" in r for r in reqs)
    assert not any(r.startswith("xgboost==") for r in reqs)  # xgboost-cpu: the same library, no NCCL


def test_image_record_without_a_key_names_it(tmp_path):
    path = tmp_path / "image.yaml"
    path.write_text("python: '3.12'\nplatform: manylinux2014_x86_64\n")
    with pytest.raises(KeyError, match="image.yaml: key 'implementation'"):
        read_image(path)


def _kernel(monkeypatch, root: Path):
    monkeypatch.setenv("LESIONSTACK_INPUT_ROOT", str(root / "input"))
    monkeypatch.setenv("LESIONSTACK_OUTPUT", str(root / "working"))
    spec = importlib.util.spec_from_file_location("kernel_under_test", REPO / "kaggle" / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder: Path, name: str, module: str) -> Path:
    dist = name.split("-")[0] + "-" + name.split("-")[1]
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "__version__ = '0'\n")
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist.split('-')[0]}\n"
                                                  f"Version: {dist.split('-')[1]}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_kernel_installs_each_wheel_alone_and_goes_on_without_a_broken_one(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "input" / "lesionstack-model" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "lesionstack-0.1.0-py3-none-any.whl", "lesionstack")
    (wheels / "simplejpeg-1.9.0-py3-none-any.whl").write_bytes(b"not a zip")  # fits here, then fails
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the kernel prepends its install folder
    kernel = _kernel(monkeypatch, tmp_path)
    failed = kernel.install_offline()
    out = capsys.readouterr().out
    assert failed == ["simplejpeg-1.9.0-py3-none-any.whl"]
    assert "installed lesionstack-0.1.0-py3-none-any.whl" in out
    assert "warning: simplejpeg-1.9.0" in out and "going on without it" in out
    assert (tmp_path / "working" / "lesionstack-site" / "lesionstack" / "__init__.py").is_file()


def test_kernel_tries_only_the_wheel_for_its_own_python(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "input" / "lesionstack-model" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "lesionstack-0.1.0-py3-none-any.whl", "lesionstack")
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    other = [f"simplejpeg-1.9.0-{t}-{t}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
             for t in ("cp39", "cp312", "cp313") if t != here]
    for name in other:  # a real pip call on one of these would fail: they are not even zips
        (wheels / name).write_bytes(b"not a zip")
    _wheel(wheels, f"simplejpeg-1.9.0-{here}-{here}-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "simplejpeg")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))
    kernel = _kernel(monkeypatch, tmp_path)
    if not kernel.fits_here(wheels / f"simplejpeg-1.9.0-{here}-{here}-manylinux_2_17_x86_64.whl"):
        pytest.skip("this machine is not manylinux x86_64")
    failed = kernel.install_offline()
    out = capsys.readouterr().out
    assert sorted(failed) == sorted(other)
    assert all(f"skipped {name}: built for another Python" in out for name in other)
    assert f"installed simplejpeg-1.9.0-{here}-{here}" in out and "warning" not in out


def test_kernel_stops_when_lesionstack_itself_is_missing(tmp_path, monkeypatch):
    (tmp_path / "input" / "lesionstack-model" / "wheels").mkdir(parents=True)
    kernel = _kernel(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="no lesionstack wheel"):
        kernel.install_offline()


def test_pyprojects_lower_bounds_are_the_kaggle_images_versions():
    """The docs claim each kernel library's range down to the Kaggle image's version, and
    `make kaggle-check` tests exactly those versions: the two must stay the same numbers."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    lower = {r.name: Version(s.version) for r in deps for s in r.specifier if s.operator == ">="}
    image = {**read_image()["packages"], "xgboost-cpu": read_image()["packages"]["xgboost"]}
    for name in KERNEL_LIBRARIES:
        assert lower[name] == Version(str(image[name]).split("+")[0]), name


KERNEL_LIBRARIES = ("torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "polars", "pyarrow",
                    "scikit-learn", "lightgbm", "xgboost-cpu", "catboost", "h5py", "pillow")


def test_a_library_version_change_is_named_and_a_patch_release_is_not(tmp_path):
    from lesionstack.files import write_json
    from lesionstack.paths import ArtifactPaths

    here = {name: v for name, v in library_versions().items() if v}
    trained = dict(here)
    trained["numpy"] = "0.1.0"  # another minor release: named
    trained["pandas"] = ".".join(here["pandas"].split(".")[:2] + ["999"])  # another patch release: not
    write_json(tmp_path / "versions.json", trained)
    lines = check_versions(ArtifactPaths(tmp_path))
    assert lines == [f"numpy 0.1.0 trained the models, {here['numpy']} is installed"]
    assert check_versions(ArtifactPaths(tmp_path / "none")) == []  # an artifacts folder without the record
