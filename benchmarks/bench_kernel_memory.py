"""Peak memory and crops/s of the kernel's CNN scoring at the real test set's scale (a benchmark, not a test).

    .venv/bin/python benchmarks/bench_kernel_memory.py WORK [--crops 50000 500000] [--distinct 400]

For each count N it writes WORK/crops_N/test-image.hdf5 (once; the competition's layout: one JPEG bytes
scalar per isic_id), made cheaply from `--distinct` JPEGs of the real crops' size range (60 to 240 px
square, median about 131 px) repeated under N different isic_ids, then scores it in a fresh process with a
small bundle (one fold of timm's `test_resnet` at 32 px, random-init weights: scoring cost does not depend
on the weights; the fold config's loader settings, `num_workers` 1) through `Predictor.stream_hdf5`,
writing each batch's rows to a CSV as they come (nothing per crop is kept; the ids are one numpy array of
bytes, `list_ids`). It prints, per N: the peak RSS of the scoring process and of its DataLoader worker (read
from /proc while it runs), crops/s of decode + resize alone (one core, the first 20,000 crops, their byte
ranges found beforehand) and end to end (read, decode, resize, model, CSV). Peak RSS at the two counts
should agree within 10%: anything held per crop shows up as the difference.
The table of `predict`'s later steps (the stacker on the test metadata) is not measured here: its table
grows with the rows by nature.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SIZES = (60, 240, 131)  # min, max, median side of the real ISIC 2024 crops (px)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--crops", type=int, nargs="+", default=[50_000, 500_000])
    p.add_argument("--distinct", type=int, default=400, help="distinct JPEGs, repeated under new isic_ids")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classifier", default="test_resnet")
    p.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)  # the child: score WORK/crops_N
    return p.parse_args()


def crop_sides(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sides with the real range and median: a log-normal around 131 px, clipped to 60..240."""
    low, high, median = SIZES
    return np.clip(np.round(np.exp(rng.normal(np.log(median), 0.3, n))), low, high).astype(int)


def distinct_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """`n` skin-like crops (a smooth background, a darker blob, noise) as quality-90 JPEGs."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    out = []
    for side in crop_sides(n, rng):
        yy, xx = np.mgrid[:side, :side] / side
        skin = np.array([200, 150, 130]) + rng.normal(0, 12, 3)
        blob = np.exp(-(((xx - rng.uniform(0.35, 0.65)) ** 2 + (yy - rng.uniform(0.35, 0.65)) ** 2)
                        / rng.uniform(0.01, 0.05)))
        img = skin - blob[..., None] * rng.uniform(60, 120, 3) + rng.normal(0, 6, (side, side, 3))
        out.append(simplejpeg.encode_jpeg(np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)), quality=90))
    return out


def write_hdf5(path: Path, n: int, jpegs: list[bytes]) -> None:
    """N crops under ids ISIC_0000000.. cycling through `jpegs`; built beside `path`, renamed when done."""
    import h5py

    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        for i in range(n):
            f[f"ISIC_{i:07d}"] = np.bytes_(jpegs[i % len(jpegs)])
    tmp.rename(path)


def write_bundle(root: Path, classifier: str, image_size: int) -> None:
    """artifacts/cnn/fold_0 holding a finished fold: config.yaml, model.safetensors, DONE."""
    from lesionstack.config import save_config
    from lesionstack.models import ModelConfig, build_model
    from lesionstack.paths import ArtifactPaths
    from lesionstack.runtime import save_weights
    from lesionstack.train.cnn_config import CNNConfig

    files = ArtifactPaths(root).cnn_fold(0)
    if files.done.is_file():
        return
    files.dir.mkdir(parents=True, exist_ok=True)
    cfg = CNNConfig(model=ModelConfig(classifier=classifier, gate="none"), image_size=image_size,
                    eval_batch_size=256, num_workers=1, cpu_threads=1, progress=False)
    save_config(cfg, files.config)
    save_weights(build_model(cfg.model), files.kept_weights)
    files.done.write_text("random-init weights for bench_kernel_memory.py\n")


class WorkerPeaks(threading.Thread):
    """The peak RSS (VmHWM) of each process this one started (the DataLoader workers), read from /proc every
    half second while they live. Not RUSAGE_CHILDREN: any short child spawned by vfork (`ldconfig`, run by
    `ctypes.util.find_library`) reports the *parent's* peak there, which is what that figure showed before."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
                for pid in children.read_text().split():
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:  # it ended meanwhile
                        continue
                    kb = int(status.split("VmHWM:")[1].split()[0])
                    self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0), kb / 1024)


