"""benchmarks/gpu_check.sh on a machine without CUDA (CI): every step runs on the CPU at a tiny size, the
CUDA, AMP, channels_last and DDP parts are named as skipped, and the img/s and projected-hours lines print."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lesionstack

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check (by hand: minutes)")
def test_gpu_check_runs_on_cpu_and_says_what_it_skipped(tmp_path):
    cli = shutil.which("lesionstack", path=str(Path(sys.executable).parent)) or shutil.which("lesionstack")
    assert cli, "the lesionstack command must be installed beside this Python"
    src = str(Path(lesionstack.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHON": sys.executable, "LESIONSTACK": cli, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "work")],
                            capture_output=True, text=True, env=env, timeout=1200)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "no CUDA device: skipped CUDA, AMP and channels_last" in out
    assert "skipped DDP with nccl under torchrun: 0 GPU(s), it needs 2" in out
    assert "train-cnn on" in out and "(cpu, amp None, 1 process(es)), folds [0]" in out
    rate = float(re.search(r"img/s on cpu: ([\d.]+)", out).group(1))
    hours = float(re.search(r"projected kernel hours for 511,000 crops: ([\d.]+) per fold model", out).group(1))
    assert rate > 0 and hours == pytest.approx(511_000 / rate / 3600, rel=0.05)
    assert (tmp_path / "work" / "art" / "cnn" / "fold_0" / "DONE").is_file()
