"""``adaptkit verify`` refuses broken checkpoints: exit 4, one stderr line naming the file and the rule, and the
JSON report lists the finding. Each case corrupts a fresh tiny Llama at the byte level (tests/verify/_corrupt.py,
independent of adaptkit's reader). Where transformers loads the broken checkpoint without an error, the test
shows that too: that is why these checks exist."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from tests.verify import _corrupt


def _verify(adaptkit_cli, path: Path, tmp_path: Path, *extra: str):
    res = adaptkit_cli("verify", path, "--json", "--no-progress", "--out", tmp_path / "report", *extra)
    doc = json.loads(res.stdout) if res.stdout.strip() else None
    return res, doc


def _assert_refused(res, doc, *, file: str, rule: str) -> None:
    assert res.exit_code == 4, (res.exit_code, res.stdout[-2000:], res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert file in lines[0], lines[0]
    assert f"[rule {rule}]" in lines[0] or any(f"[rule {rule}]" in e for e in doc["errors"]), (lines[0], doc["errors"])
    assert doc["verdict"] == "broken" and doc["exit_code"] == 4
    hits = [f for c in doc["checks"] for f in c["findings"]
            if f"{f['check']}/{f['rule']}" == rule and file in f["message"]]
    assert hits, doc["errors"]


def _transformers_loads(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    _model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return info


def test_clean_tiny_model_passes(tiny_llama, adaptkit_cli, tmp_path):
    res, doc = _verify(adaptkit_cli, tiny_llama(), tmp_path)
    assert res.exit_code == 0, res.stderr
    assert doc["verdict"] == "pass" and not doc["errors"]
    assert doc["load"]["route"] == "transformers"


def test_truncated_shard(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors", rule="safetensors-header/truncated")


def test_header_length_beyond_file(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw) + 4096) + raw[8:])
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors",
                    rule="safetensors-header/header-length")


def test_overlapping_offsets(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    header, data = _corrupt.read(p)
    second = _corrupt.tensors_in_data_order(header)[1]
    b, e = header[second]["data_offsets"]
    header[second]["data_offsets"] = [b - 4, e - 4]  # starts inside the first tensor
    _corrupt.write(p, header, data)
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors",
                    rule="safetensors-header/overlapping-offsets")


def test_duplicate_header_key(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    header, data = _corrupt.read(p)
    last = _corrupt.tensors_in_data_order(header)[-1]
    text = json.dumps(header)
    text = text[:-1] + f", {json.dumps(last)}: {json.dumps(header[last])}" + "}"  # the same key twice
    _corrupt.write(p, text, data)
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors",
                    rule="safetensors-header/duplicate-key")


def test_unknown_dtype(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    header, data = _corrupt.read(p)
    header["model.norm.weight"]["dtype"] = "F7"
    _corrupt.write(p, header, data)
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors",
                    rule="safetensors-header/unknown-dtype")


def test_nan_tensor(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    header, data = _corrupt.read(p)
    b, _e = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]
    data = data[:b] + struct.pack("<ff", math.nan, math.inf) + data[b + 8:]
    _corrupt.write(p, header, data)
    info = _transformers_loads(m)  # transformers loads NaN weights without a word
    assert not info["missing_keys"] and not info["unexpected_keys"]
    res, doc = _verify(adaptkit_cli, m, tmp_path)
    _assert_refused(res, doc, file="model.safetensors", rule="finite/non-finite")
    assert "model.layers.0.mlp.up_proj.weight" in res.stderr and "1 NaN and 1 Inf" in res.stderr


def test_missing_tensor(tiny_llama, adaptkit_cli, tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny_llama()
    p = m / "model.safetensors"
    tensors = load_file(str(p))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(p), metadata={"format": "pt"})
    info = _transformers_loads(m)  # transformers re-initialises it and only reports it in the loading info
    assert info["missing_keys"] == {"model.layers.1.mlp.down_proj.weight"}
    res, doc = _verify(adaptkit_cli, m, tmp_path)
    _assert_refused(res, doc, file="model.safetensors", rule="expected-tensors/missing-tensor")
    assert "model.layers.1.mlp.down_proj.weight" in res.stderr


def test_extra_unreferenced_shard(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    shards = _corrupt.shard(m)
    res, doc = _verify(adaptkit_cli, m, tmp_path)  # the clean sharded copy passes
    assert res.exit_code == 0, res.stderr
    (m / "model-00003-of-00003.safetensors").write_bytes((m / shards[1]).read_bytes())  # a stale leftover
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model-00003-of-00003.safetensors",
                    rule="index/unreferenced-shard")


def test_index_path_outside_the_folder(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    shards = _corrupt.shard(m)
    outside = m.parent / "outside.safetensors"
    outside.write_bytes((m / shards[1]).read_bytes())
    idx = m / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    for name, rel in doc["weight_map"].items():
        if rel == shards[1]:
            doc["weight_map"][name] = "../outside.safetensors"
    idx.write_text(json.dumps(doc))
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors.index.json",
                    rule="index/path-outside-folder")


def test_vocab_config_mismatch(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    cfg = json.loads((m / "config.json").read_text())
    cfg["vocab_size"] += 88
    (m / "config.json").write_text(json.dumps(cfg))
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors", rule="config/vocab-rows")


def test_pickle_file_present(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle stream (protocol 2, an empty dict)
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="pytorch_model.bin",
                    rule="format-policy/pickle-refused")


def test_pickle_detected_by_content_not_name(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    (m / "weights.data").write_bytes(b"\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00}\x94.")
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="weights.data", rule="format-policy/pickle-refused")


def test_manifest_hash_mismatch(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    res, doc = _verify(adaptkit_cli, m, tmp_path, "--manifest", "write")
    assert res.exit_code == 0 and (m / "adaptkit-manifest.json").is_file(), res.stderr
    res, _ = _verify(adaptkit_cli, m, tmp_path, "--manifest", "check")
    assert res.exit_code == 0, res.stderr
    with open(m / "config.json", "a") as fh:
        fh.write("\n")  # still valid JSON, different bytes
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="config.json", rule="manifest/hash-mismatch")


# -- more rules --------------------------------------------------------------------------------------


def test_stale_index_names_a_tensor_the_shard_lacks(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    shards = _corrupt.shard(m)
    idx = m / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["model.norm.weight"] = shards[0] if doc["weight_map"]["model.norm.weight"] != shards[0] \
        else shards[1]
    idx.write_text(json.dumps(doc))
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors.index.json",
                    rule="index/tensor-not-in-shard")


def test_wrong_total_size(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    _corrupt.shard(m)
    idx = m / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["metadata"]["total_size"] += 2
    idx.write_text(json.dumps(doc))
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="model.safetensors.index.json", rule="index/total-size")


def test_token_id_outside_vocabulary(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    gen = json.loads((m / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], 100000]
    (m / "generation_config.json").write_text(json.dumps(gen))
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="generation_config.json", rule="config/token-id-range")


def test_layer_count_mismatch(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    cfg = json.loads((m / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (m / "config.json").write_text(json.dumps(cfg))
    _assert_refused(*_verify(adaptkit_cli, m, tmp_path), file="config.json", rule="config/layer-count")


def test_no_metadata_and_no_chat_template_are_warnings(tiny_llama, adaptkit_cli, tmp_path):
    m = tiny_llama()
    p = m / "model.safetensors"
    header, data = _corrupt.read(p)
    header.pop("__metadata__", None)
    _corrupt.write(p, header, data)
    (m / "chat_template.jinja").unlink()
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    info = _transformers_loads(m)  # transformers 5 loads a file without metadata
    assert not info["missing_keys"]
    res, doc = _verify(adaptkit_cli, m, tmp_path)
    assert res.exit_code == 0, res.stderr
    rules = {w.split("[rule ")[1].rstrip("]") for w in doc["warnings"]}
    assert {"safetensors-header/no-metadata", "tokenizer/chat-template-missing"} <= rules


def test_missing_model_files_is_one_line_exit_4(adaptkit_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "nope"):
        res = adaptkit_cli("verify", target, "--no-progress", "--out", tmp_path / "r")
        assert res.exit_code == 4
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(target) in lines[0], res.stderr


@pytest.mark.parametrize("what", ["scales", "config"])
def test_quantization_config_inconsistent_with_tensors(what, tiny_llama, adaptkit_cli, tmp_path):
    pytest.importorskip("adaptkit_quant")
    m = tiny_llama()
    q = tmp_path / "q"
    res = adaptkit_cli("quantize", m, q, "--method", "rtn", "--group-size", "32")
    assert res.exit_code == 0, res.stderr
    (q / "adaptkit-manifest.json").unlink()
    if what == "scales":
        p = q / "model.safetensors"
        header, data = _corrupt.read(p)
        name = "model.layers.0.self_attn.q_proj.scales"
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [rows * 2, cols // 2]  # same bytes, the wrong groups
        _corrupt.write(p, header, data)
        rule, file = "quantization/shape", "model.safetensors"
    else:
        cfg = json.loads((q / "config.json").read_text())
        cfg["quantization_config"]["bits"] = 8  # the tensors are 4-bit
        (q / "config.json").write_text(json.dumps(cfg))
        rule, file = "quantization/shape", "model.safetensors"
    _assert_refused(*_verify(adaptkit_cli, q, tmp_path), file=file, rule=rule)
