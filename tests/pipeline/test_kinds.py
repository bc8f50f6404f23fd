"""The train, merge-adapter, eval and verify kinds in a pipeline on a tiny Llama: the LoRA trained by the
train step, merged by the merge-adapter step, equals PEFT's own merge of that adapter; eval and verify steps
report what ``adaptkit eval`` / ``adaptkit verify`` report for the same models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import one_error, write_pipeline
from .test_run import tensors

torch = pytest.importorskip("torch")


def chat_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                          {"role": "assistant", "content": str(2 * a)}]} for a in range(10, 10 + n)]


def _recipe(data: Path) -> dict:
    return {"method": "sft", "data": {"train": str(data)},
            "adapter": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
            "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 64}, "seed": 0}


@pytest.mark.slow  # ~25-40 s on 2 cores (TRL's start-up, a trained LoRA, PEFT's reference merge)
def test_train_then_merge_adapter_equals_peft_merge(adaptkit_cli, tiny_llama, tmp_path):
    pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    doc = {"output": "out", "inputs": {"base": str(base)}, "steps": [
        {"name": "sft", "train": {"base": "base", "recipe": _recipe(data)}},
        {"name": "merged", "merge-adapter": {"base": "base", "adapters": ["sft"]}},
    ]}
    p = write_pipeline(tmp_path / "p.yml", doc)
    r = adaptkit_cli("run", p, "--json")
    assert r.exit_code == 0, r.stderr
    steps = {s["name"]: s for s in json.loads(r.stdout)["steps"]}
    assert steps["sft"]["summary"]["steps"] == 3
    adapter = Path(steps["sft"]["output"])
    assert (adapter / "adapter_model.safetensors").is_file()
    prov = json.loads((adapter / "adaptkit.json").read_text())
    assert prov["base"]["path"] == str(base)  # the step's base replaced the recipe's

    # reference: PEFT loads the adapter onto the base and merges it itself
    ref_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                               str(adapter)).merge_and_unload()
    ref = {k: v.detach() for k, v in ref_model.state_dict().items()}
    mine = tensors(Path(steps["merged"]["output"]))
    changed = 0
    for name, t in mine.items():
        torch.testing.assert_close(t, ref[name], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(t, tensors(base)[name])
    assert changed >= 14  # every linear moved

    # a changed recipe value through 'set' retrains; the rest of the file is unchanged
    r = adaptkit_cli("run", p, "--json")
    assert [s["status"] for s in json.loads(r.stdout)["steps"]] == ["cached", "cached"]
    doc["steps"][0]["train"]["set"] = {"training.max_steps": 2}
    write_pipeline(p, doc)
    r = adaptkit_cli("run", p, "--json")
    steps2 = {s["name"]: s for s in json.loads(r.stdout)["steps"]}
    assert [s["status"] for s in steps2.values()] == ["ran", "ran"] and steps2["sft"]["summary"]["steps"] == 2


def test_train_step_bad_recipe_is_found_before_anything_runs(adaptkit_cli, tiny_llama, tmp_path):
    pytest.importorskip("trl")
    base = tiny_llama()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    recipe = _recipe(data)
    recipe["training"]["lerning_rate"] = 1.0
    doc = {"inputs": {"base": str(base)}, "steps": [
        {"name": "m", "merge": {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1}}]}},
        {"name": "sft", "train": {"base": "m", "recipe": recipe}}]}
    p = write_pipeline(tmp_path / "p.yml", doc)
    r = adaptkit_cli("run", p)
    assert r.exit_code == 3 and "did you mean 'learning_rate'" in one_error(r)
    assert not (tmp_path / "p.out").exists()


def test_eval_and_verify_steps_report_what_the_commands_report(adaptkit_cli, tiny_llama, tmp_path):
    pytest.importorskip("adaptkit_eval")
    base = tiny_llama()
    gates = tmp_path / "gates.yml"
    gates.write_text("version: 1\nlimit: 8\nbits_per_byte:\n  tasks: [flores_eng]\n  max_increase: 0.5\n")
    doc = {"output": "out", "inputs": {"base": str(base)}, "steps": [
        {"name": "q", "quantize": {"model": "base", "method": "rtn", "bits": 8, "group_size": 32}},
        {"name": "ev", "eval": {"model": "q", "baseline": "base", "tasks": ["perplexity:flores_eng"], "limit": 8}},
        {"name": "check", "verify": {"model": "q", "baseline": "base", "gates": "gates.yml"}},
    ]}
    p = write_pipeline(tmp_path / "p.yml", doc)
    r = adaptkit_cli("run", p, "--json")
    assert r.exit_code == 0, r.stderr
    steps = {s["name"]: s for s in json.loads(r.stdout)["steps"]}
    q = steps["q"]["output"]
    cli = adaptkit_cli("eval", q, "--baseline", base, "--tasks", "perplexity:flores_eng", "--limit", "8", "--json",
                       "--out", tmp_path / "rep", "--no-progress")
    assert cli.exit_code == 0, cli.stderr
    want = {(m["task"], m["metric"]): m["value"] for m in json.loads(cli.stdout)["metrics"]}
    got = {(m["task"], m["metric"]): m["value"] for m in steps["ev"]["summary"]["metrics"]}
    assert got == want and ("flores_eng", "bits_per_byte") in got
    assert (Path(steps["ev"]["output"]) / "eval.json").is_file()
    assert steps["check"]["summary"]["verdict"] == "pass"
    assert (Path(steps["check"]["output"]) / "verify.json").is_file()

    # a gate that fails: the verify step fails (exit 7), nothing published for it, earlier steps kept
    gates.write_text("version: 1\nlimit: 8\nbits_per_byte:\n  tasks: [flores_eng]\n  max_increase: -1.0\n")
    r = adaptkit_cli("run", p)
    assert r.exit_code == 7, r.stderr
    err = one_error(r)
    assert "step 'check' (verify) failed" in err and "failed on flores_eng" in err and "--from check" in err
    state = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    by = {s["name"]: s for s in state["steps"]}
    assert by["q"]["status"] == "cached" and by["check"]["status"] == "failed"
    assert not Path(by["check"]["output"]).exists()
