"""Issue 12 (c): multi-stage configs (mergekit-multi's format: several YAML documents, `name:` on each stage,
later stages naming earlier ones). References: float64 formulas of the stages' math (and, slow, mergekit run
stage by stage)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptkit.cli import main

from tests.merge.zoo import base_and_two


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return base_and_two(tmp_path_factory.mktemp("stages"), seed=71)


def _load(d):
    return load_file(str(Path(d) / "model.safetensors"))


TWO_STAGES = """\
name: first-merge
merge_method: linear
dtype: float32
models:
  - model: {a}
  - model: {b}
parameters:
  weight: 0.5
---
# the output (no name)
merge_method: linear
dtype: float32
models:
  - model: first-merge
    parameters: {{weight: 0.25}}
  - model: {base}
    parameters: {{weight: 0.75}}
"""


def _cli(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


def test_two_stages_compose(zoo, tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(TWO_STAGES.format(a=zoo / "a", b=zoo / "b", base=zoo / "base"))
    r = _cli(cfg, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    a, b, base = _load(zoo / "a"), _load(zoo / "b"), _load(zoo / "base")
    out = _load(tmp_path / "out")
    for n, t in out.items():
        first = ((a[n].double() + b[n].double()) / 2).float()  # stage 1, rounded once to its fp32 output
        ref = (0.25 * first.double() + 0.75 * base[n].double()).float()
        torch.testing.assert_close(t, ref, rtol=3e-7, atol=1e-9)
    # no intermediate left beside OUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml", "out"]


def test_intermediate_dir_keeps_named_stages(zoo, tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(TWO_STAGES.format(a=zoo / "a", b=zoo / "b", base=zoo / "base"))
    r = _cli(cfg, tmp_path / "out", "-q", "--intermediate-dir", tmp_path / "inter")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "inter" / "first-merge" / "model.safetensors").is_file()


def test_dry_run_lists_the_stages(zoo, tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(TWO_STAGES.format(a=zoo / "a", b=zoo / "b", base=zoo / "base"))
    r = _cli(cfg, tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["stage"] for s in doc["stages"]] == ["first-merge", None]
    assert doc["stages"][1]["after"] == ["first-merge"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needle", [
    ("name: one\nmerge_method: linear\nmodels: [{{model: two, parameters: {{weight: 1}}}}]\n---\n"
     "name: two\nmerge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n",
     "models[0].model refers to stage 'two', which comes later (document 2)"),
    ("name: one\nmerge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n---\n"
     "merge_method: linear\nmodels: [{{model: three, parameters: {{weight: 1}}}}]\n",
     "models[0].model 'three' is neither an earlier stage (one) nor a local model"),
    ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n---\n"
     "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n",
     "only the last document may be unnamed"),
    ("name: one\nmerge_method: linear\nmodels: [{{model: one, parameters: {{weight: 1}}}}]\n",
     "refers to itself"),
    ("name: x\nmerge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n---\n"
     "name: x\nmerge_method: linear\nmodels: [{{model: x, parameters: {{weight: 1}}}}]\n",
     "the name 'x' is used by document 1 too"),
])
def test_bad_stage_references_are_one_line_errors(zoo, tmp_path, text, needle):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(text.format(a=zoo / "a"))
    r = _cli(cfg, tmp_path / "out", "-q")
    assert r.exit_code == 3, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]


@pytest.mark.slow
def test_three_stages_equal_mergekit_stage_by_stage(zoo, tmp_path):
    """mergekit-multi's documented example shape (linear -> slerp on it -> ties on that), run by mergekit one
    stage at a time with the earlier outputs substituted, against adaptkit's single multi-stage run."""
    pytest.importorskip("mergekit")
    import yaml

    from tests.merge.mk_runner import run_mergekit

    A, B, BASE = str(zoo / "a"), str(zoo / "b"), str(zoo / "base")
    s1 = {"merge_method": "linear", "dtype": "float32", "models": [{"model": A}, {"model": B}],
          "parameters": {"weight": 0.5}}
    s2 = {"merge_method": "slerp", "dtype": "float32", "base_model": "first-merge",
          "models": [{"model": "first-merge"}, {"model": BASE}], "parameters": {"t": 0.3}}
    s3 = {"merge_method": "ties", "dtype": "float32", "base_model": BASE, "models": [
        {"model": "second-merge", "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": A, "parameters": {"weight": 0.5, "density": 0.8}}],
        "parameters": {"magnitude_tiebreak": "sort", "election_precision": "compute"}}
    text = yaml.safe_dump({"name": "first-merge", **s1}) + "---\n" + yaml.safe_dump({"name": "second-merge", **s2}) \
        + "---\n" + yaml.safe_dump(s3)
    (tmp_path / "multi.yml").write_text(text)
    r = _cli(tmp_path / "multi.yml", tmp_path / "ak", "-q")
    assert r.exit_code == 0, r.output
    run_mergekit(s1, tmp_path / "mk1")
    sub = lambda c: json.loads(json.dumps(c).replace('"first-merge"', json.dumps(str(tmp_path / "mk1")))  # noqa: E731
                               .replace('"second-merge"', json.dumps(str(tmp_path / "mk2"))))
    run_mergekit(sub(s2), tmp_path / "mk2")
    s3_mk = sub(s3)
    s3_mk["parameters"] = {}
    run_mergekit(s3_mk, tmp_path / "mk3")
    ak, mk = _load(tmp_path / "ak"), _load(tmp_path / "mk3")
    assert set(ak) == set(mk)
    for n in mk:
        torch.testing.assert_close(ak[n], mk[n], rtol=1e-5, atol=1e-6)


def test_library_merge_runs_stages_too(zoo, tmp_path):
    from adaptkit.merge.engine import merge

    cfg = tmp_path / "multi.yml"
    cfg.write_text(TWO_STAGES.format(a=zoo / "a", b=zoo / "b", base=zoo / "base"))
    merge(cfg, tmp_path / "lib")
    r = _cli(cfg, tmp_path / "cli", "-q")
    assert r.exit_code == 0
    lib, cli = _load(tmp_path / "lib"), _load(tmp_path / "cli")
    assert all(torch.equal(lib[n], cli[n]) for n in cli)
