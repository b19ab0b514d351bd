"""Helpers shared by several test modules: import them from here, never from another test module (pytest
would collect that module's tests and fixtures a second time).

- the real data fixtures (`SHARED_DATA`: ../shared/data, or LESIONSTACK_SHARED_DATA);
- tiny image data sets and configs for the CNN, the distilled student, the stacker and a whole run;
- the `serve` tests' client helpers and the no-storage probes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pandas as pd
import simplejpeg
from PIL import Image

from lesionstack.config import save_config
from lesionstack.files import write_json
from lesionstack.folds import assign_folds, read_folds
from lesionstack.metrics import pauc, roc_auc
from lesionstack.paths import ArtifactPaths, DataPaths
from lesionstack.report import ReportConfig

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from lesionstack.train.cnn_config import CNNConfig
    from lesionstack.train.distill_config import DistillConfig

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """LESIONSTACK_SHARED_DATA, else shared/data beside the checkout or beside a folder above it (a git
    worktree nested one level deeper finds the same fixtures)."""
    if "LESIONSTACK_SHARED_DATA" in os.environ:
        return Path(os.environ["LESIONSTACK_SHARED_DATA"])
    found = next((p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()), None)
    return found or REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()


# ---- tiny image data for the CNN tests: a few dozen 40-px JPEG crops in the competition's HDF5 layout ------


def crop_jpeg(rng: np.random.Generator, positive: bool, size: int = 40) -> bytes:
    """Skin-coloured noise; positives carry a dark square (an image-only cue a CNN can learn)."""
    image = (rng.random((size, size, 3)) * 60 + 150).astype(np.uint8)
    if positive:
        image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 40
    return simplejpeg.encode_jpeg(image, quality=90)


def make_cnn_data(root: Path, n: int = 24, n_folds: int = 2, n_test: int = 4, corrupt: tuple[str, ...] = (),
                  seed: int = 0) -> Path:
    """Write train-image.hdf5, test-image.hdf5 and folds.csv (every 4th lesion positive) under `root`.

    Ids named in `corrupt` get bytes that are not a JPEG.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    target = (np.arange(n) % 4 == 0).astype(int)
    patients = [f"IP_{(i // 4) % (2 * n_folds):07d}" for i in range(n)]  # blocks of 4: one positive each
    with h5py.File(root / "train-image.hdf5", "w") as h5:
        for isic_id, t in zip(ids, target):
            data = b"not a jpeg at all" if isic_id in corrupt else crop_jpeg(rng, bool(t))
            h5[isic_id] = np.bytes_(data)
    with h5py.File(root / "test-image.hdf5", "w") as h5:
        for i in range(n_test):
            h5[f"ISIC_9{i:06d}"] = np.bytes_(crop_jpeg(rng, i % 2 == 0))
    folds = pd.DataFrame({"isic_id": ids, "patient_id": patients, "target": target,
                          "fold": [int(p[-1]) % n_folds for p in patients]})
    folds.to_csv(root / "folds.csv", index=False)
    return root


def tiny_cnn_config(gate: str = "train", **changes: object) -> CNNConfig:
    """timm's test_resnet behind the segmenter gate (untrained: allowed here), 32 px, 2 epochs."""
    from lesionstack.models import ModelConfig
    from lesionstack.train.cnn_config import CNNConfig

    model = ModelConfig(classifier="test_resnet", segmenter_encoder="test_resnet", gate=gate)
    cfg = CNNConfig(model=model, image_size=32, batch_size=8, eval_batch_size=32, epochs=2, lr=1e-3,
                    warmup_epochs=0.5, neg_per_pos=3.0, untrained_segmenter="allow", num_workers=0, cpu_threads=1,
                    progress=False)
    return dataclasses.replace(cfg, **changes)


# ---- the tiny distilled student (distill, phone and export tests): test_resnet on the CNN tests' data -------


def tiny_student(**changes: object) -> DistillConfig:
    from lesionstack.models import ModelConfig
    from lesionstack.train.distill_config import DistillConfig, TeacherConfig

    cfg = DistillConfig(model=ModelConfig(classifier="test_resnet", gate="none"), image_size=32, batch_size=8,
                        eval_batch_size=32, epochs=1, lr=1e-3, warmup_epochs=0.5, neg_per_pos=3.0, num_workers=0,
                        cpu_threads=1, progress=False, teacher=TeacherConfig(source="file", scores="TEACHER"))
    return dataclasses.replace(cfg, **changes)


