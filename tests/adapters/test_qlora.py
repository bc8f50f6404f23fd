"""QLoRA exactness: an adapter trained on a bitsandbytes NF4 base, merged into the NF4-round-tripped base,
reproduces the adapter-on-quantized-base model (PEFT on transformers' load_in_4bit model, on CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adapters.conftest import load_fp32, randomize_adapter

pytest.importorskip("bitsandbytes")


def _probe():
    import torch

    return torch.randint(3, 500, (4, 48), generator=torch.Generator().manual_seed(0))


def _qlora_adapter(base: Path, out: Path, *, double_quant: bool, record: str = "adaptkit.json"):
    """A LoRA trained (randomized) on the 4-bit base; returns (adapter, logits of the PEFT 4-bit model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb, dtype=torch.float32).eval()
    pm = get_peft_model(q, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_adapter(pm, seed=5)
    pm.eval()
    pm.save_pretrained(str(out))
    if record == "adaptkit.json":
        (out / "adaptkit.json").write_text(json.dumps({"kind": "train", "base_quantization": {
            "quant_type": "nf4", "blocksize": 64, "double_quant": double_quant, "compute_dtype": "float32"}}))
    elif record == "config.json":  # a transformers hint: the quantized base's config saved beside the adapter
        (out / "config.json").write_text(json.dumps({"quantization_config": bnb.to_dict()}))
    with torch.no_grad():
        return out, pm(input_ids=_probe()).logits.double()


def _logits(model_dir: Path):
    import torch

    with torch.no_grad():
        return load_fp32(model_dir)(input_ids=_probe()).logits.double()


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_merge_reproduces_adapter_on_nf4_base(double_quant, bases, adaptkit_cli, tmp_path):
    base = bases["llama"]
    adapter, ref = _qlora_adapter(base, tmp_path / "qlora", double_quant=double_quant)
    out = tmp_path / "merged"
    res = adaptkit_cli("merge-adapter", base, adapter, out, "--json", "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["base_quantization"]["quant_type"] == "nf4" and doc["base_quantization_applied"]
    assert doc["roundtrip_tensors"] == 14  # every linear of the 2 layers; not embeddings, not lm_head
    got = _logits(out)
    assert float((got - ref).abs().max()) < 1e-4
    prov = json.loads((out / "adaptkit.json").read_text())
    assert prov["base_quantization"]["double_quant"] is double_quant

    # the other policy (merge into the original weights) does not reproduce the adapter model
    res = adaptkit_cli("merge-adapter", base, adapter, tmp_path / "orig", "--base-quantization", "none", "-q")
    assert res.exit_code == 0, res.output
    orig = _logits(tmp_path / "orig")
    assert float((orig - ref).abs().max()) > 100 * float((got - ref).abs().max())


def test_qlora_policy_from_command_line_and_transformers_hint(bases, adaptkit_cli, tmp_path):
    base = bases["llama"]
    adapter, ref = _qlora_adapter(base, tmp_path / "qlora", double_quant=True, record="none")
    res = adaptkit_cli("merge-adapter", base, adapter, tmp_path / "cli", "-q", "--base-quantization", "nf4",
                       "--blocksize", "64", "--double-quant")
    assert res.exit_code == 0, res.output
    assert float((_logits(tmp_path / "cli") - ref).abs().max()) < 1e-4
    # without any record nothing is round-tripped
    res = adaptkit_cli("merge-adapter", base, adapter, tmp_path / "plain", "-q", "--json")
    assert json.loads(res.stdout)["base_quantization_applied"] is False
    # a transformers quantization_config beside the adapter is a hint
    hinted, ref2 = _qlora_adapter(base, tmp_path / "hinted", double_quant=False, record="config.json")
    res = adaptkit_cli("merge-adapter", base, hinted, tmp_path / "h", "-q", "--json")
    doc = json.loads(res.stdout)
    assert doc["base_quantization"]["source"].endswith("config.json") and doc["base_quantization_applied"]
    assert float((_logits(tmp_path / "h") - ref2).abs().max()) < 1e-4


def test_peft_model_card_hint(tmp_path):
    """PEFT <= 0.6 wrote the bitsandbytes config into the adapter's README.md."""
    from adaptkit.adapters import qlora

    card = tmp_path / "README.md"
    card.write_text("## Training procedure\n\nThe following `bitsandbytes` quantization config was used during "
                    "training:\n- quant_method: bitsandbytes\n- load_in_8bit: False\n- load_in_4bit: True\n"
                    "- bnb_4bit_quant_type: nf4\n- bnb_4bit_use_double_quant: True\n"
                    "- bnb_4bit_compute_dtype: bfloat16\n")
    pol = qlora._from_readme(card)
    assert (pol.quant_type, pol.blocksize, pol.double_quant, pol.compute_dtype) == ("nf4", 64, True, "bfloat16")


def test_int8_roundtrip_equals_transformers_load_in_8bit(bases):
    """The int8 policy reproduces the weights transformers' load_in_8bit stores (row-wise absmax int8)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adaptkit.adapters import qlora

    base = bases["llama"]
    try:
        q = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 dtype=torch.float32)
    except Exception as exc:  # pragma: no cover - bitsandbytes builds without int8 CPU support
        pytest.skip(f"load_in_8bit unavailable here: {exc}")
    p = q.model.layers[1].mlp.down_proj.weight
    ref = p.CB.to(torch.float64) * p.SCB.to(torch.float64)[:, None] / 127
    w = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    got = qlora.roundtrip(w, qlora.from_dict({"quant_type": "int8"}, source="test"))
    assert float((got.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_adapter_merged_into_a_stored_nf4_base(bases, adaptkit_cli, tmp_path):
    """BASE is itself an NF4 checkpoint (dequantized on load): its weights already are what the adapter saw, so
    nothing is round-tripped again and the merge reproduces PEFT on transformers' load of that checkpoint."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    nf4 = tmp_path / "nf4"
    res = adaptkit_cli("quantize", bases["llama"], nf4, "--method", "nf4", "-o", "blocksize=64")
    if res.exit_code != 0:
        pytest.skip(f"nf4 quantizer unavailable: {res.output.strip().splitlines()[-1:]}")
    q = AutoModelForCausalLM.from_pretrained(str(nf4), dtype=torch.float32).eval()
    pm = get_peft_model(q, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapter(pm, seed=9)
    pm.eval()
    ad = tmp_path / "ad"
    pm.save_pretrained(str(ad))
    (ad / "adaptkit.json").write_text(json.dumps({"base_quantization": {"quant_type": "nf4", "blocksize": 64,
                                                                        "double_quant": True}}))
    with torch.no_grad():
        ref = pm(input_ids=_probe()).logits.double()
    out = tmp_path / "merged"
    res = adaptkit_cli("merge-adapter", nf4, ad, out, "--json", "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["base_quantization_applied"] is False and "already" in doc["notes"][0]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert float((_logits(out) - ref).abs().max()) < 1e-4
