#!/usr/bin/env bash
# The main job on the embedded corpus, end to end on CPU (no download, no GPU):
#   prep builtin:python-docs -> train the tiny model on 2 ranks with ZeRO-2 -> eval vs unigram
#   entropy -> checkpoint -> sample. TensorBoard logs land in runs/demo/tb.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data/demo/shards
RUN=runs/demo

echo "== 1/4 megalm prep: builtin:python-docs -> $DATA"
# Resumable: a re-run keeps the finished shards and only re-checks them.
$BIN/megalm prep builtin:python-docs -o "$DATA" --vocab-size 8000 --valid-fraction 0.01 --workers 2

echo "== 2/4 megalm train: tiny model, 2 CPU ranks, ZeRO-2 (a few minutes)"
# A fresh run each time; real runs use --resume auto (the default) to continue after a stop.
rm -rf "$RUN"
$BIN/megalm launch --nproc 2 -- $BIN/megalm train configs/demo.yaml "data.paths=[$DATA]" --resume none

echo "== 3/4 eval loss vs the unigram baseline (nats/token)"
$BIN/python - "$RUN/summary.json" "$DATA" <<'PY'
import json, sys
sys.path.insert(0, "scripts")
from unigram_entropy import unigram_cross_entropy, unigram_entropy
summary = json.load(open(sys.argv[1]))
loss = summary["eval_loss"]
h_train = unigram_entropy(sys.argv[2], "train")
h_valid = unigram_cross_entropy(sys.argv[2], "train", "valid")
print(f"unigram entropy of the corpus (train split)        {h_train:.3f}")
print(f"unigram model (fit on train) scored on valid split {h_valid:.3f}")
print(f"trained model's eval loss on the valid split       {loss:.3f}  ({h_valid - loss:.3f} nats better)")
if not loss < h_valid - 0.5:
    sys.exit("demo failed: the model did not learn beyond unigram statistics")
PY

echo "== 4/4 megalm sample from the last checkpoint"
$BIN/megalm sample "$RUN/checkpoints" --prompt "The list" --max-new-tokens 48 --temperature 0.7 --top-k 40
echo "TensorBoard: $BIN/tensorboard --logdir $RUN/tb"