def teacher_file(root: Path) -> Path:
    """Per-student-fold teacher scores (0.7 for positives, 0.3 for negatives)."""
    folds = read_folds(root / "folds.csv")
    parts = [folds[folds["fold"] != k][["isic_id"]].assign(student_fold=k, score=0.3 + 0.4 * folds["target"])
             for k in sorted(folds["fold"].unique())]
    pd.concat(parts).to_parquet(root / "teacher.parquet")
    return root / "teacher.parquet"


def train_tiny_student(tmp: Path, name: str = "tiny") -> tuple[Path, Path, DistillConfig, dict]:
    """(data folder, artifacts root with folds.csv and source.json, config, summary)."""
    from lesionstack.train.distill import distill
    from lesionstack.train.distill_config import TeacherConfig

    root = make_cnn_data(tmp / "data")
    art = tmp / "art"
    art.mkdir(parents=True, exist_ok=True)
    (art / "folds.csv").write_bytes((root / "folds.csv").read_bytes())
    (art / "source.json").write_text(f'{{"data_dir": "{root}"}}')
    cfg = tiny_student(teacher=TeacherConfig(source="file", scores=str(teacher_file(root))))
    return root, art, cfg, distill(root, art, cfg, name=name)


# ---- stacker inputs: 1,000 real metadata rows, a synthetic target, a PROXY CNN score ----------------------


REAL_META = SHARED_DATA / "isic2024-real-metadata" / "train-metadata-first1000-no-target.csv"
TINY_STACK = dict(seeds=(0,), n_rounds=20, learning_rate=0.1, max_depth=3, num_leaves=7, neg_pos_ratio=10.0,
                  n_jobs=1, params={"catboost": {"border_count": 16}})


def make_stack_inputs(root: Path, n: int = 600) -> tuple[pd.DataFrame, ArtifactPaths, pd.DataFrame]:
    """Features (with proxy CNN scores), artifacts with folds.csv, and the proxy CNN OOF frame."""
    from lesionstack.tabular.features import build_features

    meta = pd.read_csv(REAL_META).head(n).reset_index(drop=True)
    rng = np.random.default_rng(0)
    tab = np.log1p(meta["tbp_lv_areaMM2"]) + meta["tbp_lv_deltaLBnorm"] / meta["tbp_lv_deltaLBnorm"].std()
    tab = (tab - tab.mean()) / tab.std()
    image_cue = rng.normal(size=n)
    latent = tab + image_cue + 0.5 * rng.normal(size=n)
    meta["target"] = (latent > np.quantile(latent, 0.92)).astype(int)
    art = ArtifactPaths(root)
    folds = assign_folds(meta, n_folds=3, seed=0)
    art.root.mkdir(parents=True, exist_ok=True)
    folds.to_csv(art.folds, index=False)
    proxy = 1 / (1 + np.exp(-(image_cue + 0.7 * rng.normal(size=n))))  # PROXY CNN score, not a model
    cnn_oof = pd.DataFrame({"isic_id": meta["isic_id"], "fold": folds["fold"], "score": proxy})
    return build_features(meta, cnn_oof[["isic_id", "score"]]), art, cnn_oof


# A run small enough for a test: 2 folds, timm's tiny test nets, 32-px crops, one seed of each GBDT.
TINY_RUN = {
    "folds": {"n_folds": 2, "seed": 0},
    "segmenter": {"encoder": "test_resnet", "image_size": 32, "epochs": 2, "batch_size": 8, "load_workers": 1},
    "cnn": {"model": {"classifier": "test_resnet", "segmenter_encoder": "test_resnet", "gate": "train"},
            "image_size": 32, "batch_size": 16, "eval_batch_size": 64, "epochs": 2, "lr": 1e-3, "neg_per_pos": 3,
            "num_workers": 0, "progress": False},
    "stack": {"seeds": [0], "n_rounds": 20, "neg_pos_ratio": 0, "n_jobs": 1},
    "tune": {"enabled": False},
    "report": True,
}


# ---- serve: the client helpers and the no-storage probes -------------------------------------------------


