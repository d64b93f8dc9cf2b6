#!/usr/bin/env bash
# An engine change against a base, on one CUDA machine and in one lease (about 5 minutes on an
# H100), so that the two are timed on the same card: this tree's CUDA engine tests, then the step
# benchmark (plain, keep, book-keeping) at MiniLM's size (m = 8, 16) and at SmolLM2-135M's size
# (bf16 autocast, m = 8) with this tree's torchgrain and with BASE's, then step_profile.py on this
# tree at MiniLM's size (kernel launches, device busy time). BASE is a folder holding the
# torchgrain package of the base; on the device tool, carry it:
#   mkdir -p .ab/base && git archive REV src | tar -x -C .ab/base   # .ab/ in .git/info/exclude
#   bash benchmarks/gpu_ab.sh .ab/base/src                          # carry: [".ab"]
# Logs go to $OUT (the device tool's folder) or docs/results/benchmarks/gpu/ab (7 files, *_new and *_base).
# Without CUDA it says so and exits 0. Log of its first form: docs/results/benchmarks/gpu/stacked_ab/.
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT=gpu_ab TASK=compare
BASE=${1:?usage: bash benchmarks/gpu_ab.sh BASE_SRC (a folder holding the base torchgrain package)}
if [ ! -f "$BASE/torchgrain/__init__.py" ]; then
  echo "gpu_ab: $BASE holds no torchgrain package (make it with git archive REV src)" >&2
  exit 2
fi
BASE=$(cd "$BASE" && pwd)
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
if [ -z "${OUT:-}" ]; then DEST=docs/results/benchmarks/gpu/ab && mkdir -p "$DEST"; fi
NEW="$PWD/src:$PWD" OLD="$BASE:$PWD"
status=0
"$PY" -c 'import torch; print(torch.cuda.get_device_name(0), torch.__version__)' | tee "$DEST/device.txt"
PYTHONPATH=$NEW timeout 90 "$PY" -m pytest -q -p no:cacheprovider -rf -m cuda tests/test_cuda.py \
  -k "fused_equals_loop or device_gives or bf16 or reads_nothing or ghost" 2>&1 \
  | tee "$DEST/tests.txt" || status=1
step() {  # tree (new or base), name, seconds, step.py options...
  local tree=$1 name=$2 limit=$3 path=$NEW
  shift 3
  [ "$tree" = base ] && path=$OLD
  PYTHONPATH=$path timeout "$limit" "$PY" benchmarks/step.py --device cuda --threads 4 \
    --csv "" "$@" 2>&1 | tee "$DEST/${name}_$tree.txt" || status=1
}
for tree in new base; do
  step $tree minilm 70 --model minilm --batch 32 --tokens 128 --groups 8 16 --steps 10 \
    --only plain grain-fused-keep grain-fused-bookkeeping
done
for tree in new base; do
  step $tree smollm2 80 --model smollm2 --autocast --batch 16 --tokens 256 --groups 8 --steps 5 \
    --only plain grain-fused-keep grain-fused-bookkeeping
done
PYTHONPATH=$NEW timeout 45 "$PY" benchmarks/step_profile.py --device cuda --threads 4 \
  --model minilm --batch 32 --tokens 128 --groups 8 --steps 5 --top 8 2>&1 \
  | tee "$DEST/profile_minilm.txt" || status=1
echo "gpu_ab: done (status $status); logs in $DEST"
exit $status
