"""Interop with transformers: our sharded output loads with from_pretrained; save_pretrained output opens with
open_checkpoint. Tiny Llama (hidden 64, 2 layers)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adaptkit.io import ShardedWriter, TensorSpec, atomic_output_dir, copy_aux_files, open_checkpoint  # noqa: E402


def _tiny_model(dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def test_our_sharded_output_loads_with_from_pretrained(tmp_path):
    model = _tiny_model(torch.bfloat16)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        w = ShardedWriter(tmp, [TensorSpec.of(k, v) for k, v in sd.items()], max_shard_size=40_000)
        for k in reversed(list(sd)):
            w.write(k, sd[k])
        w.close()
        assert copy_aux_files(src, tmp) == ["tokenizer_config.json", "config.json"]
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).eval()
    lsd = loaded.state_dict()
    assert set(lsd) == set(sd)
    for k, v in sd.items():
        assert lsd[k].dtype == torch.bfloat16 and torch.equal(lsd[k], v), k


def test_save_pretrained_output_opens_with_open_checkpoint(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sd = model.state_dict()
    with open_checkpoint(tmp_path) as ck:
        assert set(ck.names()) == set(sd)
        assert ck.config["hidden_size"] == 64
        for k, v in sd.items():
            assert torch.equal(ck.get(k), v), k
