"""Where and how a model runs: process group, device, precision, loaders, and batched scoring.

Shared by training (`lesionstack.train`) and inference (`lesionstack.inference`); it knows nothing about
either stage's config class. `RunSettings` holds the few settings the loops read (a stage builds it from
its own config with `RunSettings.pick`), `Runtime` adds the device, the autocast dtype and the process's
place in a (possibly single-process) `torchrun` group.

    rt = Runtime.create(RunSettings(eval_batch_size=128), device="auto", amp="auto")
    logits = predict_logits(model, CropDataset(h5, ids, None, 128), rt)   # NaN where a crop was skipped
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lesionstack.config import ConfigError
from lesionstack.data.augment import normalize, to_float
from lesionstack.data.dataset import CropDataset, check_corrupt, collate_skip, shard
from lesionstack.files import atomic_path

# ---- processes and devices ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistContext:
    """Join the process group that `torchrun` describes in the environment (nccl on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch_dist.is_initialized():
        cuda = resolve_device(device_name, ctx).type == "cuda"
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
    return ctx


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        torch_dist.barrier()


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's BatchNorm statistics (each rank's last batch moved its own copy)."""
    if ctx.active:
        for buffer in model.buffers():
            torch_dist.broadcast(buffer.data, src=0)


def resolve_device(name: str, ctx: DistContext = DistContext()) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device(name)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `setting` ('auto', 'bf16', 'fp16', 'off') on `device`, or None."""
    if setting not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"amp: expected auto, bf16, fp16 or off, got {setting!r}")
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        # emulated bf16 (T4, P100, V100) is slow: only GPUs with native bf16 get it
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def seed_everything(*keys: int) -> None:
    """Seed python, numpy and torch from a tuple of ints (seed, fold, epoch, rank)."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- the runtime --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """What the loops read besides the model: scoring batch, loader workers, memory format, progress bars,
    what to do with an undecodable crop, and flip TTA. The defaults are the CNN config's."""

    eval_batch_size: int = 256
    num_workers: int = 2
    channels_last: bool = True  # NHWC model and batches: faster on CUDA and on CPU (oneDNN) alike
    progress: bool = True
    skip_corrupt: bool = False  # True: log and skip undecodable crops (scored NaN); False: stop naming the id
    tta_hflip: bool = True  # average the logits of the image and its mirror when scoring
    tta_dihedral: bool = False  # also each view's 3 rotations by 90 degrees: all 8 symmetries of the square
    # cached: a frozen gate's mask is made once per crop and turned with each TTA view (`model_logits`)
    gate_masks: str = "online"

    @classmethod
    def pick(cls, source: Mapping[str, Any] | Any, **overrides: Any) -> RunSettings:
        """The settings found in `source` (a config object or a plain dict, e.g. a saved config.yaml),
        defaults for the rest, then `overrides` (None leaves a value as it is)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(source, Mapping):
            found = {n: source[n] for n in names if n in source}
        else:
            found = {n: getattr(source, n) for n in names if hasattr(source, n)}
        found.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**found)


@dataclass
class Runtime:
    """What a loop needs besides the model and the data: settings, device, precision, process group."""

    settings: RunSettings
    device: torch.device
    dtype: torch.dtype | None
    ctx: DistContext = DistContext()

    @classmethod
    def create(cls, settings: RunSettings, device: str = "auto", amp: str = "auto",
               ctx: DistContext = DistContext()) -> Runtime:
        """Resolve `device` ('auto', 'cpu', 'cuda', 'cuda:1', ...) and the autocast dtype of `amp` on it."""
        dev = resolve_device(device, ctx)
        return cls(settings, dev, amp_dtype(amp, dev), ctx)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch on the host -> float on the device, in [0, 1]."""
        images = to_float(images.to(self.device, non_blocking=True))
        return images

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise and set the memory format the model runs fastest in."""
        images = normalize(images)
        if self.settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def place(self, model: nn.Module) -> nn.Module:
        """`model` on the device, in the memory format of `finish`."""
        model = model.to(self.device)
        if self.settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def all_ranks(self, flag: bool) -> bool:
        """True when `flag` holds on every rank. Under DDP a step is all or nothing: a rank that skipped one
        (a batch left with < 2 crops after skipping corrupt ones) would leave the others waiting forever
        in the gradient all-reduce."""
        if not self.ctx.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device)  # nccl: on the GPU
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        return bool(t.item())

    def bar(self, iterable: Any, desc: str, **kwargs: Any) -> Any:
        """A progress bar over `iterable`, on the main rank when the settings ask for one."""
        return tqdm(iterable, desc=desc, leave=False, disable=not (self.settings.progress and self.ctx.is_main),
                    **kwargs)


def adamw(params: Any, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass over each parameter instead of several elementwise ones. On
    one CPU core it took the demo CNN's update from 36 to 9 ms, of a 152-ms step (benchmarks/bench_train_step.py)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def load_optimiser_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`opt.load_state_dict(state)`, keeping `opt`'s fused kernel. A checkpoint written before AdamW was fused
    (or before channels_last applied on CPU) carries `fused` unset, which loading would restore (and fp16's
    GradScaler then fails in the unfused update), and its moments in the parameters' old memory layout, which
    the fused kernel, walking raw memory, would read wrongly. So: the flag back on, each moment laid out like
    its parameter, `step` a float32 tensor on the parameter's device (what the fused kernel keeps)."""
    opt.load_state_dict(state)
    if not opt.defaults.get("fused"):
        return
    for group in opt.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key == "step":
                    opt.state[p][key] = torch.as_tensor(value, dtype=torch.float32).to(p.device)
                elif torch.is_tensor(value) and value.shape == p.shape:
                    opt.state[p][key] = torch.empty_like(p).copy_(value)


