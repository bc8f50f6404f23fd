#!/usr/bin/env bash
# GPU checks, as one prepared script for the device machine (worst case ~10 minutes: every step has a timeout):
#   bash benchmarks/gpu_check.sh [OUTDIR]
# Prints, for a ~1B-parameter Llama-shaped random model: GPTQ seconds per layer, TIES GB/s against the device's
# copy bandwidth, and CPU/GPU agreement (TIES bit for bit; GPTQ codes). Each section writes its results
# under OUTDIR (default $OUT, else /tmp/gpu-check).
# A CPU dry run of the in-memory sections: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh
set -uo pipefail
OUTDIR=${1:-${OUT:-/tmp/gpu-check}}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DEV=${GPU_CHECK_DEVICE:-cuda}

if [ "$DEV" = cuda ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch has no CUDA here; nothing to check" | tee "$OUTDIR/gpu_check.txt"
    exit 0
  fi
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUTDIR/device.txt"

  # --- merge: adaptkit --device cuda vs mergekit --cuda (same run), then the CUDA merge tests -----------
  timeout 150 "$PY" benchmarks/merge_vs_mergekit.py --device cuda --methods ties,dare_ties \
    --json "$OUTDIR/merge_cuda.json" 2>&1 | tee "$OUTDIR/merge_cuda.txt"
  timeout 60 "$PY" -m pytest tests/merge/test_engine_cuda.py -q -m gpu 2>&1 | tail -5 | tee "$OUTDIR/merge_cuda_tests.txt"

  # --- quantize: gptq seconds per layer on TinyLlama-1.1B's layer shape (3 layers, 128 x 512 tokens) ---------
  timeout 150 "$PY" benchmarks/gptq_cuda_timing.py --device cuda --layers 3 --json "$OUTDIR/gptq_cuda.json" \
    2>&1 | tail -3 | tee "$OUTDIR/gptq_cuda.txt"
else
  echo "dry run on $DEV" | tee "$OUTDIR/device.txt"
fi

# --- TIES throughput and CPU/GPU agreement on a ~1B-parameter Llama-shaped set of random tensors -----------
# GB/s = bytes of the three bf16 inputs (base + 2 models) read per second of the in-memory TIES kernel
# (adaptkit.merge.task_arithmetic.combine_task_vectors with the chunked top-k masks), against the device's
# copy bandwidth (torch copy_ of a 1 GiB tensor: read + write). Agreement: the same tensors merged on the CPU,
# compared bit for bit (the TIES arithmetic is elementwise in a fixed order; the selection is exact).
timeout 150 "$PY" - "$OUTDIR" <<'PY' 2>&1 | tee "$OUTDIR/ties_gpu.txt"
import json, os, sys, time
import torch
from adaptkit.merge.sparsify import magnitude_masker
from adaptkit.merge.task_arithmetic import combine_task_vectors

out_dir = sys.argv[1]
dev = os.environ.get("GPU_CHECK_DEVICE", "cuda")
small = os.environ.get("GPU_CHECK_SMALL") == "1"  # a CPU dry run of this script
hidden, inter, layers = (256, 704, 2) if small else (2048, 5632, 22)  # TinyLlama-1.1B's decoder shapes
shapes = []
for _ in range(layers):
    shapes += [(hidden, hidden), (hidden // 8, hidden), (hidden // 8, hidden), (hidden, hidden),
               (inter, hidden), (inter, hidden), (hidden, inter)]
gen = torch.Generator().manual_seed(0)

def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()

def ties(base, xs):
    masks = [magnitude_masker(x, base, 0.5) for x in xs]
    return combine_task_vectors(base, xs, [0.5, 0.5], masks=masks, consensus="sum", normalize=True)

nbytes = 0
secs = 0.0
agree = checked = 0
for k, shp in enumerate(shapes):
    base = torch.randn(shp, generator=gen).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(shp, generator=gen)).to(torch.bfloat16) for _ in range(2)]
    b_d, xs_d = base.to(dev), [x.to(dev) for x in xs]
    sync()
    t = time.perf_counter()
    merged = ties(b_d.float(), [x.float() for x in xs_d]).to(torch.bfloat16)
    sync()
    secs += time.perf_counter() - t
    nbytes += 3 * base.numel() * 2
    if k % 7 in (0, 4) and k < 14:  # q_proj and gate_proj of the first two layers on the CPU too
        ref = ties(base.float(), [x.float() for x in xs]).to(torch.bfloat16)
        checked += 1
        agree += int(torch.equal(ref, merged.cpu()))
