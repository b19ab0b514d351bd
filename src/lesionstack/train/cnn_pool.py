"""The CPU process pool of `train-cnn` (`fold_workers` > 1): each fold (or seed-ensemble member) trains in a
fresh spawned process with its own torch threads, and stops when the run that started it is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lesionstack.data.hdf5 import H5Images
from lesionstack.metrics import MetricError
from lesionstack.paths import FoldFiles
from lesionstack.runtime import DistContext, RunSettings, Runtime
from lesionstack.train.cnn_config import CNNConfig
from lesionstack.train.cnn_fold import train_fold


def _fold_or_name_it(fold: int, folds_path: Path, train: Callable[..., dict[str, Any]], *args: Any,
                     **kwargs: Any) -> dict[str, Any]:
    try:
        return train(*args, **kwargs)
    except MetricError as err:  # e.g. skipped corrupt crops took a class out of the validation set
        raise MetricError(f"fold {fold} of {folds_path}: {err}") from err


def pool_workers(cfg: CNNConfig, rt: Runtime, jobs: int) -> int:
    """How many fold processes run `jobs` jobs: `fold_workers` (at most one a job) on a CPU run in one process;
    0 for one after the other in this process (a GPU, torchrun, one worker)."""
    workers = min(cfg.fold_workers, jobs)
    return 0 if workers <= 1 or rt.ctx.active or rt.device.type != "cpu" else workers


def fold_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` fresh spawned processes that stop when this one is gone (`_exit_with_parent`)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
                               initargs=(os.getpid(),))


def run_in_pool(jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]], workers: int, threads: int) -> list[Any]:
    """Each job `(function, arguments)` in a fold process with `threads` torch threads; their results in order."""
    with fold_pool(workers) as pool:
        futures = [pool.submit(_in_process, threads, fn, *args) for fn, args in jobs]
        return [f.result() for f in futures]


def _in_process(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """In a fresh (spawned) process: its own torch threads, logging to stderr as the CLI's does."""
    package_log = logging.getLogger("lesionstack")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    torch.set_num_threads(threads)
    return fn(*args)


def _train_fold_in_process(fold: int, folds: pd.DataFrame, images: Path, cfg: CNNConfig, files: FoldFiles,
                           inputs: dict[str, str]) -> dict[str, Any]:
    """One fold in a fold process (`_in_process` set its threads and logging)."""
    # no per-batch bars: two processes' bars would overwrite each other; each epoch logs a line instead
    rt = Runtime(RunSettings.pick(cfg, progress=False), torch.device("cpu"), None, DistContext())
    return train_fold(fold, folds, H5Images(images), cfg, files, rt, inputs=inputs)


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """A fold process's initializer: stop when `parent`, the run that started it, is gone (killed, not
    interrupted). An orphan would go on writing the fold's checkpoint while a resumed run trains the same
    fold, or wait for work forever."""
    if os.getppid() != parent:  # it died while this process was starting
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
