"""The runtime shared by training and inference: settings picked from any config, devices and precision,
and the all-or-none step agreement of DistributedDataParallel ranks (two gloo processes on CPU)."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lesionstack.config import ConfigError
from lesionstack.runtime import (
    DistContext,
    RunSettings,
    Runtime,
    adamw,
    amp_dtype,
    gather_rows,
    load_optimiser_state,
    model_logits,
    resolve_device,
)
from lesionstack.train.cnn_config import CNNConfig


def test_run_settings_default_to_the_cnn_configs_values() -> None:
    """A fold config saved before a key existed ran with CNNConfig's default; prediction must assume it."""
    cnn = CNNConfig()
    for f in dataclasses.fields(RunSettings):
        assert getattr(RunSettings(), f.name) == getattr(cnn, f.name), f.name


def test_run_settings_are_picked_from_a_config_object_or_a_plain_dict() -> None:
    cfg = dataclasses.replace(CNNConfig(), eval_batch_size=7, tta_hflip=False, skip_corrupt=True)
    assert RunSettings.pick(cfg) == RunSettings(eval_batch_size=7, tta_hflip=False, skip_corrupt=True)
    saved = {"eval_batch_size": 9, "model": {"gate": "none"}, "lr": 0.1}  # other keys are not its business
    assert RunSettings.pick(saved, progress=False, num_workers=None) == RunSettings(eval_batch_size=9, progress=False)


def test_tta_averages_the_mirror_and_with_dihedral_all_8_symmetries_of_the_square() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    x = torch.randn(5, 3, 8, 8)
    rt = Runtime.create(RunSettings(), device="cpu")
    with torch.no_grad():
        model(x)
        views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, torch.flip(x, dims=[3])) for k in range(4)]
        each = [model(v).float() for v in views]
        torch.testing.assert_close(model_logits(model, x, rt, tta=False), each[0])
        torch.testing.assert_close(model_logits(model, x, rt, tta=True), (each[0] + each[4]) / 2)
        torch.testing.assert_close(model_logits(model, x, rt, tta=True, dihedral=True), torch.stack(each).mean(0))
        assert not torch.allclose(each[1], each[0])  # the views differ: the mean is not a tautology


def test_device_and_precision_on_cpu() -> None:
    rt = Runtime.create(RunSettings(), device="cpu", amp="auto")
    assert rt.device == torch.device("cpu") and rt.dtype is None and not rt.ctx.active
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert amp_dtype("off", torch.device("cuda")) is None
    assert amp_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ConfigError, match="amp: expected"):
        amp_dtype("fp8", torch.device("cpu"))


def test_channels_last_applies_on_cpu_and_scores_the_same_as_contiguous() -> None:
    """channels_last is a speed setting (docs/experiments, "Faster steps on CPU"): on CPU too it puts the model and
    the batches in NHWC, and the logits match the contiguous layout's to float rounding."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1)).eval()
    x = torch.rand(4, 3, 16, 16)
    logits = {}
    for fmt in (True, False):
        rt = Runtime.create(RunSettings(channels_last=fmt), device="cpu", amp="off")
        model, batch = rt.place(copy.deepcopy(net)), rt.finish(x)
        layout = torch.channels_last if fmt else torch.contiguous_format
        assert batch.is_contiguous(memory_format=layout)
        assert model[0].weight.is_contiguous(memory_format=layout)
        with torch.no_grad():
            logits[fmt] = model(batch)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_adamw_is_fused_and_steps_like_the_default_kernel() -> None:
    """The fused kernel is the same AdamW: a few steps land where the default kernel's do, to rounding."""
    torch.manual_seed(0)
    start = [torch.randn(40, 30), torch.randn(30)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    ends = []
    for make in (lambda ps: adamw(ps, 1e-2, 0.01), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01)):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        ends.append([p.detach() for p in params])
    assert adamw([torch.zeros(2, requires_grad=True)], 1e-3, 0.0).defaults["fused"] is True
    for first, fused, plain in zip(start, *ends):
        assert not torch.allclose(fused, first)  # the steps moved it
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_before_fused_adamw_resumes_fused_and_steps_as_it_would_have() -> None:
    """An optimiser state saved by the old path (NCHW model, AdamW's default kernel) loads into the fused
    optimiser of a channels_last model: it stays fused (an fp16 GradScaler step works), and the next steps
    land where the old path's would have, to rounding."""
    torch.manual_seed(0)
    old_net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 1))
    x = torch.rand(5, 3, 8, 8)

    def loss_of(net: torch.nn.Module) -> torch.Tensor:
        return net(x if next(net.parameters()).is_contiguous() else x.contiguous(
            memory_format=torch.channels_last)).square().mean()

    old_opt = torch.optim.AdamW(old_net.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(2):
        old_opt.zero_grad()
        loss_of(old_net).backward()
        old_opt.step()
    buffer = io.BytesIO()
    torch.save({"model": old_net.state_dict(), "optimizer": old_opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=False)

    rt = Runtime.create(RunSettings(channels_last=True), device="cpu", amp="off")
    new_net = rt.place(copy.deepcopy(old_net))
    new_net.load_state_dict(ckpt["model"])
    new_opt = adamw(new_net.parameters(), 1e-2, 0.01)
    load_optimiser_state(new_opt, ckpt["optimizer"])
    assert all(g["fused"] for g in new_opt.param_groups)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # fp16's path: the unfused update would refuse it
    for _ in range(2):
        old_opt.zero_grad()
        loss_of(old_net).backward()
        old_opt.step()
        new_opt.zero_grad()
        scaler.scale(loss_of(new_net)).backward()
        scaler.step(new_opt)
        scaler.update()
    for old, new in zip(old_net.parameters(), new_net.parameters()):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)


def test_gather_rows_leaves_unscored_rows_nan() -> None:
    out = gather_rows([np.array([3, 0])], [np.array([0.5, 0.25], np.float32)], 4, DistContext())
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [0.25, np.nan, np.nan, 0.5])


ALL_RANKS_WORKER = """
import os, torch
from lesionstack.runtime import RunSettings, Runtime, init_distributed
ctx = init_distributed("cpu")
rt = Runtime(RunSettings(), torch.device("cpu"), None, ctx)
answers = f"{rt.all_ranks(ctx.rank == 0)} {rt.all_ranks(True)}"
open(os.path.join(os.path.dirname(__file__), f"rank{ctx.rank}.txt"), "w").write(answers)  # stdout interleaves
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit ("terminate called ...")
"""


def test_a_step_is_taken_by_all_ranks_or_none(tmp_path: Path) -> None:
    """A rank whose batch is unusable makes every rank skip that step (else the others hang in backward)."""
    script = tmp_path / "worker.py"
    script.write_text(ALL_RANKS_WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False True", "False True"]