def real_crop(shared_data: Path) -> bytes:
    return (shared_data / "isic2024-real-crops" / "ISIC_0015670.jpg").read_bytes()


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def post(client: TestClient, data: bytes, name: str = "photo.jpg", **fields: str):
    return client.post("/api/predict", files={"image": (name, data, "image/jpeg")}, data=fields)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: object) -> Iterator[str]:
    """A real uvicorn server in a thread of this process, so /proc/self/fd is the server's."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def open_files() -> set[str]:
    """What this process's file descriptors point at, sockets, pipes and devices left out."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("/") and not target.startswith("/dev/"):
            out.add(target)
    return out


def big_jpeg(min_bytes: int = 5_000_000) -> bytes:
    """A photo-sized JPEG of at least `min_bytes` (noise barely compresses)."""
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (1800, 1800, 3), dtype=np.uint8)), "JPEG", quality=100)
    assert len(data) >= min_bytes, len(data)
    return data


def slow_upload(url: str, image: bytes, during: list[set[str]]) -> int:
    """POST a multipart body in 256 kB pieces, recording the open files after each piece is sent (the
    server holds the part read so far: Starlette's own parser would have spooled it to a file by now)."""
    import httpx

    boundary = "privacy-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + image + tail

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 256 * 1024):
            yield body[start:start + 256 * 1024]
            time.sleep(0.02)
            during.append(open_files())

    headers = {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(len(body))}
    return httpx.post(url, content=pieces(), headers=headers, timeout=120).status_code


# ---- report: a complete artifacts folder of synthetic results (no training) ---------------------------


REPORT_FOLDS = 5
FAST_REPORT = ReportConfig(n_bootstrap=200, montage_per_group=4, dpi=60)
SCORE_COLUMNS = {"lgbm": "score_lgbm", "catboost": "score_catboost", "xgboost": "score_xgboost",
                 "tabular": "score_tabular", "cnn": "score_cnn", "blend": "score"}
ALL_FIGURES = ["roc.png", "calibration.png", "importance.png", "cnn_training.png", "segmenter.png", "montage.png"]


# ---- building artifacts ---------------------------------------------------------------------------------


def report_oof(rng: np.random.Generator, n_patients: int = 60) -> pd.DataFrame:
    """Lesions clustered in patients (a shared per-patient risk offset); every model scores the true risk
    plus noise."""
    sizes = rng.integers(8, 25, n_patients)
    patient = np.repeat(np.arange(n_patients), sizes)
    offset = rng.normal(0, 1.0, n_patients)[patient]
    truth = 1 / (1 + np.exp(-(-4.0 + 1.2 * offset + rng.normal(0, 1.0, patient.size))))
    target = (rng.random(patient.size) < truth).astype(int)
    frame = pd.DataFrame({"isic_id": [f"ISIC_{i:07d}" for i in range(patient.size)],
                          "patient_id": [f"IP_{p:06d}" for p in patient], "fold": patient % REPORT_FOLDS,
                          "target": target, "truth": truth})
    truth_logit = np.log(truth / (1 - truth))
    for name, noise in (("lgbm", 0.6), ("catboost", 0.5), ("xgboost", 0.7), ("tabular", 0.8), ("cnn", 1.4)):
        # noisy copies of the true risk: below the best possible pAUC, as a real model is
        logit = 0.5 + truth_logit + rng.normal(0, noise, patient.size)
        frame[f"score_{name}"] = 1 / (1 + np.exp(-logit))
    frame["score"] = frame[["score_lgbm", "score_catboost", "score_xgboost"]].mean(axis=1)
    assert frame.groupby("fold")["target"].sum().min() >= 2, "fixture needs positives in every fold"
    return frame


def cv_json_of(oof: pd.DataFrame) -> dict:
    models = {}
    for name, col in SCORE_COLUMNS.items():
        folds = [g for _, g in oof.groupby("fold")]
        p = [pauc(g["target"], g[col]) for g in folds]
        a = [roc_auc(g["target"], g[col]) for g in folds]
        models[name] = {"pauc": p, "pauc_mean": float(np.mean(p)), "pauc_std": float(np.std(p)), "auc": a,
                        "auc_mean": float(np.mean(a)), "auc_std": float(np.std(a)),
                        "pauc_oof": pauc(oof["target"], oof[col])}
    return {"metric": "pauc", "n_folds": REPORT_FOLDS, "n_rows": len(oof), "n_positives": int(oof["target"].sum()),
            "models": models, "blend": {"method": "mean", "weights": {"lgbm": 1 / 3, "catboost": 1 / 3,
                                                                      "xgboost": 1 / 3}}}


