"""Logits of our GPTQ / AWQ checkpoints run by transformers + GPTQModel equal our dequantized reference (slow).

Issue #4 item 5. A tiny Llama (hidden 256, intermediate 512, 2 layers, float32) is quantized with
``adaptkit quantize --method gptq`` (4-bit, sym, g128) and ``--method awq`` (4-bit, zero point, g64), and a
second one with hidden 192 = 1.5 x 128 with ``--method gptq --act-order --partial-groups`` at g128 (SmolLM2's
situation: q/k/v/o/gate/up end with a 64-column group; GPTQModel's kernels must size ``scales`` with
``ceil(in / group)``), then:

* **interop side** -- in a subprocess of the interop interpreter (``ADAPTKIT_INTEROP_PYTHON``, default
  ``.venv-interop/bin/python``: transformers + GPTQModel + optimum), our quantized folder is loaded with
  ``transformers.AutoModelForCausalLM.from_pretrained(q, dtype=float32, device_map="cpu")``; transformers hands the
  ``quantization_config`` to GPTQModel, which builds its own quantized linear kernels from our packed tensors
  (no adaptkit code runs there). It runs a fixed batch of token ids and saves the logits (``.safetensors``).
* **reference side** -- ``adaptkit quantize Q DEQ --method dequantize`` writes a float32 folder, and plain
  transformers (no quantization code) computes the logits of the same ids.

Kernel choice and bounds (measured on CPU, torch 2.13, GPTQModel 7.6, transformers 5.x):

* GPTQModel's *automatic* CPU kernels (``TorchAtenLinear`` / ``TorchAtenAwqLinear``, ATen int4pack) cast the
  activations and scales to **bfloat16** whatever the model dtype, so the auto path can only match to bf16
  precision: measured max|dlogit|/max|logit| = 6.1e-3 (gptq) and 6.3e-3 (awq). We check it against 2e-2.
* The issue's 1e-3 is checked with the kernels that keep more precision, selected through transformers'
  ``GPTQConfig(backend="gptq_torch")`` / ``AwqConfig(backend="torch_awq")`` (merged into the checkpoint's
  config as a loading attribute): ``TorchLinear`` dequantizes with the checkpoint's fp16 scales and multiplies
  in float32 (measured 5.3e-4); ``AwqTorchLinear`` computes in **float16** for float32 inputs (its
  compute dtype is fp16/bf16 only; measured 7.8e-4). Both are within 1e-3; the residue is the fp16 rounding
  of (code - zero) * scale and, for AWQ, of the activations.

Power: the same logits differ from the unquantized model's by 0.22-0.36 (relative), and a packing, nibble-order
or zero-point error moves weights by whole quantization steps, i.e. an error of that size, far beyond 2e-2.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
INTEROP = Path(os.environ.get("ADAPTKIT_INTEROP_PYTHON", ROOT / ".venv-interop" / "bin" / "python")).absolute()

TINY = dict(hidden_size=256, intermediate_size=512, num_layers=2, dtype="float32")
#: hidden 192 = 1.5 x 128: q/k/v/o/gate/up end with a 64-column group at --group-size 128 (SmolLM2's case)
TINY_PARTIAL = dict(hidden_size=192, intermediate_size=384, num_layers=2, num_heads=6, num_kv_heads=2, dtype="float32")
#: case -> (adaptkit quantize arguments, transformers backend that keeps >= fp16 precision, tiny model,
#: also check GPTQModel's automatic kernel choice). Partial groups: GPTQModel's automatic CPU kernel
#: (TorchAtenLinear, ATen int4pack) fails on them ("_weight_int4pack_mm_cpu: expect K to be divisible by
#: qGroupSize"), so that case loads with backend="gptq_torch" only (what specs/formats.md tells users).
CASES = {
    "gptq": (["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym"], "gptq_torch", TINY, True),
    "gptq-partial": (["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--act-order",
                      "--partial-groups"], "gptq_torch", TINY_PARTIAL, False),
    "awq": (["--method", "awq", "--bits", "4", "--group-size", "64", "--asym"], "torch_awq", TINY, True),
}
PRECISE_BOUND = 1e-3  # issue #4: logits within 1e-3 relative of our dequantized reference
AUTO_BOUND = 2e-2     # GPTQModel's auto CPU kernels run in bfloat16 (unit roundoff 2**-8 per op)

SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig
q, fmt, ids_file, out_file = sys.argv[1:5]
backends = sys.argv[5:]
ids = load_file(ids_file)["ids"]
out, kernels = {}, {}
for backend in backends:
    kw = {}
    if backend != "auto":
        kw["quantization_config"] = (GPTQConfig(bits=4, backend=backend) if fmt == "gptq"
                                     else AwqConfig(bits=4, backend=backend))
    m = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32, device_map="cpu", **kw)
    m.eval()
    qmods = [type(mod).__name__ for mod in m.modules() if hasattr(mod, "qweight")]
    kernels[backend] = {"n": len(qmods), "types": sorted(set(qmods))}
    with torch.no_grad():
        out[backend] = m(input_ids=ids).logits.float().contiguous()
    del m
save_file(out, out_file)
print(json.dumps(kernels))
"""


