# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_profile.sh with SCRIPT (its name) and
# TASK (what it would do) set: from the repository root, sets PY and DEST ($OUT, the device tool's
# folder, or docs/results/benchmarks/gpu), exits 1 when PY cannot import torch and 0 when there is no CUDA
# device, and runs torchgrain from the source tree when it is not installed (a bare machine with
# torch, transformers, peft and pytest).
PY=${PYTHON:-python3}
DEST=${OUT:-docs/results/benchmarks/gpu}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "$SCRIPT: $PY cannot import torch; set PYTHON to an interpreter that can" >&2
  exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "$SCRIPT: no CUDA device here (torch.cuda.is_available() is False): nothing to $TASK"
  exit 0
fi
mkdir -p "$DEST"
"$PY" -c 'import torchgrain' 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
