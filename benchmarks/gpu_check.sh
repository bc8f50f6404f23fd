#!/usr/bin/env bash
# GPU checks, as one prepared script for the device machine (keep the whole run under 5 minutes):
#   bash benchmarks/gpu_check.sh [OUTDIR]
# Each section writes its results under OUTDIR (default $OUT, else /tmp/gpu-check).
set -uo pipefail
OUTDIR=${1:-${OUT:-/tmp/gpu-check}}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch has no CUDA here; nothing to check" | tee "$OUTDIR/gpu_check.txt"
  exit 0
fi
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUTDIR/device.txt"

# --- merge: adaptkit --device cuda vs mergekit --cuda (same run), then the CUDA merge tests -------------
timeout 240 "$PY" benchmarks/merge_vs_mergekit.py --device cuda --json "$OUTDIR/merge_cuda.json" \
  2>&1 | tee "$OUTDIR/merge_cuda.txt"
timeout 60 "$PY" -m pytest tests/merge/test_engine_cuda.py -q -m gpu 2>&1 | tail -5 | tee "$OUTDIR/merge_cuda_tests.txt"

# --- quantize: gptq seconds per layer on a ~1B-parameter Llama layer shape (4 layers), then the CUDA tests -
timeout 200 "$PY" benchmarks/gptq_cuda_timing.py --device cuda --layers 4 --json "$OUTDIR/gptq_cuda.json" \
  2>&1 | tail -3 | tee "$OUTDIR/gptq_cuda.txt"

echo "== summary =="
cat "$OUTDIR/device.txt"
tail -8 "$OUTDIR/merge_cuda.txt" 2>/dev/null
tail -1 "$OUTDIR/merge_cuda_tests.txt" 2>/dev/null
tail -1 "$OUTDIR/gptq_cuda.txt" 2>/dev/null
