"""The recipe schema: strict keys with the nearest-key hint, defaults, environment and --set overrides,
format inference from the first row. No torch is imported here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from adaptkit.errors import ConfigError
from adaptkit.train.recipe import load_recipe, recipe_to_request

from .conftest import DATA, write_jsonl, write_recipe


def _recipe(tmp_path: Path, **extra) -> Path:
    doc = {"base": "model", "method": "sft", "data": {"train": str(DATA / "chat.jsonl")}}
    doc.update(extra)
    return write_recipe(tmp_path / "r.yml", **doc)


@pytest.mark.parametrize("extra,needle", [
    ({"trainig": {}}, "unknown key 'trainig'; did you mean 'training'?"),
    ({"training": {"learning_rat": 1e-4}}, "unknown key 'learning_rat' in training; did you mean 'learning_rate'?"),
    ({"adapter": {"knd": "lora"}}, "unknown key 'knd' in adapter; did you mean 'kind'?"),
    ({"adapter": {"kind": "qlora", "quantization": {"double_quan": True}}},
     "unknown key 'double_quan' in adapter.quantization; did you mean 'double_quant'?"),
    ({"data": {"train": {"path": "x.jsonl", "fromat": "messages"}}}, "unknown key 'fromat' in data.train; did you mean 'format'?"),
    ({"rewards": [{"name": "regex", "wieght": 2}]}, "unknown key 'wieght' in rewards[0]; did you mean 'weight'?"),
    ({"training": {"batch_size": 0}}, "training.batch_size: Input should be greater than or equal to 1"),
    ({"training": {"lr_scheduler": "cosin"}}, "training.lr_scheduler"),
    ({"device": "tpu"}, "device: must be auto, cpu, cuda or cuda:N"),
])
def test_typos_and_bad_values_are_one_line_errors(tmp_path, extra, needle) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(_recipe(tmp_path, **extra))
    msg = err.value.one_line()
    assert needle in msg and msg.startswith("r.yml: ") and "\n" not in msg


def test_missing_required_key(tmp_path) -> None:
    p = write_recipe(tmp_path / "r.yml", base="m", data={"train": "x.jsonl"})
    with pytest.raises(ConfigError, match="r.yml: missing required key 'method'"):
        load_recipe(p)


def test_paths_are_relative_to_the_recipe_and_defaults_fill_in(tmp_path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    p = write_recipe(tmp_path / "sub" / "r.yml", base="${MYBASE}", method="dpo", data={"train": "pairs.jsonl"},
                     adapter={"kind": "qlora", "r": 4})
    monkeypatch.setenv("MYBASE", "../models/base")
    rec, raw = load_recipe(p, ["training.max_steps=7", "options.beta=0.2"])
    req = recipe_to_request(rec, root=p.parent, raw=raw)
    assert req.model == tmp_path / "sub" / "../models/base"
    assert req.train_data.path == tmp_path / "sub" / "pairs.jsonl"
    assert req.train_data.format == "preference"  # inferred from the first row
    assert req.settings.max_steps == 7 and req.options == {"beta": 0.2}
    assert req.adapter.alpha == 8.0  # 2 * r
    assert req.adapter.base_quantization == {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                             "compute_dtype": "auto"}
    assert req.settings.bf16 is None and req.settings.gradient_checkpointing is None
    assert raw["training"]["max_steps"] == 7 and req.recipe is raw


def test_unset_environment_variable_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("NOPE_BASE", raising=False)
    with pytest.raises(ConfigError, match=r"environment variable 'NOPE_BASE' is not set"):
        load_recipe(_recipe(tmp_path, base="${NOPE_BASE}"))
    rec, _ = load_recipe(_recipe(tmp_path, base="${NOPE_BASE:-fallback}"))
    assert rec.base == "fallback"


@pytest.mark.parametrize("extra,needle", [
    ({"training": {"eval_every": 5}}, "eval_every needs an eval split"),
    ({"training": {"early_stopping_patience": 2}}, "early_stopping_patience needs training.eval_every"),
    ({"adapter": {"kind": "lora", "quantization": {}}}, "only used with adapter kind 'qlora'"),
    ({"adapter": {"kind": "lora", "num_virtual_tokens": 4}}, "only used with prompt_tuning/prefix_tuning"),
    ({"rewards": ["regex", "regex"]}, "reward 'regex' is listed twice"),
])
def test_inconsistent_settings(tmp_path, extra, needle) -> None:
    rec, raw = load_recipe(_recipe(tmp_path, **extra))
    with pytest.raises(ConfigError, match=needle):
        recipe_to_request(rec, root=tmp_path, raw=raw)


def test_unrecognisable_rows_ask_for_a_format(tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "r"}])
    rec, raw = load_recipe(_recipe(tmp_path, data={"train": str(data)}))
    with pytest.raises(ConfigError, match=r"row 1 has fields question, reply, which fit no dataset format"):
        recipe_to_request(rec, root=tmp_path, raw=raw)


def test_recipe_module_imports_no_torch() -> None:
    import subprocess

    code = ("import sys; import adaptkit.train.recipe, adaptkit.train.runner, adaptkit.cli.train, adaptkit_trl.plugin;"
            " print('torch' in sys.modules, 'trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_train_help_imports_no_torch() -> None:
    import subprocess

    code = ("import sys\nfrom adaptkit.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--resume" in r.stdout and "--nproc" in r.stdout and r.stdout.strip().endswith("TORCH False")
