"""Bad input stops ``adaptkit train`` before any training: one line on stderr naming the file/row/field and
the rule, a non-zero exit, and nothing written (neither OUT nor its checkpoint folder)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .conftest import DATA, chat_rows, write_jsonl, write_recipe

pytest.importorskip("trl")


def _check_failed(r, out: Path, code: int, needle: str) -> None:
    lines = r.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("error: ")]
    assert r.exit_code == code, r.stderr
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def setup(tmp_path, tiny_llama):
    base = tiny_llama()
    return tmp_path, base


def _run(adaptkit_cli, tmp_path, base, **doc):
    full = {"base": str(base), "method": "sft", "data": {"train": str(DATA / "chat.jsonl")},
            "training": {"max_steps": 1, "batch_size": 2, "max_seq_len": 64}}
    full.update(doc)
    recipe = write_recipe(tmp_path / "r.yml", **full)
    out = tmp_path / "out"
    return adaptkit_cli("train", recipe, "--output", out), out


def test_row_missing_a_field(adaptkit_cli, setup) -> None:
    tmp_path, base = setup
    rows = [{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    r, out = _run(adaptkit_cli, tmp_path, base, data={"train": str(data), "format": "prompt_completion"})
    _check_failed(r, out, 3, f"train data {data}: row 4 (line 4): field 'completion' is missing")


def test_malformed_row(adaptkit_cli, setup) -> None:
    tmp_path, base = setup
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(chat_rows(1)[0]) + "\n{\"messages\": [\n")
    r, out = _run(adaptkit_cli, tmp_path, base, data={"train": str(data)})
    _check_failed(r, out, 3, f"train data {data}: line 2: not valid JSON")


def test_format_that_does_not_fit_the_method(adaptkit_cli, setup) -> None:
    tmp_path, base = setup
    r, out = _run(adaptkit_cli, tmp_path, base, data={"train": str(DATA / "preference.jsonl")})
    _check_failed(r, out, 3, "trainer 'sft' does not train on 'preference' rows (it takes: messages, prompt_completion, text)")
    r, out = _run(adaptkit_cli, tmp_path, base, method="kto", data={"train": str(DATA / "preference.jsonl")})
    _check_failed(r, out, 3, "trainer 'kto' does not train on 'preference' rows (it takes: unpaired_preference)")


def test_base_that_does_not_exist(adaptkit_cli, setup) -> None:
    tmp_path, _ = setup
    r, out = _run(adaptkit_cli, tmp_path, tmp_path / "no-such-model")
    _check_failed(r, out, 4, str(tmp_path / "no-such-model"))


def test_base_that_no_loader_reads(adaptkit_cli, setup) -> None:
    tmp_path, _ = setup
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.npz").write_bytes(b"PK\x03\x04")
    r, out = _run(adaptkit_cli, tmp_path, junk)
    _check_failed(r, out, 4, "loaders tried")


def test_adapter_kind_the_method_cannot_use(adaptkit_cli, setup) -> None:
    tmp_path, base = setup
    r, out = _run(adaptkit_cli, tmp_path, base, method="dpo", data={"train": str(DATA / "preference.jsonl")},
                  adapter={"kind": "prompt_tuning"})
    _check_failed(r, out, 3, "trainer 'dpo' cannot train a 'prompt_tuning' adapter (it can: full, lora, qlora, dora, rslora)")


def test_qlora_without_bitsandbytes(adaptkit_cli, setup, monkeypatch) -> None:
    tmp_path, base = setup
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    r, out = _run(adaptkit_cli, tmp_path, base, adapter={"kind": "qlora"})
    _check_failed(r, out, 3, "adapter kind 'qlora' needs bitsandbytes")


@pytest.mark.parametrize("doc,code,needle", [
    ({"options": {"bta": 0.2}, "method": "dpo", "data": {"train": str(DATA / "preference.jsonl")}}, 3, "did you mean 'beta'"),
    ({"method": "grpo", "data": {"train": str(DATA / "prompts.jsonl")}}, 3, "trainer 'grpo' needs at least one reward"),
    ({"method": "grpo", "data": {"train": str(DATA / "prompts.jsonl")}, "rewards": ["exact_mach"]}, 3, "did you mean 'exact_match'"),
    ({"method": "grpo", "data": {"train": str(DATA / "prompts.jsonl")},
      "rewards": [{"name": "regex", "options": {"patern": "x"}}]}, 3, "regex has no option 'patern'; did you mean 'pattern'"),
    ({"method": "sftt"}, 3, "unknown trainer 'sftt'; did you mean 'sft'?"),
    ({"training": {"report_to": "wandb"}}, 3, "report_to 'wandb' needs the wandb package"),
    ({"data": {"train": str(DATA / "chat.jsonl"), "eval": str(DATA / "prompt_completion.jsonl")}}, 3,
     "format 'prompt_completion' differs from the train data's 'messages'"),
    ({"data": {"train": str(DATA / "chat.jsonl"), "eval_split": 0.01}}, 3, "eval_split 0.01 of 48 rows holds out no row"),
])
def test_recipe_values_checked_against_declarations(adaptkit_cli, setup, doc, code, needle) -> None:
    tmp_path, base = setup
    if "wandb" in str(doc) and __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    r, out = _run(adaptkit_cli, tmp_path, base, **doc)
    _check_failed(r, out, code, needle)


def test_no_label_tokens_stops_before_training(adaptkit_cli, setup) -> None:
    """Chat rows whose assistant turns the template cannot place in max_seq_len: nothing to learn from."""
    tmp_path, base = setup
    long = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}] * 4
    data = write_jsonl(tmp_path / "d.jsonl", long)
    r, out = _run(adaptkit_cli, tmp_path, base, data={"train": str(data)})
    _check_failed(r, out, 3, "no row is left to train on")
    only_user = [{"messages": [{"role": "user", "content": "hello"}]}] * 4
    data = write_jsonl(tmp_path / "d.jsonl", only_user)
    r, out = _run(adaptkit_cli, tmp_path, base, data={"train": str(data)})
    _check_failed(r, out, 3, "assistant-only loss found no assistant tokens")


def test_unsupported_library_version_is_named(adaptkit_cli, setup, monkeypatch) -> None:
    from adaptkit_trl import versions

    tmp_path, base = setup
    monkeypatch.setitem(versions.SUPPORTED, "trl", ">=99")
    r, out = _run(adaptkit_cli, tmp_path, base)
    _check_failed(r, out, 6, f"trl {versions.installed('trl')} is outside the supported range trl>=99")
    assert versions.problems({"peft": "<0.1", "transformers": ">=0"}) == [
        f"peft {versions.installed('peft')} is outside the supported range peft<0.1"]
