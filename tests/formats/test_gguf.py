"""The GGUF loader (``adaptkit.formats.gguf``): tiny Llamas written as GGUF here, in llama.cpp's layout (its
metadata keys, its q/k row permutation, its tokenizer arrays), read back and compared with independent
references: the original safetensors weights (F32 and F16 round trips are exact), transformers' own GGUF
loading (``from_pretrained(..., gguf_file=...)``: state dict, config and logits) for quantized files, and
transformers' rope initialisation for Llama 3 rope factors. Plus the CLI (``adaptkit inspect``), detection, and
one-line errors for unsupported or damaged files. The real SmolLM2 GGUF is checked in the slow tests."""
from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from adaptkit.errors import CheckpointError
from adaptkit.formats.gguf import GGUFTensorInfo, detect, open_gguf
from adaptkit.testing.tiny import CHAT_TEMPLATE, make_tiny_llama

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

Q = gguf.GGMLQuantizationType

# -- writing a GGUF the way llama.cpp's convert_hf_to_gguf.py does --------------------------------------------

_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{_HF_TO_GGUF['.'.join(module)]}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute (q with n_head, k with n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: dict) -> float:
    return float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def write_gguf(src: Path, out: Path, *, qtype=lambda name, arr: Q.F32, arch: str = "llama",
               extra_tensors: dict | None = None, extra_kv=None, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write the tiny HF checkpoint ``src`` as a GGUF at ``out``; ``qtype(gguf_name, array)`` picks each 2-D
    tensor's type (1-D tensors stay F32, as llama.cpp keeps them)."""
    from safetensors.numpy import load_file

    cfg = json.loads((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(0)
    # the tokenizer, as llama.cpp stores a byte-level BPE ("gpt2" model)
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {t["id"] for t in tj["added_tokens"] if t.get("special")}
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    assert None not in tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_unk_token_id(0)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in (extra_kv or {}).items():
        getattr(w, key)(*(value if isinstance(value, tuple) else (value,)))
    for hf, arr in sd.items():
        name = _gguf_name(hf)
        arr = arr.astype(np.float32)
        if ".attn_q." in name:
            arr = _llamacpp_permute(arr, heads)
        elif ".attn_k." in name:
            arr = _llamacpp_permute(arr, kv)
        t = qtype(name, arr) if arr.ndim == 2 else Q.F32
        if t == Q.F32:
            w.add_tensor(name, arr)
        elif t == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
    for name, arr in (extra_tensors or {}).items():
        if isinstance(arr, tuple):  # (raw bytes array, type)
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _mixed(name: str, arr: np.ndarray):
    return Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    # intermediate 256 = one K-quant block per ffn_down row (the unsupported-type test needs it)
    tiny = make_tiny_llama(root / "tiny", intermediate_size=256, seed=3)
    biased = make_tiny_llama(root / "biased-src", attention_bias=True, mlp_bias=True, tie_word_embeddings=True, seed=4)
    files = {}
    for name, src, kw in (
        ("f32", tiny, {}),
        ("f16", tiny, {"qtype": lambda n, a: Q.F16}),
        ("mixed", tiny, {"qtype": _mixed}),
        ("biased", biased, {}),
        ("qwen2", tiny, {"arch": "qwen2"}),
    ):
        (root / f"{name}-gguf").mkdir()
        files[name] = write_gguf(src, root / f"{name}-gguf" / f"{name}.gguf", **kw)
    return {"root": root, "tiny": tiny, "biased_src": biased, **files}


def _state(src: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(src / "model.safetensors"))


def _hf_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _model_from(ckpt):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**ckpt.config)).eval()
    sd = {n: ckpt.get(n) for n in ckpt.names()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if ckpt.config["tie_word_embeddings"]:
        model.tie_weights()
    return model


PROBE = torch.tensor([[1, 17, 230, 45, 8, 311, 99, 2]])


# -- tensors -----------------------------------------------------------------------------------------------


def test_f32_gguf_is_exactly_the_original_checkpoint(zoo):
    orig = _state(zoo["tiny"])
    cfg = json.loads((zoo["tiny"] / "config.json").read_text())
    with open_gguf(zoo["f32"]) as ck:
        assert sorted(ck.names()) == sorted(orig)  # HF names, lm_head included (untied)
        assert ck.source_format is None and ck.stored_dtypes() == {"F32": len(orig)}
        for name, ref in orig.items():
            info = ck.info(name)
            assert isinstance(info, GGUFTensorInfo)
            assert (info.dtype, info.shape, info.nbytes) == ("F32", tuple(ref.shape), ref.numel() * 4)
            assert info.file == zoo["f32"] and info.stored_nbytes == info.nbytes
            got = ck.get(name)
            assert got.dtype == torch.float32 and torch.equal(got, ref), name  # q/k un-permuted exactly
        assert ck.total_bytes == sum(t.numel() * 4 for t in orig.values())
        c = ck.config
        assert c["architectures"] == ["LlamaForCausalLM"] and c["torch_dtype"] == "float32"
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                    "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias"):
            assert c[key] == cfg[key], key
        assert c["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
        assert c["rope_theta"] == _rope_theta(cfg)
        assert math.isclose(c["rms_norm_eps"], cfg["rms_norm_eps"], rel_tol=1e-6)  # GGUF stores a float32
        assert "lm_head.weight" in ck and "nope" not in ck and len(ck) == len(orig)
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            ck.get("nope")


def test_biases_are_unpermuted_and_tied_head_is_absent(zoo):
    orig = _state(zoo["biased_src"])
    with open_gguf(zoo["biased"]) as ck:
        assert sorted(ck.names()) == sorted(orig) and "lm_head.weight" not in ck
        for name, ref in orig.items():
            assert torch.equal(ck.get(name), ref), name
        c = ck.config
        assert c["tie_word_embeddings"] is True and c["attention_bias"] is True and c["mlp_bias"] is True


def test_f16_tensors_keep_their_dtype(zoo):
    orig = _state(zoo["tiny"])
    with open_gguf(zoo["f16"]) as ck:
        assert ck.source_format is None and ck.config["torch_dtype"] == "float16"
        for name, ref in orig.items():
            want = ref.half() if ref.ndim == 2 else ref
            info = ck.info(name)
            got = ck.get(name)
            assert got.dtype == want.dtype and info.dtype == {torch.float16: "F16", torch.float32: "F32"}[want.dtype]
            assert torch.equal(got, want), name


def test_quantized_tensors_equal_transformers_dequantization(zoo):
    path = zoo["mixed"]
    ref_model = _hf_gguf_model(path)
    ref = ref_model.state_dict()
    orig = _state(zoo["tiny"])
    with open_gguf(path) as ck:
        assert ck.source_format == "gguf:Q4_1+Q8_0"
        n2d = sum(1 for t in orig.values() if t.ndim == 2)
        assert ck.stored_dtypes() == {"F32": len(orig) - n2d, "Q4_1": n2d - 1, "Q8_0": 1}
        assert ck.config["torch_dtype"] == "float32"
        for name in ck.names():
            got = ck.get(name)
            info = ck.info(name)
            assert got.dtype == torch.float32 and info.dtype == "F32" and info.nbytes == got.numel() * 4
            assert torch.equal(got, ref[name]), name  # transformers dequantizes the same way
            # and it is the original weight up to 4-bit rounding
            err = (got - orig[name]).abs().max().item()
            assert err <= 0.25 * orig[name].abs().max().item() + 1e-6, (name, err)
        q = ck.info("model.layers.0.self_attn.q_proj.weight")
        assert q.gguf_type == "Q4_1" and q.gguf_name == "blk.0.attn_q.weight"
        assert q.stored_nbytes == q.numel // 32 * 20 < q.nbytes
        # config: the fields transformers derives from the same metadata
        hc = ref_model.config
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id", "head_dim"):
            assert ck.config[key] == getattr(hc, key), key
        mine = _model_from(ck)
        with torch.no_grad():
            a = mine(PROBE).logits
            b = ref_model(PROBE).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_views_copies_and_close(zoo):
    ck = open_gguf(zoo["f32"])
    v = ck.get("model.norm.weight")
    c = ck.get("model.norm.weight", copy=True)
    assert torch.equal(v, c) and v.data_ptr() != c.data_ptr()
    c.add_(1)  # a copy is writable and independent
    assert not torch.equal(v, c)
    q = ck.get("model.layers.0.self_attn.q_proj.weight")
    ck.close()
    ck.close()  # idempotent
    assert torch.isfinite(v).all() and torch.isfinite(q).all()  # handed-out tensors outlive close()
    with pytest.raises(CheckpointError, match="closed"):
        ck.get("model.norm.weight")


# -- tokenizer and aux files -------------------------------------------------------------------------------


def test_write_aux_gives_a_loadable_model_folder(zoo, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = tmp_path / "out"
    dst.mkdir()
    with open_gguf(zoo["f32"]) as ck:
        assert ck.chat_template == CHAT_TEMPLATE
        names = ck.write_aux(dst, config=True)
        save_file({n: ck.get(n).contiguous() for n in ck.names()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = ck.config
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= set(names)
    assert all((dst / n).is_file() for n in names)
    assert json.loads((dst / "config.json").read_text()) == cfg
    gen = json.loads((dst / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    assert "gguf_file" not in tok_cfg and tok_cfg["model_max_length"] == cfg["max_position_embeddings"]

    tok = AutoTokenizer.from_pretrained(str(dst))
    ref = AutoTokenizer.from_pretrained(str(zoo["tiny"]))
    text = "The capital of France is Paris. def main(argv): return 0 if argv else 1\n  <|im_start|>x"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)

    # the folder loads in transformers and computes what the original model computes
    model = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    orig = AutoModelForCausalLM.from_pretrained(str(zoo["tiny"]), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, orig(PROBE).logits, rtol=0, atol=0)


def test_publication_copy_aux_uses_write_aux(zoo, tmp_path):
    from adaptkit.io.publish import publish_output

    with open_gguf(zoo["f32"]) as ck, publish_output(tmp_path / "o", kind="test") as pub:
        copied = pub.copy_aux(ck)
    assert "tokenizer.json" in copied and "config.json" not in copied
    assert (tmp_path / "o" / "tokenizer.json").is_file() and not (tmp_path / "o" / "config.json").exists()


# -- rope scaling ------------------------------------------------------------------------------------------


def _llamacpp_rope_factors(theta, dim, factor, low, high, old_ctx):
    """convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors (Llama 3 rope_freqs)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array([float(x) for x in out], dtype=np.float32)


def test_llama3_rope_factors_become_rope_scaling(zoo, tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = json.loads((zoo["tiny"] / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = 500000.0
    factors = _llamacpp_rope_factors(theta, head_dim, 8.0, 1.0, 4.0, 8192)
    assert (factors != 1).any() and (factors != 8).any()  # all three bands present at this head size
    path = write_gguf(zoo["tiny"], tmp_path / "l3.gguf", extra_tensors={"rope_freqs.weight": factors},
                      extra_kv={"add_rope_freq_base": theta})
    with open_gguf(path) as ck:
        c = ck.config
        assert "rope_freqs.weight" not in " ".join(ck.names())
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    # transformers' own llama3 rope with this config gives llama.cpp's frequencies: base / factors
    hc = LlamaConfig(**c)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    torch.testing.assert_close(inv.float(), base / torch.from_numpy(factors), rtol=1e-5, atol=0)


def test_linear_rope_scaling_and_unsupported_kinds(zoo, tmp_path):
    path = write_gguf(zoo["tiny"], tmp_path / "lin.gguf", extra_kv={
        "add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": 4.0})
    with open_gguf(path) as ck:
        assert ck.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    path = write_gguf(zoo["tiny"], tmp_path / "yarn.gguf", extra_kv={
        "add_rope_scaling_type": gguf.RopeScalingType.YARN, "add_rope_scaling_factor": 4.0})
    with pytest.raises(CheckpointError, match="rope scaling 'yarn' is not supported"):
        open_gguf(path)


def test_odd_rope_factors_are_refused(zoo, tmp_path):
    n = 64 // 4 // 2  # head_dim / 2
    path = write_gguf(zoo["tiny"], tmp_path / "odd.gguf", extra_tensors={"rope_freqs.weight": np.linspace(1, 3, n, dtype=np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight.*not Llama 3"):
        open_gguf(path)


# -- detection, CLI and errors -----------------------------------------------------------------------------


def test_detect(zoo, tmp_path):
    assert detect(zoo["f32"]) is True
    assert detect(zoo["f32"].parent) is True  # a folder holding exactly one .gguf
    assert detect(zoo["tiny"]) is False and detect(zoo["tiny"] / "model.safetensors") is False
    assert detect(zoo["tiny"] / "config.json") is False
    assert detect(tmp_path / "missing.gguf") is False and detect(tmp_path) is False
    blob = tmp_path / "sha256-0123"  # an Ollama blob: GGUF without the extension
    blob.write_bytes(zoo["f32"].read_bytes()[:64])
    assert detect(blob) is True
    both = tmp_path / "both"
    both.mkdir()
    (both / "a.gguf").write_bytes(b"GGUF")
    assert detect(both) is True
    (both / "model.safetensors").write_bytes(b"")
    assert detect(both) is False
    (both / "model.safetensors").unlink()
    (both / "b.gguf").write_bytes(b"GGUF")
    assert detect(both) is False  # two GGUF files: which one is ambiguous


def test_opening_a_folder_opens_its_gguf(zoo):
    with open_gguf(zoo["f32"].parent) as ck:
        assert ck.files == [zoo["f32"]] and ck.path == zoo["f32"].parent


def test_host_open_model_picks_the_gguf_loader(zoo, adaptkit_pm):
    ck = adaptkit_pm.open_model(zoo["mixed"])
    try:
        assert ck.loader == "adaptkit:gguf" and ck.source_format == "gguf:Q4_1+Q8_0"
    finally:
        ck.close()


def test_inspect_json_reports_the_loader(zoo, adaptkit_cli):
    r = adaptkit_cli("inspect", zoo["mixed"], "--json", "--tensors")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    orig = _state(zoo["tiny"])
    assert doc["loader"] == "adaptkit:gguf" and doc["files"] == ["mixed.gguf"]
    assert doc["architecture"] == "LlamaForCausalLM"
    assert doc["tensors"] == len(orig) and doc["parameters"] == sum(t.numel() for t in orig.values())
    assert doc["dtypes"] == {"F32": len(orig)}
    q = doc["quantization"]
    assert q["format"] == "gguf:Q4_1+Q8_0" and q["dequantized_on_load"] is True
    assert q["stored_dtypes"]["Q8_0"] == 1 and q["stored_dtypes"]["Q4_1"] > 1
    shapes = {t["name"]: tuple(t["shape"]) for t in doc["tensor_list"]}
    assert shapes == {n: tuple(t.shape) for n, t in orig.items()}
    r = adaptkit_cli("inspect", zoo["f32"])
    assert r.exit_code == 0 and "[adaptkit:gguf]" in r.stdout and "quantization" not in r.stdout


def _one_line_error(r, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_unsupported_architecture_is_exit_4(zoo, adaptkit_cli):
    err = _one_line_error(adaptkit_cli("inspect", zoo["qwen2"]), 4)
    assert f"{zoo['qwen2']}: GGUF architecture 'qwen2' is not supported (supported: llama)" in err


def test_garbage_file_is_exit_4(tmp_path, adaptkit_cli):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(3000))
    err = _one_line_error(adaptkit_cli("inspect", bad), 4)
    assert str(bad) in err and "not a GGUF file" in err
    html = tmp_path / "model.gguf"  # a failed download
    html.write_text("<!DOCTYPE html><html>Not found</html>")
    assert "starts with b'<!DO'" in _one_line_error(adaptkit_cli("inspect", html), 4)


def test_truncated_file_is_exit_4(zoo, tmp_path, adaptkit_cli):
    data = zoo["f32"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    err = _one_line_error(adaptkit_cli("inspect", cut), 4)
    assert str(cut) in err and "truncated" in err


def test_every_truncation_and_corruption_is_a_checkpoint_error(zoo, tmp_path):
    """Cut the file anywhere in its header, or flip header bytes: a CheckpointError naming the file (or, for a
    harmless flip, a file that still opens) -- never another exception."""
    data = zoo["mixed"].read_bytes()
    with open_gguf(zoo["mixed"]) as ck:
        header_end = min(i.offset for i in (ck.info(n) for n in ck.names()))
    p = tmp_path / "t.gguf"
    cuts = sorted(set(list(range(0, 64)) + list(range(64, header_end, max(1, header_end // 300))) + [header_end]))
    for n in cuts:
        p.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as exc:
            open_gguf(p).close()
        assert str(p) in str(exc.value)
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, header_end, 300):
        b = bytearray(data[: header_end + 4096])
        b[pos] ^= 0xFF
        p.write_bytes(bytes(b))
        try:
            open_gguf(p).close()
        except CheckpointError as e:
            assert str(p) in str(e)


def _patch_type(data: bytes, tensor: str, new_type: int) -> bytes:
    """Overwrite the GGML type id of ``tensor`` in a GGUF's tensor table."""
    key = struct.pack("<Q", len(tensor)) + tensor.encode()
    i = data.rindex(key) + len(key)
    (ndim,) = struct.unpack_from("<I", data, i)
    j = i + 4 + 8 * ndim
    return data[:j] + struct.pack("<I", new_type) + data[j + 4:]


def test_unsupported_tensor_types_are_named(zoo, tmp_path):
    # Q8_K, a type gguf cannot dequantize, for blk.0.ffn_down (64 rows of 256 = one 292-byte Q8_K block each)
    raw = np.random.default_rng(0).integers(0, 255, size=(64, 292), dtype=np.uint8)
    path = write_gguf_with_raw(zoo["tiny"], tmp_path / "q8k.gguf", "blk.0.ffn_down.weight", raw, Q.Q8_K)
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_down.weight' has type Q8_K, which the installed gguf"):
        open_gguf(path)
    data = zoo["f32"].read_bytes()
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(_patch_type(data, "blk.1.attn_v.weight", 200))  # a type id gguf does not know at all
    with pytest.raises(CheckpointError, match="'blk.1.attn_v.weight' has GGML type id 200, unknown"):
        open_gguf(bad)
    bad.write_bytes(_patch_type(data, "blk.1.attn_v.weight", int(Q.I32)))
    with pytest.raises(CheckpointError, match="integer type I32"):
        open_gguf(bad)


def write_gguf_with_raw(src: Path, out: Path, name: str, raw: np.ndarray, qtype) -> Path:
    """``write_gguf`` with tensor ``name`` replaced by raw quantized bytes of type ``qtype``."""
    from safetensors.numpy import load_file

    sd = load_file(str(src / "model.safetensors"))
    hf = next(h for h in sd if _gguf_name(h) == name)
    tmp = out.with_suffix(".src")
    tmp.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (tmp / f.name).write_bytes(f.read_bytes())
    from safetensors.numpy import save_file

    save_file({k: v for k, v in sd.items() if k != hf}, str(tmp / "model.safetensors"))
    return write_gguf(tmp, out, extra_tensors={name: (raw, qtype)})


def test_missing_tensor_wrong_shape_and_split_files(zoo, tmp_path):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(zoo["tiny"] / "model.safetensors"))
    src = tmp_path / "src"
    src.mkdir()
    for f in zoo["tiny"].iterdir():
        if f.name != "model.safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'blk.1.ffn_up.weight' is missing"):
        open_gguf(write_gguf(src, tmp_path / "missing.gguf"))
    with pytest.raises(CheckpointError, match="'blk.1.ffn_up.weight' has shape \\[256, 32\\] but the metadata implies \\[256, 64\\]"):
        open_gguf(write_gguf(src, tmp_path / "shape.gguf",
                             extra_tensors={"blk.1.ffn_up.weight": np.zeros((256, 32), np.float32)}))
    with pytest.raises(CheckpointError, match="'blk.1.ffn_upx.weight' has no Hugging Face Llama counterpart"):
        open_gguf(write_gguf(src, tmp_path / "extra.gguf",
                             extra_tensors={"blk.1.ffn_up.weight": np.zeros((256, 64), np.float32),
                                            "blk.1.ffn_upx.weight": np.zeros((4,), np.float32)}))
    with pytest.raises(CheckpointError, match="split GGUF \\(3 files\\).*llama-gguf-split --merge"):
        open_gguf(write_gguf(zoo["tiny"], tmp_path / "split.gguf",
                             extra_kv={"add_uint16": ("split.count", 3)}))


# -- merge / quantize through the CLI (other sides of the loader registry) -----------------------------------


def test_merge_takes_a_gguf_model(zoo, tmp_path, adaptkit_cli):
    import yaml
    from safetensors.torch import load_file

    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(zoo["f32"]), "parameters": {"weight": 0.5}},
        {"model": str(zoo["tiny"]), "parameters": {"weight": 0.5}}]}))
    r = adaptkit_cli("merge", cfg, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, ref in _state(zoo["tiny"]).items():
        torch.testing.assert_close(out[name], ref, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_quantize_requantizes_a_gguf(zoo, tmp_path, adaptkit_cli):
    r = adaptkit_cli("quantize", zoo["mixed"], tmp_path / "refused", "--method", "rtn", "--group-size", "32")
    assert r.exit_code == 4 and "--requantize" in r.stderr and not (tmp_path / "refused").exists()
    r = adaptkit_cli("quantize", zoo["mixed"], tmp_path / "q", "--method", "rtn", "--requantize",
                     "--group-size", "32", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "gptq"
    assert (tmp_path / "q" / "tokenizer.json").is_file()


def test_gptq_calibrates_on_a_gguf_input(zoo, tmp_path, adaptkit_cli):
    """GPTQ runs the model: config and tokenizer come from the GGUF file itself (no conversion step), and the
    result equals GPTQ on the loader's own safetensors export of the same weights and tokenizer."""
    from safetensors.torch import load_file, save_file

    from adaptkit.formats.gguf import open_gguf

    args = ["--method", "gptq", "--requantize", "--group-size", "32", "--calib", "builtin-pydoc",
            "--nsamples", "4", "--seqlen", "32"]
    r = adaptkit_cli("quantize", zoo["mixed"], tmp_path / "from-gguf", *args)
    assert r.exit_code == 0, r.stderr
    exported = tmp_path / "exported"
    exported.mkdir()
    with open_gguf(zoo["mixed"]) as ck:
        save_file({n: ck.get(n).contiguous() for n in ck.names()}, str(exported / "model.safetensors"))
        ck.write_aux(exported, config=True)
    r = adaptkit_cli("quantize", exported, tmp_path / "from-folder", *[a for a in args if a != "--requantize"])
    assert r.exit_code == 0, r.stderr
    a = load_file(str(tmp_path / "from-gguf" / "model.safetensors"))
    b = load_file(str(tmp_path / "from-folder" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- the real model ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_gguf_equals_the_cached_conversion(smollm2):
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from adaptkit.testing.realmodel import smollm2_gguf

    path, _ = smollm2_gguf()
    t0 = time.perf_counter()
    ck = open_gguf(path)
    opened = time.perf_counter() - t0
    try:
        assert ck.source_format == "gguf:Q4_1+Q8_0"
        cached = json.loads((smollm2 / "config.json").read_text())
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "architectures"):
            assert ck.config[key] == cached[key], key
        theta = cached.get("rope_theta") or cached["rope_parameters"]["rope_theta"]
        assert ck.config["rope_theta"] == theta
        t0 = time.perf_counter()
        with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as st:
            assert sorted(st.keys()) == sorted(ck.names())
            for name in ck.names():
                assert torch.equal(ck.get(name), st.get_tensor(name)), name
        read = time.perf_counter() - t0
        # independently of the cache (which this loader now writes): gguf-py's reader and dequantization with
        # transformers' reverse q/k permutation
        reader = gguf.GGUFReader(str(path))
        proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
        by_name = {t.name: t for t in reader.tensors}
        for gname, hf in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                          ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight"),
                          ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
                          ("token_embd.weight", "model.embed_tokens.weight")):
            t = by_name[gname]
            w = proc.process(gguf.quants.dequantize(t.data, t.tensor_type), gname).weights
            assert torch.equal(ck.get(hf), torch.from_numpy(np.ascontiguousarray(w))), hf
    finally:
        ck.close()
    print(f"\nSmolLM2 GGUF: open {opened * 1000:.0f} ms, read+dequantize all {read:.1f} s")