def _interop_ok() -> bool:
    if not INTEROP.exists():
        return False
    r = subprocess.run([str(INTEROP), "-c", "import gptqmodel, transformers"], capture_output=True)
    return r.returncode == 0


def _rel(got: "torch.Tensor", ref: "torch.Tensor") -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _logits(folder: Path, ids: "torch.Tensor") -> "torch.Tensor":
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(input_ids=ids).logits.float()


@pytest.mark.slow
@pytest.mark.skipif(not _interop_ok(), reason="needs the interop venv with gptqmodel (make test-interop)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_logits_match_dequantized_reference(tiny_llama, adaptkit_cli, tmp_path, case) -> None:
    from safetensors.torch import load_file, save_file

    args, precise, tiny, check_auto = CASES[case]
    fmt = case.split("-")[0]
    src = tiny_llama(**tiny)
    q, deq = tmp_path / "q", tmp_path / "deq"
    r = adaptkit_cli("quantize", src, q, *args, "--calib", "builtin", "--nsamples", "4", "--seqlen", "64")
    assert r.exit_code == 0, r.output
    assert json.loads((q / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    r = adaptkit_cli("quantize", q, deq, "--method", "dequantize")
    assert r.exit_code == 0, r.output
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 512, (2, 32), generator=gen)
    save_file({"ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "1"}
    run = subprocess.run(
        [str(INTEROP), "-c", SCRIPT, str(q), fmt, str(tmp_path / "ids.safetensors"),
         str(tmp_path / "interop.safetensors"), precise, *(["auto"] if check_auto else [])],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,  # GPTQModel writes logs/ into cwd
    )
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = json.loads(run.stdout.strip().splitlines()[-1])
    got = load_file(str(tmp_path / "interop.safetensors"))

    ref = _logits(deq, ids)
    unquantized = _logits(src, ids)
    rel_precise = _rel(got[precise], ref)
    rel_auto = _rel(got["auto"], ref) if check_auto else float("nan")
    quant_err = _rel(unquantized, ref)
    print(f"{case}: kernels={kernels} rel[{precise}]={rel_precise:.3e} rel[auto]={rel_auto:.3e} "
          f"quantization error={quant_err:.3e}")
    # GPTQModel really built quantized kernels for all 14 linears (nothing silently loaded in float)
    assert all(k["n"] == 14 for k in kernels.values()), kernels
    assert rel_precise <= PRECISE_BOUND, (precise, rel_precise)
    if check_auto:
        assert rel_auto <= AUTO_BOUND, ("auto", rel_auto)
    # the comparison can see a quantization-sized error (what a packing/zero-point bug produces)
    assert quant_err > 5 * AUTO_BOUND, quant_err
