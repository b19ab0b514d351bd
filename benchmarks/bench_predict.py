"""Throughput of prediction with trained CNN fold models (the `Predictor`), in one run.

    .venv/bin/python benchmarks/bench_predict.py ARTIFACTS IMAGES [--crops 512] [--device auto] [--folds 0]

ARTIFACTS is a trained artifacts root (every CNN fold finished); IMAGES an HDF5 of crops in the
competition's layout, or a data folder holding test-image.hdf5 (else train-image.hdf5). Prints, for the
first `--crops` crops:
  * crops/s of `Predictor.score_hdf5`: read + decode + resize once per crop (DataLoader workers), then
    every fold model with its flip TTA on that batch; this is what `predict` and the Kaggle kernel run;
  * crops/s of scoring fold by fold with one loader per fold model (every crop decoded once per fold),
    the way prediction worked before the Predictor;
  * crops/s of the fold models alone on ready tensors (no data path at all);
  * decode + resize alone, on one core.
Each timed figure is the median of `--rounds` rounds. A Kaggle kernel needs about
(test crops) / (the first figure) seconds for the CNN part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", type=Path)
    p.add_argument("images", type=Path, help="an HDF5 file, or a data folder with test-/train-image.hdf5")
    p.add_argument("--crops", type=int, default=512, help="how many crops to score per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--folds", default=None, help="only these fold models, e.g. '0' or '0,1' (default: every one)")
    p.add_argument("--num-workers", type=int, default=None, help="default: the fold config's")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args()


def hdf5_of(images: Path) -> Path:
    if images.is_file():
        return images
    for name in ("test-image.hdf5", "train-image.hdf5"):
        if (images / name).is_file():
            return images / name
    raise FileNotFoundError(f"{images}: neither an HDF5 file nor a folder with test-/train-image.hdf5")


def rate(n: int, rounds: int, work: Callable[[], object], device: torch.device) -> float:
    """Median items/s of `rounds` runs of `work` (after one warm-up run)."""
    work()
    figures = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        figures.append(n / (time.perf_counter() - start))
    return statistics.median(figures)


def main() -> None:
    from lesionstack.data.dataset import CropDataset
    from lesionstack.data.hdf5 import H5Images
    from lesionstack.inference.predictor import Predictor
    from lesionstack.runtime import model_logits, predict_logits

    args = parse_args()
    folds = [int(k) for k in args.folds.split(",")] if args.folds else None
    p = Predictor.load(args.artifacts, device=args.device, progress=False, num_workers=args.num_workers,
                       folds=folds)
    path = hdf5_of(args.images)
    ids = H5Images(path).ids[: args.crops]
    n, rt = len(ids), p.rt
    dataset = CropDataset(path, ids, None, p.image_size)
    ready = p.preprocess([dataset.load(i) for i in range(min(n, rt.settings.eval_batch_size))])
    ready_batches = -(-n // len(ready))  # ceil: as many model calls as a round of n crops makes

    once = rate(n, args.rounds, lambda: p.score_hdf5(path, ids), p.device)
    per_fold = rate(n, args.rounds, lambda: [predict_logits(m, dataset, rt) for m in p.models], p.device)

    @torch.no_grad()
    def models_alone() -> None:
        for _ in range(ready_batches):
            for model in p.models:
                model_logits(model, ready, rt, rt.settings.tta_hflip).cpu()

    models = rate(len(ready) * ready_batches, args.rounds, models_alone, p.device)
    start = time.perf_counter()
    for i in range(min(n, 256)):
        dataset.load(i)
    decode = min(n, 256) / (time.perf_counter() - start)

    first = p.models[0]
    figures = {
        "device": str(p.device), "folds": p.folds, "image_size": p.image_size, "amp": str(rt.dtype),
        "model": type(first.classifier).__name__, "gate": first.gate, "crops": n,
        "batch_size": rt.settings.eval_batch_size, "num_workers": rt.settings.num_workers,
        "tta_hflip": rt.settings.tta_hflip, "torch_threads": torch.get_num_threads(),
        "predictor_crops_per_s": once, "fold_by_fold_crops_per_s": per_fold, "models_alone_crops_per_s": models,
        "decode_resize_crops_per_s_one_core": decode,
    }
    print(f"{len(p.folds)} fold model(s) ({figures['model']}, gate {first.gate}) at {p.image_size} px, "
          f"{p.device}, amp {rt.dtype}, batch {rt.settings.eval_batch_size}, {rt.settings.num_workers} worker(s), "
          f"{torch.get_num_threads()} thread(s), TTA {rt.settings.tta_hflip}, {n} crops from {path}")
    print(f"  Predictor.score_hdf5 (decode once)  : {once:9.1f} crops/s")
    print(f"  fold by fold (decode once per fold) : {per_fold:9.1f} crops/s")
    print(f"  fold models alone, ready tensors    : {models:9.1f} crops/s")
    print(f"  decode + resize alone, one core     : {decode:9.1f} crops/s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