def _importance(rng: np.random.Generator) -> pd.DataFrame:
    features = [f"feature_{i:02d}_patient_norm" for i in range(40)]
    rows = []
    for model in ("lgbm", "catboost", "xgboost"):
        for fold in range(REPORT_FOLDS):
            gain = rng.gamma(1.0, 1.0, len(features)) * np.linspace(3, 0.2, len(features))
            rows += [(model, fold, f, g) for f, g in zip(features, gain / gain.sum())]
    return pd.DataFrame(rows, columns=["model", "fold", "feature", "importance"])


def _cnn_metrics(rng: np.random.Generator) -> dict:
    epochs = [{"epoch": e, "train_loss": 0.6 / (e + 1), "val_loss": 0.5 / (e + 1) + 0.05 * rng.random(),
               "val_pauc": 0.05 + 0.02 * e + 0.01 * rng.random(), "val_auc": 0.7 + 0.03 * e,
               "images_per_s": 300.0 + e, "lr": 1e-4} for e in range(4)]
    return {"epochs": epochs, "best_epoch": 3, "best_pauc": epochs[3]["val_pauc"], "best_auc": 0.79,
            "n_train": 800, "n_val": 200}


def _crop(rng: np.random.Generator) -> np.ndarray:
    """Skin-coloured square with a darker blob, 40 to 72 px (crop sizes vary in the real data)."""
    side = int(rng.integers(40, 72))
    yy, xx = np.mgrid[:side, :side]
    blob = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 4) ** 2
    img = np.empty((side, side, 3), np.uint8)
    img[:] = (214, 170, 150)
    img[blob] = (110, 70, 60)
    return np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def _write_images(path: Path, ids: list[str], rng: np.random.Generator) -> None:
    with h5py.File(path, "w") as h5:
        for isic_id in ids:
            h5[isic_id] = np.bytes_(simplejpeg.encode_jpeg(_crop(rng), quality=90))


def _write_segmenter(folder: Path) -> None:
    from lesionstack._compat import ensure_timm_importable

    ensure_timm_importable()
    from lesionstack.models import build_segmenter, save_segmenter

    cfg = {"encoder": "test_resnet", "decoder_channels": [16, 8, 8, 8, 8]}
    model = build_segmenter(cfg["encoder"], decoder_channels=tuple(cfg["decoder_channels"]))
    save_segmenter(model, folder / "model.pt")
    save_config(cfg, folder / "config.yaml")


def make_report_artifacts(root: Path, *, full: bool = True, seed: int = 0) -> ArtifactPaths:
    """cv.json and oof_stack.parquet always; with `full` every optional input the report reads too."""
    rng = np.random.default_rng(seed)
    paths = ArtifactPaths(root / "artifacts")
    oof = report_oof(rng)
    paths.root.mkdir(parents=True)
    oof.drop(columns=["patient_id", "truth"]).to_parquet(paths.oof_stack)
    write_json(paths.cv_json, cv_json_of(oof))
    if not full:
        return paths
    oof[["isic_id", "patient_id", "target", "fold"]].to_csv(paths.folds, index=False)
    paths.stack_dir.mkdir(parents=True)
    _importance(rng).to_csv(paths.feature_importance, index=False)
    for k in range(REPORT_FOLDS):
        write_json(paths.cnn_fold(k).metrics, _cnn_metrics(rng))
    seg = [{"epoch": e, "train_loss": 0.5 / (e + 1), "val_dice": 0.6 + 0.05 * e, "val_iou": 0.45 + 0.05 * e}
           for e in range(5)]
    write_json(paths.segmenter.metrics, {"dice": 0.8, "iou": 0.65, "epochs": seg, "n_train": 40, "n_val": 10,
                                         "encoder": "test_resnet"})
    _write_segmenter(paths.segmenter.dir)
    data = DataPaths(root / "data")
    data.root.mkdir()
    _write_images(data.train_images, list(oof["isic_id"]), rng)
    truth = oof[["isic_id", "target"]].assign(split="train", probability=oof["truth"])
    truth.to_csv(data.demo_truth, index=False)
    write_json(paths.source, {"data_dir": str(data.root)})
    return paths
