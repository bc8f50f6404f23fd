"""``adaptkit merge`` through the CLI (Click's CliRunner on ``adaptkit.cli.main``) with the built-in
methods: every bad input is a one-line error with its documented exit code and nothing at OUT; --dry-run
reads headers only; --json; reproducibility across --threads; the example configs validate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptkit.cli import main
from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy

from tests.merge.zoo import base_and_two

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "merge"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = base_and_two(tmp_path_factory.mktemp("clizoo"), seed=21)
    make_tiny_llama(root / "wide", hidden_size=96, num_heads=4, num_kv_heads=2, seed=22)
    make_tiny_llama(root / "deep", num_layers=3, seed=23)
    make_tiny_llama(root / "bigvocab", vocab_size=576, seed=24)
    # another tokenizer family: the same number of rows, no token string in common
    shutil.copytree(root / "b", root / "alien")
    tok = json.loads((root / "alien" / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {f"alien_{i}": i for i in range(len(tok["model"]["vocab"]))}
    tok["model"]["merges"] = []
    for e in tok["added_tokens"]:
        e["content"] = "alien_" + e["content"]
    (root / "alien" / "tokenizer.json").write_text(json.dumps(tok))
    # NaN in the data of the last tensor written; the header is fine
    shutil.copytree(root / "b", root / "nan")
    t = load_file(str(root / "nan" / "model.safetensors"))
    w = t["model.norm.weight"].clone()
    w[5] = float("inf")
    t["model.norm.weight"] = w
    save_file(t, str(root / "nan" / "model.safetensors"), metadata={"format": "pt"})
    # a pickle-only checkpoint
    (root / "pickled").mkdir()
    shutil.copy(root / "a" / "config.json", root / "pickled" / "config.json")
    torch.save(load_file(str(root / "a" / "model.safetensors")), root / "pickled" / "pytorch_model.bin")
    return root


def _run(args, cwd=None):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write(root: Path, name: str, cfg: dict) -> Path:
    p = root / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


TIES = {"merge_method": "ties", "base_model": "base", "models": [
    {"model": "a", "parameters": {"weight": 0.5, "density": 0.6}},
    {"model": "b", "parameters": {"weight": 0.5, "density": 0.6}}], "dtype": "bfloat16"}


def _one_line_error(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "patch,code,needles",
    [
        (lambda c: c["models"][1]["parameters"].update({"densty": c["models"][1]["parameters"].pop("density")}), 3,
         ["merge.yml: unknown key 'densty' in models[1].parameters; did you mean 'density'?"]),
        (lambda c: c.update({"merge_methd": c.pop("merge_method")}), 3, ["unknown key 'merge_methd'", "'merge_method'"]),
        (lambda c: c["models"][0].update({"parameter": {}}), 3, ["unknown key 'parameter' in models[0]", "'parameters'"]),
        (lambda c: c.update({"merge_method": "tiez"}), 3, ["unknown merge method 'tiez'", "did you mean 'ties'"]),
        (lambda c: c.pop("base_model"), 3, ["'ties' needs a base_model"]),
        (lambda c: c["models"][0]["parameters"].update({"density": 1.5}), 3, ["density", "<= 1.0"]),
        (lambda c: c.update({"dtype": "bfloat61"}), 3, ["unknown dtype 'bfloat61'"]),
        (lambda c: c["models"][1].update({"model": "wide"}), 4, ["mismatched architectures: hidden_size is 64 in 'base' but 96 in 'wide'"]),
        (lambda c: c["models"][1].update({"model": "deep"}), 4, ["different layer counts"]),
        (lambda c: (c["models"][1].update({"model": "alien"}), c.update({"tokenizer_source": "base"})), 4,
         ["vocabularies cannot be aligned: model 'alien' has rows for only 0 of the 512 tokens"]),
        (lambda c: c["models"][1].update({"model": "nan"}), 4, ["model 'nan': tensor 'model.norm.weight' contains Inf"]),
        (lambda c: c["models"][1].update({"model": "pickled"}), 4, ["pickle", "--allow-pickle"]),
        (lambda c: c["models"][1].update({"model": "someorg/some-model"}), 4, ["not a local folder", "never downloads"]),
    ],
    ids=["param-typo", "top-typo", "model-key-typo", "unknown-method", "no-base", "range", "dtype", "shape",
         "layers", "vocab", "nan", "pickle", "hub-id"],
)
def test_bad_input_one_line_error_nothing_written(zoo, tmp_path, patch, code, needles):
    cfg = json.loads(json.dumps(TIES))
    patch(cfg)
    cfg_path = _write(zoo, f"merge-{tmp_path.name}.yml", cfg)
    try:
        shutil.copy(cfg_path, zoo / "merge.yml")
        out = tmp_path / "out"
        r = _run(["merge", zoo / "merge.yml", out, "-q"])
        _one_line_error(r, code, *needles)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temp folder left beside OUT
    finally:
        cfg_path.unlink()


def test_missing_tensor_listed(zoo, tmp_path):
    d = load_file(str(zoo / "a" / "model.safetensors"))
    (tmp_path / "lacking").mkdir()
    shutil.copy(zoo / "a" / "config.json", tmp_path / "lacking" / "config.json")
    save_file({k: v for k, v in d.items() if "layers.1.mlp" not in k}, str(tmp_path / "lacking" / "model.safetensors"))
    cfg = json.loads(json.dumps(TIES))
    cfg["base_model"] = str(zoo / "base")
    cfg["models"][0]["model"] = str(zoo / "a")
    cfg["models"][1]["model"] = "lacking"
    r = _run(["merge", _write(tmp_path, "m.yml", cfg), tmp_path / "out"])
    _one_line_error(r, 4, "model 'lacking' lacks tensors", "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists()


def test_output_target_errors(zoo, tmp_path):
    cfg_path = _write(zoo, "ok.yml", TIES)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = _run(["merge", cfg_path, tmp_path / "full", "-q"])
    _one_line_error(r, 5)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    r = _run(["merge", cfg_path, tmp_path / "afile" / "out", "-q"])
    _one_line_error(r, 5)
    # OUT may not overlap an input model, even with --force
    r = _run(["merge", cfg_path, zoo / "a", "-q", "--force"])
    _one_line_error(r, 5, "overlaps the input model folder")
    assert (zoo / "a" / "model.safetensors").is_file()
    r = _run(["merge", cfg_path, zoo / "a" / "sub", "-q"])
    _one_line_error(r, 5, "overlaps")
    assert not (zoo / "a" / "sub").exists()
    # a missing parent folder is created
    r = _run(["merge", cfg_path, tmp_path / "new" / "deeper" / "out", "-q"])
    assert r.exit_code == 0, r.output
    # --force replaces a non-empty OUT
    r = _run(["merge", cfg_path, tmp_path / "full", "-q", "--force"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "model.safetensors").is_file()


def test_dry_run_reads_headers_only(zoo, tmp_path):
    # the NaN model passes a dry run (no tensor data is read) but fails the real merge
    cfg = json.loads(json.dumps(TIES))
    cfg["models"][1]["model"] = "nan"
    cfg_path = _write(zoo, "dry.yml", cfg)
    r = _run(["merge", cfg_path, tmp_path / "out", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "tensors: 21" in r.output and "estimated peak memory" in r.output
    assert not (tmp_path / "out").exists()
    r = _run(["merge", cfg_path, tmp_path / "out", "--dry-run", "--json"])
    doc = json.loads(r.output)
    a = load_file(str(zoo / "a" / "model.safetensors"))
    n = sum(v.numel() for v in a.values())
    assert doc["tensors"] == len(a) and doc["bytes_read"] == 3 * 4 * n and doc["bytes_written"] == 2 * n
    assert doc["dry_run"] is True


def test_json_summary_and_slerp_fallback_count(zoo, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "a2"}],
           "parameters": {"t": 0.5}}
    shutil.copytree(zoo / "a", tmp_path / "a2")
    shutil.copytree(zoo / "a", tmp_path / "a")
    r = _run(["merge", _write(tmp_path, "s.yml", cfg), tmp_path / "out", "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    n = len(load_file(str(zoo / "a" / "model.safetensors")))
    # identical models: every tensor is collinear, so every one falls back to lerp
    assert doc["tensors"] == n and doc["stats"]["slerp_lerp_fallback"] == n
    assert doc["method"] == "slerp" and "model.safetensors" in doc["files"]


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_bit_identical_across_threads(zoo, tmp_path, method):
    from adaptkit.threads import available_cores

    if available_cores() < 2:
        pytest.skip("one core: --threads 2 is refused here")
    cfg = dict(json.loads(json.dumps(TIES)), merge_method=method)
    cfg_path = _write(zoo, f"{method}-threads.yml", cfg)
    for threads in ("1", "2"):
        r = _run(["merge", cfg_path, tmp_path / threads, "-q", "--threads", threads, "--seed", "7"])
        assert r.exit_code == 0, r.output
    a = (tmp_path / "1" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "2" / "model.safetensors").read_bytes()
    r = _run(["merge", cfg_path, tmp_path / "3", "-q", "--seed", "7"])
    assert (tmp_path / "3" / "model.safetensors").read_bytes() == a


def test_bad_threads_is_one_line_and_writes_nothing(zoo, tmp_path):
    import os

    cfg_path = _write(zoo, "threads-bad.yml", json.loads(json.dumps(TIES)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for value, needle in (("0", "--threads 0: use a whole number from 1 to"),
                          (str(cores + 1), f"--threads {cores + 1}: this machine has {cores} cores")):
        r = _run(["merge", cfg_path, tmp_path / "out", "-q", "--threads", value])
        assert r.exit_code == 3, r.output
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], r.output
        assert not (tmp_path / "out").exists()


def test_merged_model_loads_and_outputs_are_complete(zoo, tmp_path):
    cfg = json.loads(json.dumps(TIES))
    cfg["chat_template"] = "chatml"
    r = _run(["merge", _write(zoo, "full.yml", cfg), tmp_path / "out", "-q", "--max-shard-size", "100KB"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json",
            "README.md", "mergekit_config.yml", "chat_template.jinja"} <= names
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "ties" and Path(recipe["base_model"]).is_absolute()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    ids = tok("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits.float()).all()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yml")))
def test_examples_validate(example, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "example-models"
    if not (root / "models" / "model-b").exists():
        make_tiny_llama(root / "models" / "base", seed=31)
        perturbed_copy(root / "models" / "base", root / "models" / "model-a", seed=1)
        perturbed_copy(root / "models" / "base", root / "models" / "model-b", seed=2)
    shutil.copy(EXAMPLES / example, root / example)
    r = _run(["merge", root / example, root / f"out-{example}", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "tensors:" in r.output


def test_tokenizer_source(zoo, tmp_path):
    for name in ("base", "a", "b"):
        shutil.copytree(zoo / name, tmp_path / name)
    cfg_b = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    cfg_b["model_max_length"] = 12345  # mark b's tokenizer
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(cfg_b))
    cfg = json.loads(json.dumps(TIES))
    # a model's tokenizer is copied
    r = _run(["merge", _write(tmp_path, "t1.yml", {**cfg, "tokenizer_source": "b"}), tmp_path / "o1", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o1" / "tokenizer_config.json").read_text())["model_max_length"] == 12345
    assert json.loads((tmp_path / "o1" / "tokenizer_config.json").read_text()) == cfg_b
    # union of identical tokenizers is that tokenizer
    r = _run(["merge", _write(tmp_path, "t2.yml", {**cfg, "tokenizer_source": "union"}), tmp_path / "o2", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o2" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    # a token beyond b's embedding rows has no embedding: not part of the union (mergekit's rule), so the
    # union is still the base's tokenizer (tests/merge/test_vocab_alignment.py covers real unions)
    tok = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 999, "content": "<extra>"})
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(tok))
    r = _run(["merge", _write(tmp_path, "t3.yml", {**cfg, "tokenizer_source": "union"}), tmp_path / "o3", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o3" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    # chat_template: auto takes the inputs' (most common) template
    r = _run(["merge", _write(tmp_path, "t4.yml", {**cfg, "chat_template": "auto"}), tmp_path / "o4", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o4" / "chat_template.jinja").read_text() == (tmp_path / "a" / "chat_template.jinja").read_text()
