"""Every recipe in examples/train runs on a tiny random Llama (the base comes from $ADAPTKIT_TRAIN_BASE)."""
from __future__ import annotations

import json

import pytest
import yaml

from .conftest import EXAMPLES, run_recipe

pytest.importorskip("trl")

SLOW = {"kto", "smollm2-analogy"}  # ~9 s each on 2 cores: `make test-slow`
RECIPES = sorted(p.stem for p in EXAMPLES.glob("*.yml"))


def test_one_example_per_method_and_sft_adapter_kind() -> None:
    docs = [yaml.safe_load((EXAMPLES / f"{n}.yml").read_text()) for n in RECIPES]
    methods = {d["method"] for d in docs}
    kinds = {d["adapter"]["kind"] for d in docs if d["method"] == "sft"}
    assert methods == {"sft", "dpo", "kto", "orpo", "simpo", "grpo", "reward"}
    assert kinds == {"full", "lora", "qlora", "dora", "rslora", "adalora", "ia3", "prompt_tuning", "prefix_tuning"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in RECIPES])
def test_example_recipe_runs(name, train_host, tiny_llama, tmp_path, monkeypatch) -> None:
    if name == "sft-qlora":
        pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    monkeypatch.setenv("ADAPTKIT_TRAIN_BASE", str(base))
    out = tmp_path / "out"
    result = run_recipe(train_host, EXAMPLES / f"{name}.yml", out)
    raw = yaml.safe_load((EXAMPLES / f"{name}.yml").read_text())
    doc = json.loads((out / "adaptkit.json").read_text())
    assert doc["recipe"]["base"] == str(base) and doc["recipe"]["method"] == raw["method"]
    assert result.steps == raw["training"]["max_steps"]
    if raw["adapter"]["kind"] == "full":
        assert (out / "model.safetensors").is_file()
    else:
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    assert not (tmp_path / ".out.adaptkit-train").exists()  # checkpoints removed once published
