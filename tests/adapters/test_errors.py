"""Bad input: each is a one-line error with the documented exit code, and nothing is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

INPUT, CONFIG = 4, 3


def _assert_refused(res, code: int, *needles: str, out: Path | None = None) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary output left"


@pytest.fixture
def lora(bases, adapter_factory):
    from peft import LoraConfig

    return adapter_factory(bases["llama"], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           name="good")[0]


def test_adapter_of_another_base_shape_mismatch(bases, lora, adaptkit_cli, tmp_path):
    from adaptkit.testing import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=32, num_layers=2, intermediate_size=96)
    out = tmp_path / "out"
    res = adaptkit_cli("merge-adapter", other, lora, out)
    _assert_refused(res, INPUT, "another base", "model.layers.0.self_attn.q_proj.weight", out=out)


def test_adapter_with_wrong_target_module_names(bases, adapter_factory, adaptkit_cli, tmp_path):
    from peft import LoraConfig

    gpt2_adapter, _ = adapter_factory(bases["gpt2"], LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    out = tmp_path / "out"
    res = adaptkit_cli("merge-adapter", bases["llama"], gpt2_adapter, out)
    _assert_refused(res, INPUT, "transformer.h.0.attn.c_attn", "another model", out=out)


@pytest.mark.parametrize("damage,needle", [
    ("missing", "no adapter_config.json"),
    ("not-json", "not valid JSON"),
    ("not-object", "must be a JSON object"),
    ("no-peft-type", "'peft_type'"),
    ("bad-r", "'r' must be a positive integer"),
    ("rank-mismatch", "has rank 4 but adapter_config.json 'r' says 3"),
    ("residual-init", "init_lora_weights='pissa'"),
])
def test_missing_or_malformed_adapter_config(damage, needle, lora, bases, adaptkit_cli, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    cfg_path = bad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if damage == "missing":
        cfg_path.unlink()
    elif damage == "not-json":
        cfg_path.write_text("{'r': 4,")
    elif damage == "not-object":
        cfg_path.write_text("[1, 2]")
    else:
        if damage == "no-peft-type":
            del cfg["peft_type"]
        elif damage == "bad-r":
            cfg["r"] = "four"
        elif damage == "rank-mismatch":
            cfg["r"] = 3
        elif damage == "residual-init":
            cfg["init_lora_weights"] = "pissa"
        cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_refused(adaptkit_cli("merge-adapter", bases["llama"], bad, out), INPUT, needle, out=out)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_adapters_cannot_be_merged(kind, bases, adaptkit_cli, tmp_path):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from tests.adapters.conftest import load_fp32

    cfg = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4) if kind == "prompt"
           else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ad = tmp_path / kind
    get_peft_model(load_fp32(bases["llama"]), cfg).save_pretrained(str(ad))
    out = tmp_path / "out"
    _assert_refused(adaptkit_cli("merge-adapter", bases["llama"], ad, out), INPUT, "cannot be merged", out=out)
    # still inspectable
    res = adaptkit_cli("inspect", ad, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["loader"] == "adaptkit:peft-adapter"


def test_pickle_adapter_is_refused(lora, bases, adaptkit_cli, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(lora, bad)
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    out = tmp_path / "out"
    _assert_refused(adaptkit_cli("merge-adapter", bases["llama"], bad, out), INPUT, "adapter_model.bin", "pickle",
                    out=out)
    _assert_refused(adaptkit_cli("inspect", bad), INPUT, "pickle")


def test_into_adapter_different_ranks_need_a_rule(bases, lora, adapter_factory, adaptkit_cli, tmp_path):
    from peft import LoraConfig

    r8, _ = adapter_factory(bases["llama"], LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]), name="r8")
    out = tmp_path / "out"
    res = adaptkit_cli("merge-adapter", bases["llama"], lora, r8, out, "--into-adapter")
    _assert_refused(res, CONFIG, "different ranks", "--rank", out=out)
    res = adaptkit_cli("merge-adapter", bases["llama"], lora, r8, out, "--into-adapter", "--rank", "6", "-q")
    assert res.exit_code == 0, res.output


def test_into_adapter_different_bases(bases, lora, adaptkit_cli, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(lora, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = adaptkit_cli("merge-adapter", bases["llama"], lora, other, out, "--into-adapter")
    _assert_refused(res, INPUT, "different bases", "--assume-same-base", out=out)
    res = adaptkit_cli("merge-adapter", bases["llama"], lora, other, out, "--into-adapter", "--assume-same-base", "-q")
    assert res.exit_code == 0, res.output


def test_into_adapter_refuses_dora_and_bad_weights(bases, lora, adapter_factory, adaptkit_cli, tmp_path):
    from peft import LoraConfig

    dora, _ = adapter_factory(bases["llama"], LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), name="dora")
    out = tmp_path / "out"
    _assert_refused(adaptkit_cli("merge-adapter", bases["llama"], lora, dora, out, "--into-adapter"), CONFIG,
                    "plain LoRA", out=out)
    _assert_refused(adaptkit_cli("merge-adapter", bases["llama"], lora, out, "--weights", "1,2"), CONFIG,
                    "2 weight(s) for 1 adapter", out=out)
    _assert_refused(adaptkit_cli("merge-adapter", bases["llama"], lora, lora, out, "--into-adapter", "-m", "nope"),
                    CONFIG, "unknown merge method", out=out)


def test_extract_refuses_other_model(bases, adaptkit_cli, tmp_path):
    from adaptkit.testing import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=32, num_layers=2, intermediate_size=96)
    out = tmp_path / "out"
    _assert_refused(adaptkit_cli("extract-lora", other, bases["llama"], out, "--rank", "2"), INPUT,
                    "cannot change shapes", out=out)
    _assert_refused(adaptkit_cli("extract-lora", bases["llama"], bases["llama"], out, "--rank", "2", "-q"), INPUT,
                    "nothing to extract", out=out)


def test_inspect_summarises_an_adapter(lora, adaptkit_cli):
    res = adaptkit_cli("inspect", lora, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["loader"] == "adaptkit:peft-adapter" and doc["tensors"] == 8 and doc["files"] == ["adapter_model.safetensors"]


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from adaptkit.cli import main\n"
            "for cmd in (['merge-adapter', '--help'], ['extract-lora', '--help']):\n"
            "    try: main(cmd, standalone_mode=False)\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
