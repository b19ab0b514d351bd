#!/usr/bin/env bash
# One call on a CUDA machine, within 8 minutes: does training and prediction use the GPU as configured, and
# how long would the Kaggle kernel take on the real hidden test set?
#
#     bash benchmarks/gpu_check.sh [WORK_DIR]        (default: a fresh temporary folder, removed at the end)
#
#   1. demo data (`lesionstack demo-data`), folds;
#   2. the demo CNN config (configs/cnn/demo.yaml) trained for one fold with CUDA, AMP and channels_last;
#   3. benchmarks/bench_predict.py on that fold: img/s of `Predictor.score_hdf5` (what the kernel runs) and
#      the projected kernel hours for 511,000 crops (140,770 public + 370,704 private test crops);
#   4. with two or more GPUs: the same fold trained once more under `torchrun --nproc_per_node 2` (DDP, nccl).
# Without CUDA (CI, this project's test suite) it runs every step on the CPU at a tiny size, says which
# CUDA parts it skipped, and prints the CPU's figures instead (a check that the script works, not a timing).
# Environment: PYTHON (default: python), LESIONSTACK (default: lesionstack), GPU_CHECK_BUDGET_S (480 s; 1800 s
# on the CPU, where the check is of this script, on a machine that may be shared).
set -euo pipefail

PYTHON=${PYTHON:-python}
LESIONSTACK=${LESIONSTACK:-lesionstack}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
TEST_CROPS=511000  # 140,770 public + 370,704 private
START=$(date +%s)
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg

if [ $# -ge 1 ]; then WORK=$1; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
step() { echo "== [$(( $(date +%s) - START ))s] $*"; }
failed() { echo "FAILED: $1 (exit $2; 124: it ran past the ${BUDGET_S}s budget)"; tail -20 "$3"; exit 1; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -gt 0 ]; then
  DEVICE=cuda
  "$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'CUDA: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
  PATIENTS=200; FOLDS=5; EPOCHS=""; SEEDS=""; CROPS=4096; AMP=auto; CHANNELS_LAST=true; ROUNDS=2
else
  DEVICE=cpu
  echo "no CUDA device: skipped CUDA, AMP and channels_last; skipped DDP with nccl under torchrun (needs 2 GPUs);"
  echo "running every step on the CPU at a tiny size (a check of this script, not a timing)"
  PATIENTS=8; FOLDS=2; EPOCHS=1; SEEDS=1; CROPS=64; AMP=off; CHANNELS_LAST=false; ROUNDS=1
  BUDGET_S=${GPU_CHECK_BUDGET_S:-1800}  # the 8-minute budget is the GPU's; a shared CPU may need longer
fi

step "demo data ($PATIENTS patients) and folds"
"$LESIONSTACK" demo-data "$WORK/data" --patients "$PATIENTS" --seed 0 --masks 0 >/dev/null 2>&1
"$LESIONSTACK" folds "$WORK/data" --out "$WORK/art/folds.csv" --n-folds "$FOLDS" >/dev/null

# The demo CNN config with CUDA's settings (and, on the CPU, one epoch of one seed); no segmenter weights
# (the gate's segmenter starts from its init: this checks the machine, not the model).
"$PYTHON" - "$REPO/configs/cnn/demo.yaml" "$WORK/cnn.yaml" "$AMP" "$CHANNELS_LAST" "$EPOCHS" "$SEEDS" <<'EOF'
import sys, yaml
src, dst, amp, channels_last, epochs, seeds = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg.update(amp=amp, channels_last=channels_last == "true", fold_workers=1, progress=False)
cfg["model"]["segmenter_weights"] = None
cfg["untrained_segmenter"] = "allow"  # the gate's segmenter trains from its init: this checks the machine
if epochs:
    cfg.update(epochs=int(epochs), seeds_per_fold=int(seeds), val_every=1, num_workers=0)
yaml.safe_dump(cfg, open(dst, "w"))
EOF

step "train the demo CNN config, fold 0, on $DEVICE (amp=$AMP, channels_last=$CHANNELS_LAST)"
T0=$(date +%s)
timeout "$(left)" "$LESIONSTACK" train-cnn "$WORK/data" --folds "$WORK/art/folds.csv" --config "$WORK/cnn.yaml" \
  --artifacts "$WORK/art" --folds-only 0 >"$WORK/train.log" 2>&1 || failed "train-cnn" $? "$WORK/train.log"
TRAIN_S=$(( $(date +%s) - T0 ))
grep -iE "device|amp|channels" "$WORK/train.log" | head -3 || true
echo "trained fold 0 in ${TRAIN_S}s"

step "bench_predict.py: $CROPS crops on $DEVICE"
timeout "$(left)" "$PYTHON" "$HERE/bench_predict.py" "$WORK/art" "$WORK/data/train-image.hdf5" --crops "$CROPS" \
  --rounds "$ROUNDS" --device "$DEVICE" --folds 0 --json "$WORK/predict.json" >"$WORK/predict.log" 2>&1 \
  || failed "bench_predict.py" $? "$WORK/predict.log"
"$PYTHON" - "$WORK/predict.json" "$TEST_CROPS" "$DEVICE" <<'EOF'
import json, sys
figures, crops, device = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
rate = figures["predictor_crops_per_s"]
print(f"img/s on {device}: {rate:.1f} (Predictor.score_hdf5: decode + resize + every fold model with flip TTA; "
      f"{len(figures['folds'])} fold model, {figures['image_size']} px, amp {figures['amp']})")
print(f"projected kernel hours for {crops:,} crops: {crops / rate / 3600:.2f} per fold model "
      f"({crops / rate / 3600 * 5:.2f} for 5 folds), CNN part only")
EOF

if [ "$GPUS" -ge 2 ]; then
  step "DDP: fold 0 again under torchrun --nproc_per_node 2 (nccl)"
  timeout "$(left)" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 "$(command -v "$LESIONSTACK")" \
    train-cnn "$WORK/data" --folds "$WORK/art/folds.csv" --config "$WORK/cnn.yaml" --artifacts "$WORK/ddp" \
    --folds-only 0 >"$WORK/ddp.log" 2>&1 || failed "DDP train-cnn" $? "$WORK/ddp.log"
  grep -iE "nccl|world|rank" "$WORK/ddp.log" | head -3 || true
  echo "DDP with nccl: trained fold 0 on 2 GPUs"
else
  echo "skipped DDP with nccl under torchrun: $GPUS GPU(s), it needs 2"
fi
step "done in $(( $(date +%s) - START ))s (budget ${BUDGET_S}s)"
