"""The tiny-Llama factory: loadable by transformers, numerically the model its files describe, options
honoured in config.json and the safetensors header, a working tokenizer, deterministic by seed."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from adaptkit.errors import ConfigError, OutputError
from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy
from tests.testing.llama_ref import llama_logits, load_weights

TEXT = "The quick brown fox jumps over the lazy dog, again and again."


def header(path: Path) -> dict:
    """The safetensors JSON header, read by hand (8-byte little-endian length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return head


@pytest.mark.parametrize(
    "opts",
    [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "num_kv_heads": 1}],
    ids=["default", "bias-tied-mqa"],
)
def test_forward_matches_float64_reference(tmp_path, opts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path / "m", **opts)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double()
    ref = llama_logits(path, ids)
    assert torch.isfinite(got).all()
    assert got.shape == (len(ids), len(tok))
    scale = ref.abs().max()
    assert scale > 0.05  # not a degenerate all-zero model
    # fp32 vs fp64 differ by ~1e-7 relative; a wrong rotary/GQA/bias convention shows up at ~1e-3..1e-2
    assert (got - ref).abs().max() / scale < 1e-5
    # and the reference is sensitive enough to notice a missing rotary embedding
    assert (llama_logits(path, ids, use_rope=False) - ref).abs().max() / scale > 1e-3


def test_options_are_honoured_in_config_and_tensors(tmp_path):
    path = make_tiny_llama(tmp_path / "m", hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                           intermediate_size=48, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                           dtype="bfloat16", vocab_size=600, max_position_embeddings=64)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"],
            cfg["max_position_embeddings"]) == (32, 3, 4, 2, 48, 600, 64)
    assert cfg["tie_word_embeddings"] is True and cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"

    head = header(path / "model.safetensors")
    assert {t["dtype"] for t in head.values()} == {"BF16"}
    assert "lm_head.weight" not in head  # tied: transformers stores only the embedding
    assert head["model.embed_tokens.weight"]["shape"] == [600, 32]
    hd = 32 // 4
    for i in range(3):
        p = f"model.layers.{i}"
        assert head[f"{p}.self_attn.q_proj.weight"]["shape"] == [4 * hd, 32]
        assert head[f"{p}.self_attn.k_proj.weight"]["shape"] == [2 * hd, 32]  # GQA: fewer key/value heads
        assert head[f"{p}.self_attn.v_proj.weight"]["shape"] == [2 * hd, 32]
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"{p}.{proj}.bias" in head
    w = load_weights(path)
    assert w["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0  # biases are not all zero
    assert w["model.layers.2.mlp.down_proj.bias"].shape == (32,)


def test_default_layout_untied_no_bias_float32(tmp_path):
    path = make_tiny_llama(tmp_path / "m")
    head = header(path / "model.safetensors")
    assert head["lm_head.weight"]["shape"] == [512, 64]
    assert head["model.embed_tokens.weight"]["shape"] == [512, 64]
    assert not [n for n in head if n.endswith(".bias")]
    assert {t["dtype"] for t in head.values()} == {"F32"}
    assert len([n for n in head if n.startswith("model.layers.")]) == 2 * 9
    assert sorted(p.name for p in path.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("dtype,code", [(torch.float16, "F16"), ("fp32", "F32"), ("bf16", "BF16")])
def test_dtype_spellings(tmp_path, dtype, code):
    path = make_tiny_llama(tmp_path / "m", dtype=dtype, num_layers=1)
    assert {t["dtype"] for t in header(path / "model.safetensors").values()} == {code}


def test_tokenizer_round_trips_and_has_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "m", num_layers=1))
    for text in [TEXT, "def f(x):\n\treturn x ** 2  # ok", "naïve café – 東京 😀", "  spaces  ", ""]:
        ids = tok(text)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == text
    assert len(tok(TEXT)["input_ids"]) < 0.8 * len(TEXT.encode())  # it learned merges, not bytes only
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    assert None not in specials and len(specials) == 4
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens stay single tokens


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_deterministic_by_seed(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=3, attention_bias=True)
    b = make_tiny_llama(tmp_path / "b", seed=3, attention_bias=True)
    c = make_tiny_llama(tmp_path / "c", seed=4, attention_bias=True)
    assert _digest(a) == _digest(b)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    wa, wc = load_weights(a), load_weights(c)
    assert wa.keys() == wc.keys()
    for name in wa:
        if "layernorm" in name or name == "model.norm.weight":
            continue  # norms start at one in every seed
        assert not torch.equal(wa[name], wc[name]), name
    # building does not disturb the caller's global RNG
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_llama(tmp_path / "d", num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_perturbed_copy_is_a_small_relative_variant(tmp_path):
    base = make_tiny_llama(tmp_path / "base", attention_bias=True)
    v1 = perturbed_copy(base, tmp_path / "v1", scale=0.05, seed=1)
    v1b = perturbed_copy(base, tmp_path / "v1b", scale=0.05, seed=1)
    v2 = perturbed_copy(base, tmp_path / "v2", scale=0.05, seed=2)
    assert _digest(v1) == _digest(v1b)
    assert header(v1 / "model.safetensors").keys() == header(base / "model.safetensors").keys()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (v1 / name).read_bytes() == (base / name).read_bytes()
    wb, w1, w2 = load_weights(base), load_weights(v1), load_weights(v2)
    for name, b in wb.items():
        d1, d2 = w1[name] - b, w2[name] - b
        rms = b.pow(2).mean().sqrt()
        ratio = d1.pow(2).mean().sqrt() / rms
        tol = 0.5 if b.numel() < 200 else 0.2
        assert abs(ratio / 0.05 - 1) < tol, (name, float(ratio))
        assert not torch.allclose(d1, d2)  # different seeds, different variants
    # and the variant still loads and runs
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(v2)(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(out).all()


def test_bad_options_and_targets(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=100"):
        make_tiny_llama(tmp_path / "a", vocab_size=100)
    with pytest.raises(ConfigError, match="num_kv_heads=3"):
        make_tiny_llama(tmp_path / "a", num_kv_heads=3)
    with pytest.raises(ConfigError, match="dtype"):
        make_tiny_llama(tmp_path / "a", dtype="int8")
    assert not (tmp_path / "a").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(OutputError):
        make_tiny_llama(busy)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    with pytest.raises(OutputError):
        perturbed_copy(make_tiny_llama(tmp_path / "b", num_layers=1), busy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "busy"]  # no temp folders left behind
