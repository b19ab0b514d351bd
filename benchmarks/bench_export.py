"""Latency, size and pAUC of an exported student: torch fp32, ONNX fp32 and ONNX int8, as people report them.

    .venv/bin/python benchmarks/bench_export.py EXPORT_DIR --artifacts ARTIFACTS [--runs 200] [--json out.json]

EXPORT_DIR is the output of `lesionstack export -a ARTIFACTS --out EXPORT_DIR --int8`. For each model and each
thread count (1 and 4 by default): batch 1 at the student's input size, `--warmup` untimed runs, then
`--runs` timed runs on real validation crops; p50 and p90 latency in milliseconds. Also the model file size
and the pAUC on the exported fold's validation crops (from export.json; no TTA). Runs interleave the three
models run by run, so load from other processes hits all of them alike; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", type=Path)
    p.add_argument("--artifacts", type=Path, required=True, help="the artifacts root the student was exported from")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args()


def runners(export_dir: Path, artifacts: Path, threads: int) -> dict[str, Any]:
    """name -> callable(x) running one batch, each on `threads` threads."""
    import torch

    from lesionstack.inference.export import FP32_FILE, INT8_FILE, session
    from lesionstack.trained.loaders import load_student

    report = json.loads((export_dir / "export.json").read_text())
    torch.set_num_threads(threads)
    net, _ = load_student(artifacts / "distill" / report["student"] / f"fold_{report['fold']}")

    def run_torch(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return net(torch.from_numpy(x))

    out = {"torch fp32": run_torch}
    for name, file in (("onnx fp32", FP32_FILE), ("onnx int8", INT8_FILE)):
        if (export_dir / file).is_file():
            sess = session(export_dir / file, threads)
            out[name] = lambda x, s=sess: s.run(["logit"], {"image": x})
    return out


def time_models(models: dict[str, Any], inputs: list[np.ndarray], runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per batch-1 call, models interleaved call by call."""
    for i in range(warmup):
        for run in models.values():
            run(inputs[i % len(inputs)])
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(runs):
        x = inputs[i % len(inputs)]
        for name, run in models.items():
            start = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    args = parse_args()
    from lesionstack.data.dataset import CropDataset
    from lesionstack.folds import read_folds
    from lesionstack.inference.export import FP32_FILE, INT8_FILE, load_crops, preprocess

    report = json.loads((args.export_dir / "export.json").read_text())
    spec = json.loads((args.export_dir / "preprocess.json").read_text())
    folds = read_folds(args.artifacts / "folds.csv")
    data = Path(json.loads((args.artifacts / "source.json").read_text())["data_dir"])
    val = folds[folds["fold"] == report["fold"]]
    ds = CropDataset(data / "train-image.hdf5", val["isic_id"][:50], None, report["image_size"])
    inputs = [x[None] for x in preprocess(load_crops(ds, range(len(ds))), spec)]
    sizes = {"torch fp32": None, "onnx fp32": report["fp32"]["bytes"], "onnx int8": report.get("int8", {}).get("bytes")}
    paucs = {"torch fp32": report["torch"]["pauc"], "onnx fp32": report["fp32"]["pauc"],
             "onnx int8": report.get("int8", {}).get("pauc")}
    rows = []
    load_before = os.getloadavg()
    for threads in args.threads:
        times = time_models(runners(args.export_dir, args.artifacts, threads), inputs, args.runs, args.warmup)
        for name, t in times.items():
            rows.append({"model": name, "threads": threads, "p50_ms": float(np.percentile(t, 50)),
                         "p90_ms": float(np.percentile(t, 90)), "bytes": sizes[name], "pauc": paucs[name]})
    result = {"student": report["student"], "fold": report["fold"], "classifier": report["classifier"],
              "image_size": report["image_size"], "batch": 1, "runs": args.runs, "warmup": args.warmup,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows,
              "files": {"fp32": FP32_FILE, "int8": INT8_FILE}}
    print(f"{report['student']} fold {report['fold']}: {report['classifier']} at {report['image_size']} px, batch 1, "
          f"{args.runs} runs after {args.warmup} warm-up; load average {load_before[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f}")
    print("| model | threads | p50 ms | p90 ms | size MB | pAUC (fold val, no TTA) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        print(f"| {r['model']} | {r['threads']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {size} | {r['pauc']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
