"""Bad pipelines: every one is a single ``error:`` line, exit 3, and nothing is written (the output folder is
not even created). Validation covers the whole file before any step runs."""
from __future__ import annotations

import pytest

from .conftest import one_error, write_pipeline


def _run(adaptkit_cli, tmp_path, doc, *args):
    p = write_pipeline(tmp_path / "p.yml", doc)
    r = adaptkit_cli("run", p, *args)
    assert r.exit_code == 3, (r.exit_code, r.stdout, r.stderr)
    assert not (tmp_path / "p.out").exists()
    return one_error(r)


def _merge(base="base", *models):
    return {"merge_method": "linear", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}


@pytest.fixture
def models(tmp_path):
    """Folders named like inputs (empty: validation never opens them)."""
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    return {"base": "base", "a": "a", "b": "b"}


def test_missing_reference_names_the_step_and_the_nearest_name(adaptkit_cli, tmp_path, models):
    doc = {"inputs": models, "steps": [{"name": "m", "merge": _merge("base", "a", "bb")},
                                       {"name": "q", "quantize": {"model": "m", "method": "rtn"}}]}
    err = _run(adaptkit_cli, tmp_path, doc)
    assert "step 'm'" in err and "unknown reference 'bb'" in err and "did you mean 'b'" in err


def test_cycle_is_one_line_listing_it(adaptkit_cli, tmp_path, models):
    doc = {"inputs": models, "steps": [
        {"name": "x", "merge": _merge("base", "a", "z")},
        {"name": "y", "quantize": {"model": "x", "method": "rtn"}},
        {"name": "z", "merge": _merge("base", "y", "b")},
    ]}
    err = _run(adaptkit_cli, tmp_path, doc)
    assert "cycle" in err and ("x -> z -> y -> x" in err or "z -> y -> x -> z" in err), err


def test_self_reference(adaptkit_cli, tmp_path, models):
    doc = {"inputs": models, "steps": [{"name": "x", "merge": _merge("base", "a", "x")}]}
    assert "refers to the step itself" in _run(adaptkit_cli, tmp_path, doc)


def test_report_step_is_not_a_model(adaptkit_cli, tmp_path, models):
    doc = {"inputs": models, "steps": [{"name": "e", "eval": {"model": "a", "tasks": ["flores_eng"]}},
                                       {"name": "q", "quantize": {"model": "e", "method": "rtn"}}]}
    assert "'e' is a eval step, which writes a report" in _run(adaptkit_cli, tmp_path, doc)


@pytest.mark.parametrize("step, needle", [
    ({"name": "q", "quantize": {"model": "a", "method": "rtn", "bitz": 4}}, "unknown key 'bitz' in step 'q'.quantize; did you mean 'bits'?"),
    ({"name": "q", "quantise": {"model": "a"}}, "unknown key 'quantise'; did you mean 'quantize'?"),
    ({"name": "q", "quantize": {"model": "a", "method": "rtn"}, "merge": {}}, "one kind per step"),
    ({"name": "q"}, "no step kind"),
    ({"quantize": {"model": "a", "method": "rtn"}}, "missing required key 'name'"),
    ({"name": "bad name", "quantize": {"model": "a", "method": "rtn"}}, "must be 1-64 letters"),
    ({"name": "q", "quantize": {"method": "rtn"}}, "step 'q'.quantize: missing required key 'model'"),
    ({"name": "q", "quantize": {"model": "a", "method": "rtn", "nsamples": 0}}, "nsamples"),
    ({"name": "q", "quantize": "rtn"}, "quantize must be a mapping"),
    ({"name": "q", "device": "tpu", "quantize": {"model": "a", "method": "rtn"}}, "device must be cpu"),
    ({"name": "a", "quantize": {"model": "b", "method": "rtn"}}, "step name 'a' is used twice"),
    ({"name": "m", "merge": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": 1}}]}},
     "did you mean 'weight'"),
    ({"name": "m", "merge-adapter": {"base": "base", "adapters": ["a", "b"], "weights": [1.0]}}, "1 weight(s) for 2"),
])
def test_bad_steps(adaptkit_cli, tmp_path, models, step, needle):
    err = _run(adaptkit_cli, tmp_path, {"inputs": models, "steps": [step]})
    assert needle in err, err


@pytest.mark.parametrize("doc, needle", [
    ({"steps": []}, "'steps' must be a non-empty list"),
    ({"stepz": []}, "unknown key 'stepz'; did you mean 'steps'?"),
    ({"inputs": {"base": "nowhere"}, "steps": [{"name": "q", "quantize": {"model": "base", "method": "rtn"}}]},
     "inputs.base"),
    ({"inputs": {"base": "${ADAPTKIT_TEST_UNSET_VAR}"}, "steps": [{"name": "q", "quantize": {"model": "base", "method": "rtn"}}]},
     "environment variable 'ADAPTKIT_TEST_UNSET_VAR' is not set"),
])
def test_bad_files(adaptkit_cli, tmp_path, models, doc, needle, monkeypatch):
    monkeypatch.delenv("ADAPTKIT_TEST_UNSET_VAR", raising=False)
    assert needle in _run(adaptkit_cli, tmp_path, doc)


def test_not_yaml_and_missing_file(adaptkit_cli, tmp_path):
    p = tmp_path / "p.yml"
    p.write_text("steps: [\n")
    r = adaptkit_cli("run", p)
    assert r.exit_code == 3 and "invalid YAML" in one_error(r)
    r = adaptkit_cli("run", tmp_path / "none.yml")
    assert r.exit_code == 3 and "pipeline file not found" in one_error(r)


def test_unknown_from_step(adaptkit_cli, tmp_path, models):
    doc = {"inputs": models, "steps": [{"name": "q", "quantize": {"model": "a", "method": "rtn"}}]}
    assert "no step named 'qq'; did you mean 'q'?" in _run(adaptkit_cli, tmp_path, doc, "--from", "qq")


def test_later_bad_step_stops_the_run_before_the_first_step(adaptkit_cli, tmp_path, models):
    """Step 2's unknown quantizer option is found before step 1 runs (nothing is written)."""
    doc = {"inputs": models, "steps": [{"name": "m", "merge": _merge("base", "a", "b")},
                                       {"name": "q", "quantize": {"model": "m", "method": "rtn",
                                                                  "options": {"nope": 1}}}]}
    err = _run(adaptkit_cli, tmp_path, doc)
    assert "step 'q'" in err and "nope" in err


def test_plugin_not_installed_names_it_and_how_to_install(adaptkit_cli, tmp_path, models):
    doc = {"inputs": models, "steps": [{"name": "q", "quantize": {"model": "a", "method": "int8-absmax"}}]}
    p = write_pipeline(tmp_path / "p.yml", doc)
    r = adaptkit_cli("-p", "no:adaptkit-example-quant", "run", p)
    assert r.exit_code == 3, r.stderr
    err = one_error(r)
    assert "quantizer 'int8-absmax' is not installed" in err
    assert "adaptkit-example-quant" in err and "pip install -e examples/adaptkit-example-quant" in err
    # a component the repository does not know: the step's 'plugin:' key names the distribution
    doc = {"inputs": models, "steps": [{"name": "m", "plugin": "adaptkit-fancy-merge",
                                        "merge": {**_merge("base", "a", "b"), "merge_method": "fancy"}}]}
    p = write_pipeline(tmp_path / "p.yml", doc)
    r = adaptkit_cli("run", p)
    err = one_error(r)
    assert r.exit_code == 3 and "merger 'fancy' is not installed" in err and "pip install adaptkit-fancy-merge" in err
