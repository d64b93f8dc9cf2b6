#!/usr/bin/env bash
# GPU readiness in one prepared run (about 8 minutes at most on one CUDA GPU):
#   1. the CUDA-marked tests (tests/test_cuda.py): the fused engine against the loop engine in
#      float64, the device against the CPU, the masked solvers against the host solvers,
#      bfloat16 autocast, the ghost Gram; and tests/test_nccl.py: the exchange on NCCL
#      (replicated, FSDP2 in both memory modes), one rank per GPU, the world size in the test id;
#   2. the step benchmark on CUDA (plain, keep, book-keeping; TorchJD when installed, at the
#      MiniLM size) at the MiniLM size and at SmolLM2-135M's size, with LoRA too.
# Logs and tables go to $OUT (the device tool's folder) or docs/results/benchmarks/gpu. Without CUDA it says
# so and exits 0. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT=gpu_check TASK=check
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh

"$PY" -c '
import torch
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
' | tee "$DEST/device.txt"

status=0
step() {  # name, seconds, step.py options...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$PY" benchmarks/step.py --device cuda --threads 4 --csv "$DEST/step_$name.csv" "$@" \
    2>&1 | tee "$DEST/step_$name.txt" || status=1
}
timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rA tests/test_cuda.py \
  tests/test_nccl.py 2>&1 | tee "$DEST/tests.txt" || status=1
step minilm 130 --model minilm --batch 32 --tokens 128 --groups 8 16 --steps 10 \
  --only plain grain-fused-keep grain-fused-bookkeeping torchjd-groups
# No TorchJD here: its autogram engine refuses the Llama model ("Some modules had a forward
# pass without an associated backward pass"), seen on the CPU with torchjd 0.18.
step smollm2 170 --model smollm2 --autocast --batch 16 --tokens 256 --groups 8 --steps 5 \
  --only plain grain-fused-keep grain-fused-bookkeeping plain+lora grain-fused-keep+lora
echo "gpu_check: done (status $status); logs and tables in $DEST"
exit $status
