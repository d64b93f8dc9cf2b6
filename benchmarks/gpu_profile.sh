#!/usr/bin/env bash
# Where a GRAIN step's time goes on a CUDA GPU (at most about 7 minutes on one H100; the first
# run, at tighter limits, lost two cells): the step benchmark (plain, keep, book-keeping) at the
# MiniLM size and at SmolLM2-135M's size, then
# benchmarks/step_profile.py on the device at both sizes: kernel time by kind, device busy time,
# kernel launches and host syncs per step. Run after benchmarks/gpu_check.sh, on the same lease
# when it has time left. Logs go to $OUT (the device tool's folder) or docs/results/benchmarks/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT=gpu_profile TASK=profile
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
status=0
run() {  # name, seconds, script, options...
  local name=$1 limit=$2 script=$3
  shift 3
  timeout "$limit" "$PY" "benchmarks/$script" --device cuda --threads 4 "$@" 2>&1 \
    | tee "$DEST/$name.txt" || status=1
}
run step_minilm 110 step.py --csv "$DEST/step_minilm.csv" --model minilm --batch 32 \
  --tokens 128 --groups 8 16 --steps 10 --only plain grain-fused-keep grain-fused-bookkeeping
run step_smollm2 150 step.py --csv "$DEST/step_smollm2.csv" --model smollm2 --autocast \
  --batch 16 --tokens 256 --groups 8 --steps 5 \
  --only plain grain-fused-keep grain-fused-bookkeeping plain+lora grain-fused-keep+lora
run profile_minilm 60 step_profile.py --model minilm --batch 32 --tokens 128 --groups 8 \
  --steps 5 --top 15
run profile_smollm2 90 step_profile.py --model smollm2 --autocast --batch 16 --tokens 256 \
  --groups 8 --steps 3 --top 15
echo "gpu_profile: done (status $status); logs in $DEST"
exit $status
