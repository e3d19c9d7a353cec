#!/usr/bin/env bash
# Diffusion on the same engine, end to end on CPU (no download, no GPU):
#   prep builtin:digits (scikit-learn's 8x8 digits) -> train a class-conditional DiT on 2 ranks
#   with ZeRO-2 -> sample a grid per class with guidance -> score the samples with a classifier
#   trained on the real digits. TensorBoard (loss curves, EMA sample grids) lands in runs/digits/tb.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data/digits
RUN=runs/digits
STEPS=${STEPS:-800}

echo "== 1/4 megalm prep builtin:digits -> $DATA"
$BIN/megalm prep builtin:digits -o "$DATA" --overwrite

echo "== 2/4 megalm train: dit-tiny (flow matching), 2 CPU ranks, ZeRO-2, $STEPS steps"
rm -rf "$RUN"
$BIN/megalm launch --nproc 2 -- $BIN/megalm train configs/diffusion-digits.yaml "data.paths=[$DATA]" \
    "train.steps=$STEPS" "diffusion.grid_interval=200" --resume none

echo "== 3/4 megalm sample: one row per class, guidance 3 -> $RUN/grid.png"
$BIN/megalm sample "$RUN/checkpoints" --guidance 3 --steps 12 --out "$RUN/grid.png"

echo "== 4/4 share of samples a digit classifier (trained on the real train split) reads as the class asked for"
$BIN/python - "$RUN/checkpoints" "$DATA" <<'PY'
import sys, torch
from megalm.diffusion.data import load_image_manifest, read_split, to_model_range
from megalm.diffusion.quality import accuracy, train_classifier
from megalm.diffusion.sample import from_checkpoint, generate
model, objective = from_checkpoint(sys.argv[1])
m = load_image_manifest(sys.argv[2])
(tx, ty), (vx, vy) = read_split(m, "train"), read_split(m, "valid")
clf = train_classifier(to_model_range(tx), ty, m.num_classes)
print(f"classifier accuracy on held-out real digits: {accuracy(clf, to_model_range(vx), vy):.3f}")
want = torch.arange(m.num_classes).repeat_interleave(20)
for w in (1.0, 3.0):
    imgs = generate(model, objective, m.num_classes, 20, steps=12, guidance=w, seed=1)
    print(f"guidance {w}: {accuracy(clf, imgs, want):.3f} of 200 samples classified as asked")
PY
echo "grid: $RUN/grid.png   TensorBoard: $BIN/tensorboard --logdir $RUN/tb"
