"""Preference and RL trainers, checked from the outside: DPO widens the chosen-vs-rejected log-prob margin
(computed here with plain transformers + PEFT), GRPO calls a reward a plugin registered with the dataset's
extra columns and logs the scores it returned, the reward model saves its scoring head."""
from __future__ import annotations

import json
import types

import pytest

from adaptkit import hookimpl
from adaptkit.registry import Reward

from .conftest import DATA, read_log, run_recipe, write_recipe

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


def _margin(model, tok, rows) -> float:
    """Mean of log p(chosen | prompt) - log p(rejected | prompt), prompt and answer tokenized apart."""
    def logp(prompt: str, answer: str) -> float:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        x = torch.tensor([p + a])
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        return float(lp[torch.arange(len(p) - 1, len(p) + len(a) - 1), x[0, len(p):]].sum())

    with torch.no_grad():
        return sum(logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows) / len(rows)


def test_dpo_widens_the_preference_margin(train_host, tiny_llama, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama()
    rows = [json.loads(x) for x in (DATA / "preference.jsonl").read_text().splitlines()][:16]
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yml", base=str(base), method="dpo", data={"train": str(data)},
                          adapter={"kind": "lora", "r": 8},
                          training={"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 64,
                                    "lr_scheduler": "constant"}, options={"beta": 0.1})
    out = tmp_path / "out"
    result = run_recipe(train_host, recipe, out)
    assert result.steps == 8 and result.metrics["final_loss"] < result.metrics["first_loss"]
    tok = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    before, after = _margin(plain, tok, rows), _margin(tuned, tok, rows)
    assert after > before + 0.1, (before, after)


def test_grpo_uses_a_plugin_reward_with_dataset_columns(adaptkit_pm_factory, tiny_llama, tmp_path) -> None:
    calls = []

    def spy_len(prompts, completions, answer, **kwargs):
        scores = [float(len(c)) for c in completions]
        calls.append((list(prompts), list(answer), scores, kwargs.get("bonus")))
        return scores

    plugin = types.SimpleNamespace(
        __name__="spy_rewards", ADAPTKIT_DISTRIBUTION="spy-rewards",
        adaptkit_register_rewards=hookimpl(lambda registry: registry.register(
            Reward(name="spy_len", impl=spy_len, params=(__import__("adaptkit.registry").registry.Param(
                "bonus", float, 0.0, scope="global"),)))))
    host = adaptkit_pm_factory(extra_plugins=[plugin])
    base = tiny_llama()
    recipe = write_recipe(tmp_path / "r.yml", base=str(base), method="grpo", data={"train": str(DATA / "prompts.jsonl")},
                          adapter={"kind": "lora", "r": 4}, rewards=[{"name": "spy_len", "options": {"bonus": 2.5}}],
                          training={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-4, "max_seq_len": 96},
                          options={"num_generations": 2, "max_completion_length": 6})
    out = tmp_path / "out"
    run_recipe(host, recipe, out)
    truth = {}
    for line in (DATA / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        truth[row["prompt"][0]["content"]] = row["answer"]
    assert calls and all(bonus == 2.5 for *_, bonus in calls)
    for prompts, answers, scores, _ in calls:
        assert len(prompts) == len(answers) == len(scores) == 4
        assert [truth[p] for p in prompts] == answers  # each completion scored with its own row's answer
    logged = [e["rewards/spy_len/mean"] for e in read_log(out) if "rewards/spy_len/mean" in e]
    assert logged[0] == pytest.approx(sum(calls[0][2]) / 4)


@pytest.mark.slow
def test_reward_model_saves_its_head(train_host, tiny_llama, tmp_path) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tiny_llama()
    recipe = write_recipe(tmp_path / "r.yml", base=str(base), method="reward", data={"train": str(DATA / "preference.jsonl")},
                          adapter={"kind": "lora", "r": 4},
                          training={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 64})
    out = tmp_path / "out"
    run_recipe(train_host, recipe, out)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in k for k in f.keys())
    tok = AutoTokenizer.from_pretrained(out)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm = PeftModel.from_pretrained(rm, out).eval()
    x = tok(["What is 1 + 1? 2", "What is 1 + 1? 3"], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = rm(**x).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
