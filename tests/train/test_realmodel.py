"""The real model (SmolLM2-135M-Instruct, CPU): a LoRA SFT on word analogies from gensim's wheel raises the
held-out accuracy over the base; the DPO and GRPO example recipes run to completion on it."""
from __future__ import annotations

import json
import sys

import pytest

from .conftest import EXAMPLES, run_recipe

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]
pytest.importorskip("trl")
pytest.importorskip("torch")


@pytest.fixture
def analogy():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import analogy as mod
    except ImportError:  # pragma: no cover
        pytest.skip("examples/train/analogy.py not importable")
    finally:
        sys.path.remove(str(EXAMPLES))
    try:
        mod.questions_file()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return mod


def test_shipped_analogy_data_is_the_deterministic_build(analogy, tmp_path) -> None:
    train, test = analogy.build(tmp_path, n_train=640, n_test=100)
    assert train.read_text() == (EXAMPLES / "data" / "analogy-train.jsonl").read_text()
    assert test.read_text() == (EXAMPLES / "data" / "analogy-test.jsonl").read_text()
    q_train = {r["messages"][0]["content"] for r in map(json.loads, train.read_text().splitlines())}
    q_test = {r["messages"][0]["content"] for r in map(json.loads, test.read_text().splitlines())}
    assert not q_train & q_test  # held out


def test_lora_sft_raises_held_out_analogy_accuracy(analogy, smollm2, train_host, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ADAPTKIT_TRAIN_BASE", str(smollm2))
    out = tmp_path / "out"
    result = run_recipe(train_host, EXAMPLES / "smollm2-analogy.yml", out)
    rows = [json.loads(x) for x in (EXAMPLES / "data" / "analogy-test.jsonl").read_text().splitlines()]
    before = analogy.accuracy(smollm2, rows)
    after = analogy.accuracy(smollm2, rows, adapter=out)
    with capsys.disabled():
        print(f"\nanalogy held-out accuracy ({len(rows)} questions), first word / anywhere in the reply: "
              f"base {before['first_word']:.3f} / {before['contains']:.3f} -> LoRA SFT {after['first_word']:.3f} / "
              f"{after['contains']:.3f} ({result.steps} steps, {result.seconds:.0f} s, "
              f"{result.metrics.get('tokens_per_second', 0):.0f} tokens/s, eval loss {result.metrics['eval_loss']:.3f})")
    assert after["first_word"] >= before["first_word"] + 0.3, (before, after)
    assert after["contains"] > before["contains"], (before, after)


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_example_recipe_on_smollm2(name, smollm2, train_host, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTKIT_TRAIN_BASE", str(smollm2))
    out = tmp_path / "out"
    result = run_recipe(train_host, EXAMPLES / f"{name}.yml", out)
    doc = json.loads((out / "adaptkit.json").read_text())
    assert result.steps >= 1 and doc["base"]["path"] == str(smollm2)
    assert (out / "adapter_model.safetensors").is_file()
    assert any("pad token == eos token" in w for w in doc["result"]["warnings"])  # SmolLM2 pads with <|im_end|>