n = 1 << 28  # 1 GiB of float32
a = torch.empty(n, device=dev)
b = torch.empty(n, device=dev)
b.copy_(a); sync()
t = time.perf_counter()
for _ in range(5):
    b.copy_(a)
sync()
copy_gbs = 5 * 2 * n * 4 / (time.perf_counter() - t) / 1e9
params = sum(r * c for r, c in shapes)
res = {"device": dev, "params": params, "ties_seconds": secs, "ties_input_gb_per_s": nbytes / secs / 1e9,
       "copy_gb_per_s": copy_gbs, "cpu_gpu_bit_identical": f"{agree}/{checked}"}
print(f"TIES on {dev}: {params / 1e9:.2f}B params in {secs:.2f}s = {res['ties_input_gb_per_s']:.1f} GB/s of bf16 "
      f"inputs; copy bandwidth {copy_gbs:.0f} GB/s (ratio {res['ties_input_gb_per_s'] / copy_gbs:.3f}); "
      f"CPU/GPU bit-identical on {agree}/{checked} tensors")
json.dump(res, open(os.path.join(out_dir, "ties_gpu.json"), "w"), indent=2)
PY

# --- GPTQ CPU vs GPU agreement on one ~1B-shaped layer's q/k/v (same Hessian, same weights) ---------------
timeout 90 "$PY" - "$OUTDIR" <<'PY' 2>&1 | tee "$OUTDIR/gptq_agree.txt"
import json, os, sys, time
import torch
from adaptkit.quantize.api import QuantSpec
from adaptkit_quant.gptq import gptq_quantize

out_dir = sys.argv[1]
dev = os.environ.get("GPU_CHECK_DEVICE", "cuda")
small = os.environ.get("GPU_CHECK_SMALL") == "1"
hidden, rows, tokens = (256, 384, 2048) if small else (2048, 3072, 16384)
gen = torch.Generator().manual_seed(0)
X = torch.randn(tokens, hidden, generator=gen) * torch.rand(hidden, generator=gen)
H = (X.T @ X).double() * (2.0 / tokens)
W = torch.randn(rows, hidden, generator=gen) * 0.02
spec = QuantSpec(bits=4, group_size=128, sym=True)
res = {}
for d in ("cpu", dev):
    if d.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    ql, _ = gptq_quantize(W.to(d), H.to(d), spec, group_aware=True)
    if d.startswith("cuda"):
        torch.cuda.synchronize()
    res[d] = (ql, time.perf_counter() - t)
a, b = res["cpu"][0], res[dev][0]
same = (a.codes == b.codes).float().mean().item()
out = {"rows": rows, "columns": hidden, "cpu_s": res["cpu"][1], "device_s": res[dev][1],
       "codes_equal_fraction": same, "scales_bit_identical": bool(torch.equal(a.scales, b.scales)),
       "codes_bit_identical": bool(torch.equal(a.codes, b.codes))}
print(f"GPTQ {rows}x{hidden} CPU {out['cpu_s']:.2f}s vs {dev} {out['device_s']:.2f}s; codes equal on "
      f"{100 * same:.3f}% (bit-identical: {out['codes_bit_identical']}; cuBLAS/cuSOLVER round differently from "
      f"MKL, so a few codes at rounding boundaries may differ)")
json.dump(out, open(os.path.join(out_dir, "gptq_agree.json"), "w"), indent=2)
PY

echo "== summary =="
cat "$OUTDIR/device.txt"
tail -8 "$OUTDIR/merge_cuda.txt" 2>/dev/null
tail -1 "$OUTDIR/merge_cuda_tests.txt" 2>/dev/null
tail -1 "$OUTDIR/gptq_cuda.txt" 2>/dev/null
tail -1 "$OUTDIR/ties_gpu.txt" 2>/dev/null
tail -1 "$OUTDIR/gptq_agree.txt" 2>/dev/null
