"""Issue 12, "a mergekit config works as is": the config-level differences from mergekit 0.1.5 that
adaptkit now follows (or refuses loudly) -- a ``linear`` base not listed under ``models``, parameters another
method knows, relative paths, ``dtype: float64``. References: mergekit run side by side (skipped without it)
and float64 formulas written here, never adaptkit's own functions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptkit.cli import main
from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy

from tests.merge.zoo import base_and_two


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return base_and_two(tmp_path_factory.mktemp("compatzoo"), seed=31)


def _load(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _cli(cfg_path: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["merge", str(cfg_path), str(out), "-q", *map(str, extra)])


def _write(p: Path, cfg: dict) -> Path:
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _err_line(r) -> str:
    text = (r.stderr if hasattr(r, "stderr") else r.output).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


# -- (a) linear with a base_model that is not under models -------------------------------------------

def test_linear_unlisted_base_is_averaged_in_like_mergekit(zoo, tmp_path):
    cfg = {"merge_method": "linear", "base_model": str(zoo / "base"), "dtype": "float32",
           "parameters": {"weight": 0.5}, "models": [{"model": str(zoo / "a")}, {"model": str(zoo / "b")}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 0, r.output
    got = _load(tmp_path / "out")
    ms = [_load(zoo / n) for n in ("base", "a", "b")]
    for name, t in got.items():  # float64 reference: the plain mean of the three, rounded once
        ref = ((ms[0][name].double() + ms[1][name].double() + ms[2][name].double()) / 3).float()
        torch.testing.assert_close(t, ref, rtol=2e-7, atol=1e-9)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "not merged" not in card
    prov = json.loads((tmp_path / "out" / "adaptkit.json").read_text())
    assert all(i["merged"] for i in prov["inputs"])


def test_linear_unlisted_base_without_a_weight_is_an_error(zoo, tmp_path):
    # mergekit: RuntimeError "Missing required parameter weight for <base>..."
    cfg = {"merge_method": "linear", "base_model": str(zoo / "base"),
           "models": [{"model": str(zoo / "a"), "parameters": {"weight": 0.5}},
                      {"model": str(zoo / "b"), "parameters": {"weight": 0.5}}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 3
    line = _err_line(r)
    assert "missing required parameter 'weight'" in line and str(zoo / "base") in line
    assert not (tmp_path / "out").exists()


def test_passthrough_with_unlisted_base_is_refused_saying_why(zoo, tmp_path):
    cfg = {"merge_method": "passthrough", "base_model": str(zoo / "base"), "models": [{"model": str(zoo / "a")}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 3 and "the base_model counts" in _err_line(r)


def test_card_marks_a_model_that_is_not_merged(zoo, tmp_path):
    # slices form: a base the method does not use gives config and tokenizer only, and the card says so
    cfg = {"merge_method": "passthrough", "base_model": str(zoo / "base"),
           "slices": [{"sources": [{"model": str(zoo / "a"), "layer_range": [0, 2]}]}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    base_line = next(ln for ln in card.splitlines() if ln.startswith(f"* `{zoo / 'base'}`"))
    assert "not merged" in base_line
    a_line = next(ln for ln in card.splitlines() if ln.startswith(f"* `{zoo / 'a'}`"))
    assert "not merged" not in a_line


@pytest.mark.slow
def test_linear_unlisted_base_equals_mergekit(zoo, tmp_path):
    pytest.importorskip("mergekit")
    from tests.merge.mk_runner import run_mergekit

    cfg = {"merge_method": "linear", "base_model": str(zoo / "base"), "dtype": "float32",
           "parameters": {"weight": [0.2, 0.9]}, "models": [
               {"model": str(zoo / "a"), "parameters": {"weight": 0.3}}, {"model": str(zoo / "b")}]}
    run_mergekit(cfg, tmp_path / "mk")
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "ak")
    assert r.exit_code == 0, r.output
    ak, mk = _load(tmp_path / "ak"), _load(tmp_path / "mk")
    assert set(ak) == set(mk)
    for name in mk:
        torch.testing.assert_close(ak[name], mk[name], rtol=1e-6, atol=1e-7)


# -- (b) a parameter another method knows -----------------------------------------------------------

def test_parameter_of_another_method_is_a_warning(zoo, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": str(zoo / "base"), "parameters": {"t": 0.3},
           "models": [{"model": str(zoo / "base"), "parameters": {"weight": 1.0}},
                      {"model": str(zoo / "a"), "parameters": {"weight": 0.5}}]}
    p = _write(tmp_path / "m.yml", cfg)
    r = _cli(p, tmp_path / "out")
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1, r.stderr
    assert "'weight'" in warn[0] and "models[0].parameters, models[1].parameters" in warn[0]
    assert "'slerp' does not use it" in warn[0]
    r = _cli(p, tmp_path / "out2", "--strict")
    assert r.exit_code == 3 and "'weight'" in _err_line(r) and "--strict" in _err_line(r)
    assert not (tmp_path / "out2").exists()


def test_parameter_no_method_knows_is_an_error(zoo, tmp_path):
    cfg = {"merge_method": "ties", "base_model": str(zoo / "base"),
           "models": [{"model": str(zoo / "a"), "parameters": {"weight": 1.0, "densty": 0.5}}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 3 and "did you mean 'density'?" in _err_line(r)


# -- (e) relative model paths -------------------------------------------------------------------------

def _rel_cfg():
    return {"merge_method": "linear", "models": [{"model": "models/a", "parameters": {"weight": 1.0}}]}


def test_relative_path_resolves_against_cwd_like_mergekit(zoo, tmp_path, monkeypatch):
    work, cfgdir = tmp_path / "work", tmp_path / "cfgs"
    (work / "models").mkdir(parents=True)
    cfgdir.mkdir()
    os.symlink(zoo / "a", work / "models" / "a")
    monkeypatch.chdir(work)
    r = _cli(_write(cfgdir / "m.yml", _rel_cfg()), tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert all(torch.equal(t, _load(zoo / "a")[n]) for n, t in _load(tmp_path / "out").items())


def test_relative_path_found_only_beside_the_config(zoo, tmp_path, monkeypatch):
    cfgdir = tmp_path / "cfgs"
    (cfgdir / "models").mkdir(parents=True)
    os.symlink(zoo / "b", cfgdir / "models" / "a")
    monkeypatch.chdir(tmp_path)
    r = _cli(_write(cfgdir / "m.yml", _rel_cfg()), tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert all(torch.equal(t, _load(zoo / "b")[n]) for n, t in _load(tmp_path / "out").items())


def test_relative_path_in_both_places_is_ambiguous(zoo, tmp_path, monkeypatch):
    work, cfgdir = tmp_path / "work", tmp_path / "cfgs"
    (work / "models").mkdir(parents=True)
    (cfgdir / "models").mkdir(parents=True)
    os.symlink(zoo / "a", work / "models" / "a")
    os.symlink(zoo / "b", cfgdir / "models" / "a")
    monkeypatch.chdir(work)
    r = _cli(_write(cfgdir / "m.yml", _rel_cfg()), tmp_path / "out")
    assert r.exit_code == 3
    line = _err_line(r)
    assert "ambiguous" in line and str(zoo / "a") in line and str(zoo / "b") in line
    assert not (tmp_path / "out").exists()
    # the same folder reached both ways is not ambiguous
    os.remove(cfgdir / "models" / "a")
    os.symlink(zoo / "a", cfgdir / "models" / "a")
    assert _cli(cfgdir / "m.yml", tmp_path / "out").exit_code == 0


# -- (f) dtype: float64 computes in float64 ------------------------------------------------------------

def test_dtype_float64_computes_in_float64(zoo, tmp_path):
    w = [0.3, 0.7000000000000001, 0.1]
    cfg = {"merge_method": "linear", "dtype": "float64", "parameters": {"normalize": True}, "models": [
        {"model": str(zoo / n), "parameters": {"weight": wi}} for n, wi in zip(("base", "a", "b"), w)]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 0, r.output
    got = _load(tmp_path / "out")
    ms = [_load(zoo / n) for n in ("base", "a", "b")]
    differs_from_fp32 = 0
    for name, t in got.items():
        assert t.dtype == torch.float64
        ref = sum(wi * m[name].double() for wi, m in zip(w, ms)) / sum(w)
        torch.testing.assert_close(t, ref, rtol=1e-15, atol=1e-17)
        f32 = sum(wi * m[name].float() for wi, m in zip(w, ms)) / sum(w)
        differs_from_fp32 += int((t != f32.double()).sum())
    assert differs_from_fp32 > 0  # widening an fp32 result would not pass the float64 reference above


# -- (h) the TIES tie-break difference is never silent ---------------------------------------------------

def test_dry_run_notes_the_tiebreak_on_bf16_inputs(tmp_path):
    make_tiny_llama(tmp_path / "base", dtype="bfloat16", seed=3)
    perturbed_copy(tmp_path / "base", tmp_path / "a", seed=1, scale=0.01)
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("magnitude_tiebreak: sort" in n for n in notes)
    cfg["parameters"] = {"magnitude_tiebreak": "sort"}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out", "--dry-run", "--json")
    assert not any("magnitude_tiebreak" in n for n in json.loads(r.stdout)["notes"])


def test_typo_of_another_methods_parameter_names_it(zoo, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": str(zoo / "base"), "parameters": {"t": 0.3},
           "models": [{"model": str(zoo / "a"), "parameters": {"wieght": 0.5}}]}
    r = _cli(_write(tmp_path / "m.yml", cfg), tmp_path / "out")
    assert r.exit_code == 3
    assert "unknown key 'wieght' in models[0].parameters; did you mean 'weight'? (merge method 'slerp' does not use it)" \
        in _err_line(r)


def test_model_given_as_a_mapping(zoo, tmp_path):
    """mergekit's ``model: {model: {path: X}}`` (and for base_model) means the same as ``model: X``."""
    plain = {"merge_method": "task_arithmetic", "base_model": str(zoo / "base"),
             "models": [{"model": str(zoo / "a"), "parameters": {"weight": 0.5}}]}
    mapped = {"merge_method": "task_arithmetic", "base_model": {"model": {"path": str(zoo / "base")}},
              "models": [{"model": {"model": {"path": str(zoo / "a")}}, "parameters": {"weight": 0.5}}]}
    assert _cli(_write(tmp_path / "p.yml", plain), tmp_path / "p").exit_code == 0
    r = _cli(_write(tmp_path / "m.yml", mapped), tmp_path / "m")
    assert r.exit_code == 0, r.output
    p, m = _load(tmp_path / "p"), _load(tmp_path / "m")
    assert all(torch.equal(p[n], m[n]) for n in p)
