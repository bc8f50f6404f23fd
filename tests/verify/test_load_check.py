"""The strict load: transformers' silent re-initialisation becomes an error; quantized checkpoints load the way a
deployment loads them when the backend is installed (bitsandbytes NF4 here), else through adaptkit's
dequantizing loader, and the report says which."""
from __future__ import annotations

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")

from adaptkit.errors import CheckpointError  # noqa: E402
from adaptkit.verify.load import load_causal_lm  # noqa: E402


def _logits(lm, text="The quick brown fox jumps over the lazy dog."):
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits.float()


def test_plain_checkpoint_matches_transformers(tiny_llama, adaptkit_pm):
    from transformers import AutoModelForCausalLM

    m = tiny_llama()
    lm = load_causal_lm(m, host=adaptkit_pm)
    ref = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
    ids = lm.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        want = ref(input_ids=torch.tensor([ids])).logits
    assert lm.route == "transformers"
    torch.testing.assert_close(_logits(lm, "hello world"), want, rtol=0, atol=0)


def test_missing_tensor_is_an_error_not_a_random_init(tiny_llama, adaptkit_pm):
    from safetensors.torch import load_file, save_file

    m = tiny_llama()
    t = load_file(str(m / "model.safetensors"))
    del t["model.layers.0.self_attn.o_proj.weight"]
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_causal_lm(m, host=adaptkit_pm)
    msg = err.value.one_line()
    assert "model.layers.0.self_attn.o_proj.weight" in msg and "[rule load-strict]" in msg and str(m) in msg
    lm = load_causal_lm(m, host=adaptkit_pm, strict=False)
    assert lm.missing == ["model.layers.0.self_attn.o_proj.weight"]


def test_unexpected_tensor_is_an_error(tiny_llama, adaptkit_pm):
    from safetensors.torch import load_file, save_file

    m = tiny_llama()
    t = load_file(str(m / "model.safetensors"))
    t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(t, str(m / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra_proj.weight'"):
        load_causal_lm(m, host=adaptkit_pm)


@pytest.fixture
def quantized(tiny_llama, adaptkit_cli, tmp_path):
    pytest.importorskip("adaptkit_quant")

    def make(method: str, *args: str):
        base = tiny_llama()
        out = tmp_path / f"q-{method}"
        res = adaptkit_cli("quantize", base, out, "--method", method, *args)
        assert res.exit_code == 0, res.stderr
        return base, out

    return make


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_loads_through_bitsandbytes_and_matches_adaptkit_dequantization(quantized, adaptkit_pm):
    _base, q = quantized("nf4")
    deploy = load_causal_lm(q, host=adaptkit_pm, deployment=True)
    ours = load_causal_lm(q, host=adaptkit_pm, deployment=False)
    assert deploy.route == "transformers+bitsandbytes"
    assert type(deploy.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert ours.route == "adaptkit:quantized" and ours.source_format is not None
    # two independent implementations of NF4 dequantization (bitsandbytes kernels vs adaptkit's loader)
    torch.testing.assert_close(_logits(ours), _logits(deploy), rtol=1e-3, atol=1e-3)


def test_gptq_without_its_backend_is_dequantized_and_says_why(quantized, adaptkit_pm):
    if importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"):
        pytest.skip("the GPTQ backend is installed here")
    base, q = quantized("rtn", "--group-size", "32")
    lm = load_causal_lm(q, host=adaptkit_pm, deployment=True)
    assert lm.route == "adaptkit:quantized"
    assert "gptq backend not installed" in lm.note and "dequantized by adaptkit" in lm.note
    # the dequantized model is close to the unquantized one (4-bit RTN on a random tiny model)
    ref = load_causal_lm(base, host=adaptkit_pm)
    a, b = _logits(lm), _logits(ref)
    assert (a - b).abs().max() < 0.5 * b.abs().max()


def test_verify_reports_the_load_route(quantized, adaptkit_cli, tmp_path):
    _base, q = quantized("rtn", "--group-size", "32")
    res = adaptkit_cli("verify", q, "--json", "--no-progress", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["load"]["route"].startswith(("adaptkit:", "transformers+"))
    assert doc["load"]["note"]
    assert next(c for c in doc["checks"] if c["name"] == "quantization")["status"] == "passed"
    assert "Loaded with" in (tmp_path / "r" / "verify.md").read_text()
