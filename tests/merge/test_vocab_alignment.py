"""Issue 12 (d): vocabulary alignment by token string, on the cases of mergekit 0.1.5's
``tests/test_tokenizer.py`` rebuilt on adaptkit's tiny Llamas (base: 512 tokens / 512 rows; chatml: +2 added
tokens, 514 rows; padded: +4 added tokens beyond its 512 rows), run side by side with mergekit; plus the
cases where mergekit fails and adaptkit does the right thing. The reference is mergekit's output and the
documented rules (rows looked up by token string here), never adaptkit's alignment code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptkit.cli import main
from adaptkit.testing.tiny import make_tiny_llama

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def vz(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vocab")
    make_tiny_llama(root / "base", seed=61)
    make_tiny_llama(root / "chatml", vocab_size=514, seed=62)
    t = AutoTokenizer.from_pretrained(root / "chatml")
    t.add_tokens(["<|new_a|>", "<|new_b|>"])
    t.save_pretrained(root / "chatml")
    make_tiny_llama(root / "padded", seed=63)
    t = AutoTokenizer.from_pretrained(root / "padded")
    t.add_tokens([f"<UNUSED_{i}>" for i in range(4)])
    t.save_pretrained(root / "padded")
    return root


def vocab_of(d: Path) -> dict[str, int]:
    tok = json.loads((Path(d) / "tokenizer.json").read_text())
    v = dict(tok["model"]["vocab"])
    v.update({e["content"]: e["id"] for e in tok["added_tokens"]})
    return v


def tok_at(d: Path, i: int) -> str:
    return next(t for t, j in vocab_of(d).items() if j == i)


def run_ak(cfg: dict, out: Path):
    p = out.parent / f"{out.name}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return CliRunner().invoke(main, ["merge", str(p), str(out), "-q"])


def _cfg(vz, models, method="linear", **kw):
    cfg = {"merge_method": method, "base_model": str(vz / "base"), "dtype": "float32",
           "models": [{"model": str(vz / m), "parameters": {"weight": 1.0}} for m in models]}
    cfg.update(kw)
    return cfg


def _cases(vz):
    C, B = str(vz / "chatml"), str(vz / "base")
    t10, t11, t20, t21 = (tok_at(vz / "base", i) for i in (10, 11, 20, 21))
    return {
        "source_base": _cfg(vz, ["base", "padded", "chatml"], tokenizer_source="base"),
        "source_union": _cfg(vz, ["base", "padded", "chatml"], tokenizer_source="union"),
        "source_model": _cfg(vz, ["base", "padded", "chatml"], tokenizer_source=C),
        "slerp_union": {**_cfg(vz, ["base", "chatml"], method="slerp", tokenizer_source="union"),
                        "parameters": {"t": 0.5}, "models": [{"model": B}, {"model": C}]},
        "force_token": _cfg(vz, ["base", "chatml"], tokenizer={
            "source": "union", "tokens": {t10: {"source": C, "force": True}, t11: {"source": B, "force": True}}}),
        "model_token_id": _cfg(vz, ["base", "chatml"], tokenizer={"source": "base", "tokens": {
            t20: {"source": {"kind": "model_token", "model": C, "token_id": 512}, "force": True},
            t21: {"source": {"kind": "model_token", "model": B, "token": "<s>"}, "force": True}}}),
        "pad_to_multiple_of": {**_cfg(vz, ["chatml"], tokenizer={"source": "base", "pad_to_multiple_of": 16}),
                               "base_model": C},
    }


CASES = ["source_base", "source_union", "source_model", "slerp_union", "force_token", "model_token_id",
         "pad_to_multiple_of"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_mergekit_tokenizer_cases_equal_mergekit(vz, tmp_path, case):
    """The 7 cases of mergekit's test_tokenizer.py that mergekit merges: same output vocabulary (strings and
    ids), same number of rows, every tensor equal to fp32 rounding."""
    pytest.importorskip("mergekit")
    from tests.merge.mk_runner import run_mergekit

    cfg = _cases(vz)[case]
    run_mergekit(cfg, tmp_path / "mk", copy_tokenizer=True)
    r = run_ak(cfg, tmp_path / "ak")
    assert r.exit_code == 0, r.output
    assert vocab_of(tmp_path / "ak") == vocab_of(tmp_path / "mk")
    ak, mk = load_file(str(tmp_path / "ak" / "model.safetensors")), load_file(str(tmp_path / "mk" / "model.safetensors"))
    assert set(ak) == set(mk)
    for name in mk:
        assert ak[name].shape == mk[name].shape, name
        torch.testing.assert_close(ak[name], mk[name], rtol=1e-6, atol=1e-6)
    cfg_out = json.loads((tmp_path / "ak" / "config.json").read_text())
    assert cfg_out["vocab_size"] == ak[EMB].shape[0]


def test_union_rows_follow_the_documented_rules(vz, tmp_path):
    """Union of base (512), padded (512 rows; its 4 added tokens have no rows) and chatml (514): 514 tokens,
    the <UNUSED_i> tokens left out; a token only chatml has takes chatml's row in every model's aligned
    tensor, so a weight-1 normalized linear merge gives exactly chatml's row."""
    r = run_ak(_cases(vz)["source_union"], tmp_path / "ak")
    assert r.exit_code == 0, r.output
    v = vocab_of(tmp_path / "ak")
    assert len(v) == 514 and not any(t.startswith("<UNUSED_") for t in v)
    out = load_file(str(tmp_path / "ak" / "model.safetensors"))
    chat = load_file(str(vz / "chatml" / "model.safetensors"))
    cv = vocab_of(vz / "chatml")
    for tok in ("<|new_a|>", "<|new_b|>"):
        torch.testing.assert_close(out[EMB][v[tok]], chat[EMB][cv[tok]], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(out[HEAD][v[tok]], chat[HEAD][cv[tok]], rtol=1e-6, atol=1e-8)
    # a token every model has: the plain average of the three rows (float64 reference, rounded once)
    tok = tok_at(vz / "base", 100)
    rows = [load_file(str(vz / m / "model.safetensors"))[EMB][vocab_of(vz / m)[tok]].double()
            for m in ("base", "padded", "chatml")]
    torch.testing.assert_close(out[EMB][v[tok]], (sum(rows) / 3).float(), rtol=1e-6, atol=1e-8)


def test_padded_tokenizer_source_gets_zero_rows_with_a_note(vz, tmp_path):
    """mergekit 0.1.5 raises KeyError when the tokenizer source has tokens beyond its embedding rows;
    adaptkit gives the output one row per token of the source's tokenizer (516), zeros for the four no model
    has a row for, and says so -- never a 516-token tokenizer on a 512-row embedding."""
    cfg = _cfg(vz, ["base", "padded", "chatml"], tokenizer_source=str(vz / "padded"))
    p = tmp_path / "m.yml"
    p.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["merge", str(p), str(tmp_path / "plan"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert any("4 output tokens have an embedding row in no model" in n for n in json.loads(r.stdout)["notes"])
    r = run_ak(cfg, tmp_path / "ak")
    assert r.exit_code == 0, r.output
    v = vocab_of(tmp_path / "ak")
    out = load_file(str(tmp_path / "ak" / "model.safetensors"))
    assert len(v) == 516 and out[EMB].shape[0] == 516 and out[HEAD].shape[0] == 516
    for i in range(4):
        assert not out[EMB][v[f"<UNUSED_{i}>"]].any()
    assert json.loads((tmp_path / "ak" / "config.json").read_text())["vocab_size"] == 516


def test_legacy_mode_with_different_sizes_aligns_to_the_base(vz, tmp_path):
    """No tokenizer_source, different row counts: mergekit 0.1.5 refuses (size mismatch); adaptkit aligns to
    the base's tokenizer and notes it -- the result is mergekit's 'truncate to the smallest' when, as here,
    the models share the base's token ids."""
    cfg = _cfg(vz, ["base", "padded", "chatml"])
    r = run_ak(cfg, tmp_path / "ak")
    assert r.exit_code == 0, r.output
    out = load_file(str(tmp_path / "ak" / "model.safetensors"))
    rows = [load_file(str(vz / m / "model.safetensors"))[EMB][:512].double() for m in ("base", "padded", "chatml")]
    torch.testing.assert_close(out[EMB], (sum(rows) / 3).float(), rtol=1e-6, atol=1e-8)


def test_unalignable_vocabularies_are_a_one_line_error(vz, tmp_path):
    shutil.copytree(vz / "chatml", tmp_path / "alien")
    tok = json.loads((tmp_path / "alien" / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {f"x{i}": i for i in range(len(tok["model"]["vocab"]))}
    tok["model"]["merges"] = []
    for e in tok["added_tokens"]:
        e["content"] = "x" + e["content"]
    (tmp_path / "alien" / "tokenizer.json").write_text(json.dumps(tok))
    cfg = _cfg(vz, ["base"], tokenizer_source="union")
    cfg["models"].append({"model": str(tmp_path / "alien"), "parameters": {"weight": 1.0}})
    r = run_ak(cfg, tmp_path / "out")
    assert r.exit_code == 4
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "vocabularies cannot be aligned" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokenizer,needle", [
    ({"source": "union", "tokens": {"<not-a-token>": {"source": {"kind": "zero"}}}}, "is not a token of the output"),
    ({"source": "base", "tokens": {"<s>": {"source": {"kind": "model_token", "model": "BASE", "token_id": 9999}}}},
     "out of range"),
    ({"source": "base", "pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive integer"),
])
def test_bad_tokenizer_blocks(vz, tmp_path, tokenizer, needle):
    tokenizer = json.loads(json.dumps(tokenizer).replace("BASE", str(vz / "base")))
    cfg = _cfg(vz, ["base", "chatml"], tokenizer=tokenizer)
    r = run_ak(cfg, tmp_path / "out")
    assert r.exit_code == 3, r.output
    assert needle in r.output and not (tmp_path / "out").exists()


def test_tokenizer_source_and_block_must_agree(vz, tmp_path):
    cfg = _cfg(vz, ["base", "chatml"], tokenizer_source="base", tokenizer={"source": "union"})
    r = run_ak(cfg, tmp_path / "out")
    assert r.exit_code == 3 and "disagree" in r.output


def test_residual_weight_is_accepted_with_a_warning(vz, tmp_path):
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(vz / "base"), "layer_range": [0, 2]}], "residual_weight": 0.5}]}
    p = tmp_path / "m.yml"
    p.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["merge", str(p), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    assert "slices[0].residual_weight is ignored" in r.stderr
    r = CliRunner().invoke(main, ["merge", str(p), str(tmp_path / "out2"), "-q", "--strict"])
    assert r.exit_code == 3


def test_recipe_names_tokenizer_block_models_by_absolute_path(vz, tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(vz)
    t10 = tok_at(vz / "base", 10)
    cfg = {"merge_method": "linear", "base_model": "base", "models": [
        {"model": "base", "parameters": {"weight": 1.0}}, {"model": "chatml", "parameters": {"weight": 1.0}}],
        "tokenizer": {"source": "union", "tokens": {t10: {"source": "chatml", "force": True}}}}
    r = run_ak(cfg, tmp_path / "ak")
    assert r.exit_code == 0, r.output
    recipe = yaml.safe_load((tmp_path / "ak" / "mergekit_config.yml").read_text())
    assert recipe["tokenizer"]["tokens"][t10]["source"] == os.path.realpath(vz / "chatml")