def make_loader(dataset: Dataset, rt: Runtime, *, sampler: Any, batch_size: int,
                drop_last: bool = False) -> DataLoader:
    workers = rt.settings.num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skip, pin_memory=rt.device.type == "cuda", drop_last=drop_last,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


# ---- scoring ------------------------------------------------------------------------------------------


def model_logits(model: nn.Module, x: torch.Tensor, rt: Runtime, tta: bool, dihedral: bool = False,
                 one_mask: bool = False) -> torch.Tensor:
    """float32 logits (B,) of a prepared batch; with `tta` the mean over the image and its mirror, with
    `dihedral` also over their rotations by 90, 180 and 270 degrees (a lesion has no up or left).

    `one_mask` (a frozen gate with `gate_masks: cached`): the segmenter runs once, on `x`, and each view
    gets that mask mirrored and turned with it, as training augments a mask made once with its crop."""
    views = _views(x, tta, dihedral)
    with rt.autocast():
        mask = model.mask(x) if one_mask else None
        # a plain network (diagnosis, students) takes no mask argument
        masks = [{}] * len(views) if mask is None else [{"mask": m} for m in _views(mask, tta, dihedral)]
        logits = model(views[0], **masks[0]).float()
        for view, kwargs in zip(views[1:], masks[1:], strict=True):
            logits = logits + model(view, **kwargs).float()
    return logits / len(views)


def _views(x: torch.Tensor, tta: bool, dihedral: bool) -> list[torch.Tensor]:
    views = [x, torch.flip(x, dims=[3])] if tta else [x]
    return [torch.rot90(v, turns, dims=(2, 3)) for v in views for turns in range(4)] if dihedral else views


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: CropDataset, rt: Runtime, indices: Sequence[int] | None = None,
                   desc: str = "score", tta: bool | None = None) -> np.ndarray:
    """Logits for `indices` of `dataset` (all by default) as an array over the whole dataset (NaN elsewhere).

    `tta` (default: the settings' `tta_hflip` and `tta_dihedral`) averages the logits of each image and its
    mirror; an explicit `tta` never adds the rotations (per-epoch validation passes False).
    Under DDP each rank scores a strided shard and the shards are gathered, so every rank returns the
    same array. Skipped corrupt crops stay NaN.
    """
    model.eval()
    tta, dihedral = (rt.settings.tta_hflip, rt.settings.tta_dihedral) if tta is None else (tta, False)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    mine = shard(indices, rt.ctx.rank, rt.ctx.world_size, pad=False)
    loader = make_loader(dataset, rt, sampler=mine, batch_size=rt.settings.eval_batch_size)
    found_idx, found_logit = [], []
    for batch in rt.bar(loader, desc):
        check_corrupt(batch, dataset, rt.settings.skip_corrupt)
        if len(batch.index) == 0:
            continue
        logits = model_logits(model, rt.finish(rt.prepare(batch.images)), rt, tta, dihedral,
                              rt.settings.gate_masks == "cached")
        found_idx.append(batch.index.numpy())
        found_logit.append(logits.cpu().numpy())
    return gather_rows(found_idx, found_logit, len(dataset), rt.ctx)


def gather_rows(found_idx: list[np.ndarray], found_values: list[np.ndarray], n: int,
                ctx: DistContext) -> np.ndarray:
    """One float64 array of `n` rows from this rank's (indices, values) batches and, under DDP, every
    other rank's (each rank gets the same array); rows nobody scored stay NaN."""
    pairs = (np.concatenate(found_idx) if found_idx else np.empty(0, np.int64),
             np.concatenate(found_values) if found_values else np.empty(0, np.float32))
    parts = [pairs]
    if ctx.active:
        parts = [None] * ctx.world_size  # type: ignore[list-item]
        torch_dist.all_gather_object(parts, pairs)
    out = np.full(n, np.nan, dtype=np.float64)
    for idx, values in parts:
        out[idx] = values
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """A model's state dict as safetensors, atomically: portable (no pickle), loadable by any torch."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.fspath(tmp))


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from a torch state dict of an older release (weights_only)."""
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(os.fspath(path))
    return torch.load(path, map_location="cpu", weights_only=True)
