"""Training throughput of train-cnn's data path against the bare model, in one run.

    .venv/bin/python benchmarks/bench_cnn.py DATA_DIR [--config configs/cnn/demo.yaml] [--batches 8]

Prints, for the config's model, image size and batch size:
  * training images/s of the full pipeline: HDF5 -> JPEG decode -> resize (DataLoader workers) -> batched
    augmentation -> gated model forward/backward/AdamW step;
  * training images/s of the bare model on ready tensors of the same shape (no data path at all);
  * their ratio (the data path is not the bottleneck when it is close to 1).
Prediction throughput (decode once, every fold model) is `benchmarks/bench_predict.py`'s.
The two training loops alternate in rounds and the median round counts, so that load from other
processes hits both alike. DATA_DIR is a folder in the competition's layout (`lesionstack demo-data`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--config", type=Path, default=Path("configs/cnn/demo.yaml"))
    p.add_argument("--batches", type=int, default=6, help="batches per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of pipeline and bare model")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, rt) -> None:
    with rt.autocast():
        logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from lesionstack.data.augment import augment_batch
    from lesionstack.data.dataset import CropDataset
    from lesionstack.data.hdf5 import H5Images
    from lesionstack.models import build_model, param_groups
    from lesionstack.paths import DataPaths
    from lesionstack.runtime import RunSettings, Runtime, adamw, make_loader
    from lesionstack.train.cnn_config import load_cnn_config

    args = parse_args()
    cfg = load_cnn_config(args.config)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    rt = Runtime.create(RunSettings.pick(cfg), device=cfg.device, amp=cfg.amp)
    device = rt.device
    images = H5Images(DataPaths(args.data_dir).train_images)
    ids = images.ids
    rng = np.random.default_rng(0)
    need = args.batches * args.rounds * cfg.batch_size + 2 * cfg.batch_size
    order = rng.permutation(len(ids))[: min(len(ids), need)].tolist()
    order = (order * (need // len(order) + 1))[:need]
    labels = (rng.random(len(ids)) < 0.25).astype(np.float32)
    dataset = CropDataset(images, ids, labels, cfg.image_size)
    loader = iter(make_loader(dataset, rt, sampler=order, batch_size=cfg.batch_size, drop_last=True))

    torch.manual_seed(0)
    model = rt.place(build_model(cfg.model))
    opt = adamw(param_groups(model, cfg.lr, cfg.weight_decay), cfg.lr, cfg.weight_decay)
    model.train()
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    ready_x = rt.finish(torch.rand(shape, device=device))
    ready_y = torch.from_numpy(labels[: cfg.batch_size]).to(device)

    def pipeline_round() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(loader)
            x = rt.finish(augment_batch(rt.prepare(batch.images), cfg.augment, gen))
            train_step(model, opt, x, batch.labels.to(device, non_blocking=True), rt)
        sync(device)
        return args.batches * cfg.batch_size / (time.perf_counter() - start)

    def bare_round() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            train_step(model, opt, ready_x, ready_y, rt)
        sync(device)
        return args.batches * cfg.batch_size / (time.perf_counter() - start)

    batch = next(loader)  # warm-up: workers start, kernels are chosen
    train_step(model, opt, rt.finish(augment_batch(rt.prepare(batch.images), cfg.augment, gen)),
               batch.labels.to(device), rt)
    train_step(model, opt, ready_x, ready_y, rt)
    pipe, bare = [], []
    for _ in range(args.rounds):
        pipe.append(pipeline_round())
        bare.append(bare_round())

    figures = {
        "device": str(device), "model": cfg.model.classifier, "segmenter": cfg.model.segmenter_encoder,
        "gate": cfg.model.gate, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers, "torch_threads": torch.get_num_threads(), "amp": str(rt.dtype),
        "train_pipeline_images_per_s": statistics.median(pipe), "train_bare_images_per_s": statistics.median(bare),
        "ratio": statistics.median(pipe) / statistics.median(bare), "rounds_pipeline": pipe, "rounds_bare": bare,
    }
    print(f"{cfg.model.classifier} (gate {cfg.model.gate}, segmenter {cfg.model.segmenter_encoder}) at "
          f"{cfg.image_size} px, batch {cfg.batch_size}, {device}, {torch.get_num_threads()} thread(s), "
          f"{cfg.num_workers} worker(s), amp {rt.dtype}")
    print(f"  train, full pipeline : {figures['train_pipeline_images_per_s']:8.1f} images/s")
    print(f"  train, bare model    : {figures['train_bare_images_per_s']:8.1f} images/s")
    print(f"  ratio                : {figures['ratio']:8.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
