"""How much of the demo's image cue the pixels show, at each CNN input size (docs/experiments/2026-11-23-cnn-recipe.md).

The demo's label depends on a hidden image cue drawn as a blue-grey veil inside the lesion; `demo-data`
prints the pAUC of the cue itself ("image cue alone"). A faint veil can vanish in the lesion's own colour
blotches, the JPEG and the downscaling, so the cue's pAUC is a ceiling no image model has to be able to
reach. This script measures a plain colour reading that is told the true lesion mask: the blueness
((B - R) / (R + G + B)) of the lesion's bluest 5% over its median blueness, on the stored JPEG crop at full
size and resized (bilinear, as the CNN's loader does) to each size. It is a yardstick for what the image
shows at a size, not a model (it knows the true mask and what the cue looks like).

    python benchmarks/bench_demo_cue.py --seed 0                 # the default demo (writes it to a temp dir)
    python benchmarks/bench_demo_cue.py --data demo/data --seed 0  # an existing demo folder of that seed

The lesion masks are re-rendered from the generator's per-row streams (`lesion_stream`); the script checks
that the re-rendered crops match the stored JPEGs before it trusts them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from lesionstack.data.dataset import resize_mask, resize_square
from lesionstack.data.demo_images import lesion_stream, render_lesion
from lesionstack.data.demo_tables import make_tables
from lesionstack.data.hdf5 import H5Images
from lesionstack.data.synthetic import DemoSpec, write_demo_data
from lesionstack.metrics import pauc

SIZES = (64, 48, 40, 32)


def spot_blueness(image: np.ndarray, mask: np.ndarray) -> float:
    """Blueness of the lesion's bluest 5% over its median (0 for a lesion of under 3 pixels)."""
    x = image.astype(np.float32)
    blue = ((x[..., 2] - x[..., 0]) / (x.sum(-1) + 1.0))[mask]
    return float(np.quantile(blue, 0.95) - np.median(blue)) if blue.size >= 3 else 0.0


def measure(data: Path, spec: DemoSpec) -> dict[str, float]:
    tables = make_tables(spec)
    images = H5Images(data / "train-image.hdf5")
    render = tables.render_train.reset_index(drop=True)
    readings: dict[str, list[float]] = {"full": [], **{f"{s} px": [] for s in SIZES}}
    worst = 0.0
    for i, isic_id in enumerate(tables.train["isic_id"]):
        drawn, mask = render_lesion(render.iloc[i].to_dict(), lesion_stream(spec.seed, i))
        stored = images.read(isic_id)
        worst = max(worst, float(np.abs(drawn.astype(np.float32) - stored).mean()))
        readings["full"].append(spot_blueness(stored, mask))
        for size in SIZES:
            readings[f"{size} px"].append(spot_blueness(resize_square(stored, size), resize_mask(mask, size)))
    if worst > 4.0:  # JPEG alone moves a crop by ~1 grey level on average
        raise SystemExit(f"{data}: the re-rendered crops differ from the stored ones (mean |diff| up to {worst:.1f}); "
                         f"is it the demo of --seed {spec.seed} and --patients {spec.patients}?")
    y = tables.train["target"].to_numpy()
    cue = tables.truth.set_index("isic_id").loc[tables.train["isic_id"], "image_cue"].to_numpy()
    return {"image cue (hidden)": pauc(y, cue), **{k: pauc(y, np.array(v)) for k, v in readings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=DemoSpec().patients)
    parser.add_argument("--data", type=Path, default=None, help="an existing demo folder of this seed")
    args = parser.parse_args()
    spec = DemoSpec(seed=args.seed, patients=args.patients)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "demo"
            write_demo_data(data, spec)
        result = measure(data, spec)
    print(f"demo seed {args.seed}, {args.patients} patients: pAUC of the lesion's spot blueness (true mask)")
    for name, value in result.items():
        print(f"  {name:>20}  {value:.4f}")


if __name__ == "__main__":
    main()
