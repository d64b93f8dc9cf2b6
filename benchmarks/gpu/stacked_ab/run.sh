#!/usr/bin/env bash
# A/B on one CUDA machine, run from the repository root as .ab/run.sh: the tree at 28faf7a (new,
# the stacked Grams) against .ab/old/src (made by: git archive cb80fa4 src | tar -x -C .ab/old).
set -uo pipefail
cd "$(dirname "$0")/.."
D=${OUT:-/tmp/out}; mkdir -p "$D"
export PYTHONUNBUFFERED=1
NEW="$PWD/src:$PWD"; OLD="$PWD/.ab/old/src:$PWD"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$D/device.txt"
PYTHONPATH=$NEW python3 -c 'import torch, torchgrain; print(torch.__version__, torchgrain.__file__)' | tee -a "$D/device.txt"
PYTHONPATH=$NEW timeout 90 python3 -m pytest -q -p no:cacheprovider -rf -m cuda tests/test_cuda.py \
  -k "cuda and (fused_equals_loop or device_gives or bf16 or reads_nothing or ghost)" 2>&1 | tee "$D/tests.txt"
step() {  # tree, name, seconds, options
  local tree=$1 name=$2 limit=$3; shift 3
  local path=$NEW; [ "$tree" = old ] && path=$OLD
  PYTHONPATH=$path timeout "$limit" python3 benchmarks/step.py --device cuda --threads 4 "$@" 2>&1 \
    | grep -v "^|" | tee "$D/${name}_$tree.txt"
}
for tree in new old; do
  step $tree minilm 70 --model minilm --batch 32 --tokens 128 --groups 8 16 --steps 10 \
    --only plain grain-fused-keep grain-fused-bookkeeping
done
for tree in new old; do
  step $tree smollm2 80 --model smollm2 --autocast --batch 16 --tokens 256 --groups 8 --steps 5 \
    --only plain grain-fused-keep grain-fused-bookkeeping
done
PYTHONPATH=$NEW timeout 45 python3 benchmarks/step_profile.py --device cuda --threads 4 --model minilm \
  --batch 32 --tokens 128 --groups 8 --steps 5 --top 8 2>&1 | tee "$D/profile_minilm.txt"
echo "ab: done"
