"""SFT with every adapter kind on a tiny random Llama. The artifact is checked from the outside: the adapter
(or full model) is loaded with plain transformers + PEFT and must lower the answer tokens' NLL, computed here
from the chat template, below the base's; the QLoRA base is rebuilt from the recorded base_quantization."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from .conftest import chat_rows, read_log, run_recipe, write_jsonl, write_recipe

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

ROWS = chat_rows(12)

#: (kind, learning rate, adapter extras); small steps on a tiny model, rates big enough to move the loss
KINDS = {
    "lora": (5e-3, {}),
    "qlora": (5e-3, {}),
    "dora": (5e-3, {}),
    "rslora": (2e-3, {}),
    "adalora": (1e-2, {}),
    "ia3": (5e-2, {}),
    "full": (2e-3, {}),
    "prompt_tuning": (5e-2, {"num_virtual_tokens": 4}),
    "prefix_tuning": (5e-2, {"num_virtual_tokens": 4}),
}


def answer_nll(model, tok, rows) -> float:
    """Mean NLL of the assistant turn (its text and end-of-turn), located by rendering the prompt alone."""
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(r["messages"], tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"]
            assert ids[: len(p_ids)] == p_ids
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            tgt = x[0, 1:]
            lp = logp[torch.arange(len(tgt)), tgt][len(p_ids) - 1:]
            total -= float(lp.sum())
            n += len(lp)
    return total / n


def _load(kind: str, base: Path, out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(out)
    if kind == "full":
        return AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(base), tok
    kw = {}
    if kind == "qlora":
        q = json.loads((out / "adaptkit.json").read_text())["base_quantization"]
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"], bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]))
    from peft import PeftModel

    plain = AutoModelForCausalLM.from_pretrained(base, **kw)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kw), out)
    return adapted.eval(), plain.eval(), tok


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ("adalora", "prefix_tuning") else k
                                  for k in KINDS])
def test_sft_adapter_kind_learns_and_publishes(kind, train_host, tiny_llama, tmp_path) -> None:
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    data = write_jsonl(tmp_path / "chat.jsonl", ROWS)
    lr, extra = KINDS[kind]
    recipe = write_recipe(tmp_path / "r.yml", base=str(base), method="sft", data={"train": str(data)},
                          adapter={"kind": kind, "r": 8, **extra},
                          training={"max_steps": 8, "batch_size": 4, "learning_rate": lr, "max_seq_len": 64,
                                    "lr_scheduler": "constant"}, seed=1)
    out = tmp_path / "out"
    result = run_recipe(train_host, recipe, out)
    assert result.steps == 8 and result.tokens > 0

    doc = json.loads((out / "adaptkit.json").read_text())
    assert doc["kind"] == "train" and doc["recipe"]["adapter"]["kind"] == kind
    assert doc["base"]["sha256"] == {"model.safetensors": hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()}
    assert {"trl", "peft", "transformers", "torch"} <= set(doc["versions"])
    if kind == "qlora":
        assert doc["base_quantization"] == {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                            "compute_dtype": "float32"}
    else:
        assert doc["base_quantization"] is None
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "chat_template.jinja", "train_log.jsonl", "README.md", "adaptkit-manifest.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # safetensors only
    if kind == "full":
        assert "model.safetensors" in names and "adapter_config.json" not in names
    else:
        cfg = json.loads((out / "adapter_config.json").read_text())
        want = {"qlora": "LORA", "dora": "LORA", "rslora": "LORA"}.get(kind, kind.upper())
        assert cfg["peft_type"] == want
        assert cfg.get("use_dora", False) == (kind == "dora") and cfg.get("use_rslora", False) == (kind == "rslora")
    log = [e for e in read_log(out) if "loss" in e]
    assert [e["step"] for e in log] == list(range(1, 9))

    adapted, plain, tok = _load(kind, base, out)
    before, after = answer_nll(plain, tok, ROWS), answer_nll(adapted, tok, ROWS)
    assert math.isfinite(after) and after < before - 0.05, (before, after)