def score(work: Path, n: int) -> dict:
    """The child process: stream-score WORK/crops_N into a CSV; the figures as a dict."""
    import torch

    from lesionstack.data.dataset import ScoringCrops
    from lesionstack.data.decode import jpeg_decoder
    from lesionstack.data.hdf5 import list_ids, locate_crops
    from lesionstack.inference.predictor import Predictor

    torch.set_num_threads(1)
    h5 = work / f"crops_{n}" / "test-image.hdf5"
    ids = list_ids(h5)  # fixed-width bytes: no Python object per crop in this process either
    p = Predictor.load(work / "bundle", device="cpu", progress=False)
    sample = ScoringCrops(locate_crops(h5, ids[:20_000]), p.image_size)  # the scoring pass's read + decode
    start = time.perf_counter()
    for i in range(len(sample)):
        sample[i]
    decode_rate = len(sample) / (time.perf_counter() - start)
    sample.crops.close()
    del sample
    out = work / f"crops_{n}" / "scores.csv"
    start, written, workers = time.perf_counter(), 0, WorkerPeaks()
    workers.start()
    with open(out, "w") as fh:
        fh.write("isic_id,target\n")
        for index, scores in p.stream_hdf5(h5, ids):
            fh.writelines(f"{ids[i].decode()},{s:.8g}\n" for i, s in zip(index, scores.mean(axis=1), strict=True))
            written += len(index)
    seconds = time.perf_counter() - start
    workers.stop.set()
    workers.join()
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = max(workers.peaks.values(), default=float("nan"))
    return {"crops": n, "written": written, "decoder": jpeg_decoder(), "num_workers": p.rt.settings.num_workers,
            "batch": p.rt.settings.eval_batch_size, "peak_rss_mb": round(main, 1),
            "peak_worker_rss_mb": round(worker, 1), "decode_resize_crops_per_s": round(decode_rate, 1),
            "end_to_end_crops_per_s": round(written / seconds, 1), "seconds": round(seconds, 1)}


def main() -> None:
    args = parse_args()
    if args.run is not None:
        print(json.dumps(score(args.work, args.run)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    write_bundle(args.work / "bundle", args.classifier, args.image_size)
    jpegs = distinct_jpegs(args.distinct)
    sides = sorted(len(j) for j in jpegs)
    print(f"{args.distinct} distinct JPEGs, median {sides[len(sides) // 2] / 1e3:.1f} kB")
    rows = []
    for n in args.crops:
        t0 = time.perf_counter()
        write_hdf5(args.work / f"crops_{n}" / "test-image.hdf5", n, jpegs)
        print(f"crops_{n}/test-image.hdf5 ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        child = subprocess.run([sys.executable, __file__, str(args.work), "--run", str(n)], capture_output=True,
                               text=True, check=False)
        if child.returncode != 0:
            sys.exit(f"scoring {n} crops failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    (args.work / "bench_kernel_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    first, last = rows[0], rows[-1]
    growth = last["peak_rss_mb"] / first["peak_rss_mb"] - 1
    print(f"peak RSS {first['peak_rss_mb']:.0f} MB at {first['crops']:,} crops, {last['peak_rss_mb']:.0f} MB at "
          f"{last['crops']:,} ({growth:+.1%}); worker {first['peak_worker_rss_mb']:.0f} -> "
          f"{last['peak_worker_rss_mb']:.0f} MB ({last['peak_worker_rss_mb'] / first['peak_worker_rss_mb'] - 1:+.1%})")


if __name__ == "__main__":
    main()
