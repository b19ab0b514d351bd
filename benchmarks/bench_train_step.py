"""One training step of each config's model in four settings, timed against each other in one run.

    .venv/bin/python benchmarks/bench_train_step.py [--config configs/cnn/demo.yaml ...] [--threads 1]

For each config (its model, image size and batch size; random init, ready tensors, no data path), one
forward/backward/AdamW step with:
  * plain:          contiguous (NCHW) model and batch, AdamW's default kernel (the old path; on CPU a loop
                    over the tensors, several elementwise passes over each);
  * fused:          AdamW's fused kernel (`runtime.adamw`);
  * channels_last:  NHWC model and batch (`channels_last: true`, what `Runtime.place` / `finish` do);
  * both:           what training runs now.
The four settings alternate in rounds (each round in another order) and each one's median round counts,
so load from other processes hits them alike. One parameter group and a one-output head throughout
(training's weight-decay groups and a diagnosis config's k outputs cost the same per step, to noise).
Prints ms per step and the speed-up of each over plain. Pretrained weights named in a config are not
loaded (random init costs the same per step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

DEFAULT_CONFIGS = ("configs/cnn/demo.yaml", "configs/distill/demo.yaml", "configs/cnn/default.yaml")
SETTINGS = {"plain": (False, False), "fused": (False, True), "channels_last": (True, False), "both": (True, True)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, action="append", help="a CNN, distill or diagnosis config (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo trains one per fold process)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the four settings")
    p.add_argument("--steps", type=int, default=0, help="steps per round (0: about 1 s of plain steps)")
    return p.parse_args()


def stepper(model: torch.nn.Module, batch: int, size: int, channels_last: bool, fused: bool):
    """A closure running one training step of a private copy of `model` in the given setting."""
    model = copy.deepcopy(model).train()
    x = torch.rand(batch, 3, size, size)
    y = (torch.arange(batch) % 10 == 0).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    from lesionstack.runtime import adamw

    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, 1e-3, 0.01) if fused else torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step() -> None:
        out = model(x)
        loss = F.binary_cross_entropy_with_logits(out.reshape(batch, -1)[:, 0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1000


def bench_config(path: Path, rounds: int, steps: int) -> None:
    from lesionstack.config import config_from_dict
    from lesionstack.models import ModelConfig, build_model

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    model_cfg = dataclasses.replace(config_from_dict(ModelConfig, raw["model"], where=f"{path}: model"),
                                    classifier_weights=None, segmenter_weights=None)
    size, batch = int(raw["image_size"]), int(raw["batch_size"])
    torch.manual_seed(0)
    model = build_model(model_cfg)
    steps_of = {name: stepper(model, batch, size, *flags) for name, flags in SETTINGS.items()}
    for step in steps_of.values():  # warm-up: oneDNN picks its kernels, the optimiser makes its state
        step()
        step()
    n = steps or max(2, round(1000 / timed(steps_of["plain"], 2)))
    ms: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated: no setting always first
            ms[name].append(timed(steps_of[name], n))
    plain = statistics.median(ms["plain"])
    print(f"{path}: {model_cfg.classifier} (gate {model_cfg.gate}) at {size} px, batch {batch}, "
          f"{torch.get_num_threads()} thread(s), {n} steps x {rounds} rounds")
    for name in SETTINGS:
        med = statistics.median(ms[name])
        print(f"  {name:14s} {med:8.1f} ms/step   x{plain / med:.2f}", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    for path in args.config or [Path(p) for p in DEFAULT_CONFIGS]:
        bench_config(path, args.rounds, args.steps)


if __name__ == "__main__":
    main()
