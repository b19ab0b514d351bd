"""CPU-seconds of a demo training step and of a scoring batch, the frozen gate's masks made online or cached.

    .venv/bin/python benchmarks/bench_gate_masks.py [--config configs/cnn/demo.yaml] [--rounds 5]

One `GatedClassifier` of the config (random init, gate freeze; weights do not change the cost), one torch
thread. A training step: augment a batch of 32-px crops and their masks (`augment_with_masks`), forward,
BCE, backward, fused AdamW; `online` runs the frozen segmenter on the augmented batch, `cached` takes the
masks given. A scoring batch (`eval_batch_size` crops, flip TTA, a seed ensemble of two members sharing the
segmenter): `online` runs the segmenter for each member and view (4 passes), `cached` once
(`model_logits(one_mask=True)`). Also the cost per crop of making the masks once (`CachedMasks.of`'s forward).
The settings alternate in rounds and each one's median counts, so load from other processes hits them alike.
Prints CPU ms (`time.process_time`) per step or batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lesionstack.data.augment import augment_with_masks
from lesionstack.models import SeedEnsemble, build_model
from lesionstack.runtime import RunSettings, Runtime, adamw, model_logits, seed_everything
from lesionstack.train.cnn_config import load_cnn_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/cnn/demo.yaml"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="training steps per round and setting")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cfg = load_cnn_config(args.config, untrained_segmenter="allow")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gate="freeze", classifier_weights=None,
                                                             segmenter_weights=None))
    rt = Runtime(RunSettings.pick(cfg, progress=False), torch.device("cpu"), None)
    seed_everything(0)
    model = rt.place(build_model(cfg.model)).train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    size, batch = cfg.image_size, cfg.batch_size
    images = torch.rand(batch, 3, size, size)
    y = (torch.arange(batch) % 11 == 0).float()
    with torch.no_grad():
        masks = model.mask(rt.finish(images.clone()))
    gen = torch.Generator().manual_seed(0)

    def train_step(cached: bool) -> None:
        x, m = augment_with_masks(images, masks if cached else None, cfg.augment, gen)
        logits = model(rt.finish(x), aux=True, **({"mask": m} if cached else {}))
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    pair = SeedEnsemble([build_model(cfg.model), build_model(cfg.model)]).eval()
    pair.members[1].segmenter.load_state_dict(pair.members[0].segmenter.state_dict())
    pair = rt.place(pair)
    scored = rt.finish(torch.rand(cfg.eval_batch_size, 3, size, size))

    @torch.no_grad()
    def score(cached: bool) -> None:
        model_logits(pair, scored, rt, tta=True, one_mask=cached)

    @torch.no_grad()
    def make_masks() -> None:
        model.mask(scored)

    runs: dict[str, tuple[Callable[[], None], int]] = {
        "train online": (lambda: train_step(False), args.steps), "train cached": (lambda: train_step(True), args.steps),
        "score online": (lambda: score(False), 2), "score cached": (lambda: score(True), 2),
        "masks once": (make_masks, 2)}
    for fn, _ in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            fn, n = runs[name]
            start = time.process_time()
            for _ in range(n):
                fn()
            times[name].append((time.process_time() - start) / n)
    for name, values in times.items():
        unit = f"a step of {batch}" if name.startswith("train") else f"a batch of {cfg.eval_batch_size}"
        print(f"{name:13s} {statistics.median(values) * 1000:8.1f} CPU ms per {unit}")
    train = statistics.median(times["train cached"]) / statistics.median(times["train online"])
    score_ratio = statistics.median(times["score cached"]) / statistics.median(times["score online"])
    print(f"cached / online: training step x{train:.2f}, scoring x{score_ratio:.2f}; masks made once: "
          f"{statistics.median(times['masks once']) / cfg.eval_batch_size * 1000:.2f} CPU ms per crop")


if __name__ == "__main__":
    main()
