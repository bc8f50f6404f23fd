"""Our GPTQ v1 files read by GPTQModel itself (slow; needs the interop venv with gptqmodel).

GPTQModel runs in its own interpreter (``ADAPTKIT_INTEROP_PYTHON``, default ``.venv-interop/bin/python``),
loads our checkpoint with its torch kernel (it converts v1 -> v2 on load), and its ``dequantize_weight()`` must
equal our loader's weights up to bf16 rounding (GPTQModel's torch kernel holds scales in bf16/fp16 on CPU);
a packing or zero-point error would be off by whole quantization steps.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
INTEROP = Path(os.environ.get("ADAPTKIT_INTEROP_PYTHON", ROOT / ".venv-interop" / "bin" / "python"))

SCRIPT = r"""
import json, sys, torch
from gptqmodel import GPTQModel, BACKEND
from safetensors.torch import load_file
q, ref_file = sys.argv[1], sys.argv[2]
ref = load_file(ref_file)
m = GPTQModel.load(q, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
worst, n = 0.0, 0
for name, mod in m.model.named_modules():
    if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
        w = mod.dequantize_weight().T.double()
        r = ref[name + ".weight"].double()
        worst = max(worst, ((w - r).abs() / (r.abs() + 1e-12)).max().item()); n += 1
print(json.dumps({"n": n, "worst": worst}))
"""


def _interop_ok() -> bool:
    if not INTEROP.exists():
        return False
    r = subprocess.run([str(INTEROP), "-c", "import gptqmodel"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _interop_ok(), reason="needs the interop venv with gptqmodel (make test-interop)")
@pytest.mark.parametrize("bits", [3, 4])
def test_gptqmodel_reads_our_gptq_v1(tiny_llama, tmp_path, adaptkit_pm, bits) -> None:
    from safetensors.torch import save_file

    from adaptkit.quantize.runner import run_quantize

    src = tiny_llama()
    q = tmp_path / "q"
    run_quantize(src, q, method="rtn", bits=bits, group_size=32, sym=True, host=adaptkit_pm)
    qc = adaptkit_pm.open_model(q)
    ref = {n: qc.get(n).float().contiguous() for n in qc.dequantized_names}
    qc.close()
    save_file(ref, str(tmp_path / "ref.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "1"}
    r = subprocess.run([str(INTEROP), "-c", SCRIPT, str(q), str(tmp_path / "ref.safetensors")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["n"] == 14
    assert doc["worst"] <= 2.0**-7  # bf16 rounding of scale and product; a layout error is >= 1 step


AWQ_SCRIPT = r"""
import json, sys, torch
from gptqmodel import GPTQModel
from safetensors.torch import load_file
q, ref_file = sys.argv[1], sys.argv[2]
ref = load_file(ref_file)
m = GPTQModel.load(q, device="cpu", dtype=torch.float16)
worst, n = 0.0, 0
for name, mod in m.model.named_modules():
    if hasattr(mod, "qweight"):
        with torch.no_grad():
            wt = mod(torch.eye(mod.in_features, dtype=torch.float16)).double()  # x = I -> rows of W^T
        if getattr(mod, "bias", None) is not None:
            wt = wt - mod.bias.double()
        r = ref[name + ".weight"].double().T
        step = ref[name + ".step"].double().T
        worst = max(worst, ((wt - r).abs() / step).max().item()); n += 1
print(json.dumps({"n": n, "worst": worst}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _interop_ok(), reason="needs the interop venv with gptqmodel (make test-interop)")
def test_gptqmodel_reads_our_awq_gemm(tiny_llama, tmp_path, adaptkit_pm) -> None:
    """AWQ GEMM layout (nibble order, unshifted zeros) through GPTQModel's AWQ torch kernel: every weight
    within a small fraction of one quantization step (the kernel folds zero points in fp16); a wrong nibble
    order or zero convention is off by whole steps."""
    from safetensors.torch import save_file

    from adaptkit.quantize.runner import run_quantize
    from adaptkit_quant.rtn import quantize_weight

    def rtn_as_awq(request):
        for m in request.targets:
            yield m, quantize_weight(request.weight(m), request.spec)

    src = tiny_llama()
    q = tmp_path / "q"
    from adaptkit.registry import Quantizer

    rtn_awq = Quantizer(name="rtn-as-awq", impl=rtn_as_awq, formats=("awq",), accepts=("bits", "group_size", "sym"))
    run_quantize(src, q, quantizer=rtn_awq, bits=4, group_size=32, sym=False, host=adaptkit_pm)
    qc = adaptkit_pm.open_model(q)
    ref = {}
    for n in qc.dequantized_names:
        ql = qc.quantized(n)
        ref[n] = ql.dequantize().contiguous()
        ref[n[: -len("weight")] + "step"] = ql.scales[ql.g_idx.long()].T.contiguous()
    qc.close()
    save_file(ref, str(tmp_path / "ref.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "1"}
    r = subprocess.run([str(INTEROP), "-c", AWQ_SCRIPT, str(q), str(tmp_path / "ref.safetensors")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["n"] == 14
    assert doc["worst"] < 0.25
