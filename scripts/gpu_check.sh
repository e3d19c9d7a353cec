#!/usr/bin/env bash
# One lent-GPU session's checks (issue 19), most valuable first, each under its own timeout so a
# slow step still leaves the earlier results; everything lands in $OUT (at most 8 files come back
# from the device tool). Carry .whl/ (`make gpu-wheels` on a machine with a package index).
#
#   OUT=/path bash scripts/gpu_check.sh        # ~9 minutes on an H100/H200
#
#   1. build the ops for this GPU and self-test every kernel (the document attention's first run)
#   2. gpu_tests: every self-test case as a test, real shapes, the model on the attention kernel
#   3. benchmarks/attention.py: document-masked attention candidates vs causal flash
#   4. benchmarks/ops.py: each fused op vs torch's own and torch.compile, % of copy bandwidth
#   5. benchmarks/train_gpu.py: megalm train vs the nanoGPT-style loop, ZeRO 0-3, recipe, 1B
# summary.txt: each step's exit status and seconds (124: its timeout).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU')" || exit 2
SITE="$PWD/.whl/site"
export PYTHONPATH="$PWD:$SITE"
export MEGALM_OPS_CACHE="${MEGALM_OPS_CACHE:-/tmp/megalm-ops}"  # not under $OUT: only results go back
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("{}.{}".format(*torch.cuda.get_device_capability()))')}"
export MAX_JOBS="${MAX_JOBS:-16}"
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME TIMEOUT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$summary"
}

if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl \
    || { echo "no DeepSpeed wheels under .whl/ (make gpu-wheels)" | tee -a "$summary"; exit 2; }
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
  date -u +%FT%TZ; } >> "$summary" 2>&1

step build+selftest 150 "$OUT/selftest.log" python3 -m megalm.ops.build --strict
# The verdicts the build recorded (per kernel: ok, detail), next to the build in the cache.
find "$MEGALM_OPS_CACHE" -path '*selftest/*.json' -exec cp {} "$OUT/selftest.json" \; 2>/dev/null
step gpu_tests 150 "$OUT/gpu_tests.log" python3 -m pytest -q -p no:cacheprovider gpu_tests
step attention 120 "$OUT/bench.log" python3 benchmarks/attention.py --out "$OUT/attention_gpu.json"
step ops 120 "$OUT/bench.log" python3 benchmarks/ops.py --out "$OUT/ops.json"
step train_gpu 330 "$OUT/bench.log" python3 benchmarks/train_gpu.py --out "$OUT/train_gpu.json"
cat "$summary"
