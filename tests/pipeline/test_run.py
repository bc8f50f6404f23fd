"""``adaptkit run`` on tiny random Llamas: each step's output checked against an independent reference, steps
called by name through the registries (the example merge and quantize plugins included), reruns skipping
finished steps, ``--from``, a step that fails midway and the resumed run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import leftovers, one_error, write_pipeline

torch = pytest.importorskip("torch")

from tests.quant.thirdparty_plugin import StepSpy  # noqa: E402

from .failing_plugin import ENV, MidwayFailingQuant  # noqa: E402


def tensors(folder: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def pipeline_doc(base: Path, fts: list[Path], **extra_steps) -> dict:
    inputs = {"base": str(base), **{f"ft{i}": str(p) for i, p in enumerate(fts, 1)}}
    steps = [
        {"name": "ta", "merge": {"merge_method": "task_arithmetic", "base_model": "base",
                                 "models": [{"model": "ft1", "parameters": {"weight": 0.5}},
                                            {"model": "ft2", "parameters": {"weight": 0.25}}]}},
        {"name": "med", "merge": {"merge_method": "median", "base_model": "base",
                                  "models": [{"model": n} for n in inputs if n != "base"]}},
        {"name": "q8", "quantize": {"model": "ta", "method": "int8-absmax"}},
        {"name": "q4", "quantize": {"model": "med", "method": "rtn", "bits": 4, "group_size": 32}},
    ]
    return {"output": "out", "inputs": inputs, "steps": steps}


@pytest.fixture
def three(tiny_llama):
    base, fts = tiny_llama.family(3, scale=0.05)
    return base, fts


def _run_json(adaptkit_cli, p, *args, **kw):
    r = adaptkit_cli("run", p, "--json", *args, **kw)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    return doc, {s["name"]: s for s in doc["steps"]}


def test_chain_matches_independent_references(adaptkit_cli, tmp_path, three):
    base, fts = three
    p = write_pipeline(tmp_path / "p.yml", pipeline_doc(base, fts))
    spy = StepSpy()
    doc, steps = _run_json(adaptkit_cli, p, extra_plugins=[spy])
    assert doc["status"] == "finished" and [s["status"] for s in doc["steps"]] == ["ran"] * 4
    # every step went through host.run_step as its kind, with its component's name
    kinds = [(k, n) for k, n, _ in spy.seen]
    assert ("merge", "task_arithmetic") in kinds and ("merge", "median") in kinds
    assert ("quantize", "int8-absmax") in kinds and ("quantize", "rtn") in kinds
    B, F = tensors(base), [tensors(f) for f in fts]

    # task arithmetic: base + 0.5 (ft1 - base) + 0.25 (ft2 - base), computed here in float64
    ta = tensors(Path(steps["ta"]["output"]))
    assert set(ta) == set(B)
    for name, b in B.items():
        ref = b.double() + 0.5 * (F[0][name].double() - b.double()) + 0.25 * (F[1][name].double() - b.double())
        torch.testing.assert_close(ta[name].double(), ref.to(b.dtype).double(), rtol=0, atol=2e-7)

    # the example plugin's median merge, by name: base + elementwise median of the three task vectors
    med = tensors(Path(steps["med"]["output"]))
    for name, b in B.items():
        deltas = torch.stack([f[name].double() - b.double() for f in F])
        ref = b.double() + deltas.median(dim=0).values
        torch.testing.assert_close(med[name].double(), ref, rtol=0, atol=1e-6)

    # the example plugin's int8 absmax quantizer, by name: codes = round(W / rowmax * 127), SCB = rowmax
    q8 = tensors(Path(steps["q8"]["output"]))
    w = ta["model.layers.0.self_attn.q_proj.weight"].double()
    rowmax = w.abs().amax(dim=1)
    assert torch.equal(q8["model.layers.0.self_attn.q_proj.weight"].to(torch.int64),
                       torch.round(w / rowmax[:, None] * 127).to(torch.int64))
    torch.testing.assert_close(q8["model.layers.0.self_attn.q_proj.SCB"].double(), rowmax, rtol=1e-6, atol=0)
    cfg = json.loads((Path(steps["q8"]["output"]) / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_8bit"] is True

    # rtn 4-bit: the same bytes as `adaptkit quantize` of the same input
    r = adaptkit_cli("quantize", steps["med"]["output"], tmp_path / "q4-cli", "--method", "rtn", "--bits", "4",
                     "--group-size", "32")
    assert r.exit_code == 0, r.stderr
    mine, cli = tensors(Path(steps["q4"]["output"])), tensors(tmp_path / "q4-cli")
    assert set(mine) == set(cli) and all(torch.equal(mine[k], cli[k]) for k in cli)

    # outputs are content-addressed folders; the state file records them
    assert Path(steps["ta"]["output"]).name == f"ta-{steps['ta']['key'][:12]}"
    state = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert [s["status"] for s in state["steps"]] == ["ran"] * 4
    assert leftovers(tmp_path / "out") == []


def test_rerun_skips_finished_steps_and_changes_rerun_only_what_depends_on_them(adaptkit_cli, tmp_path, three):
    base, fts = three
    doc = pipeline_doc(base, fts)
    p = write_pipeline(tmp_path / "p.yml", doc)
    _, first = _run_json(adaptkit_cli, p)
    mtimes = {n: Path(s["output"], "model.safetensors").stat().st_mtime_ns for n, s in first.items()}

    _, again = _run_json(adaptkit_cli, p)
    assert {n: s["status"] for n, s in again.items()} == dict.fromkeys(first, "cached")
    assert {n: Path(s["output"], "model.safetensors").stat().st_mtime_ns for n, s in again.items()} == mtimes
    assert again["ta"]["summary"]["tensors"] == first["ta"]["summary"]["tensors"]  # summary kept in the state

    # a changed setting: that step (and what reads it) runs again, into a new folder
    doc["steps"][1]["merge"]["parameters"] = {"scale": 0.5}
    write_pipeline(p, doc)
    _, changed = _run_json(adaptkit_cli, p)
    assert {n: s["status"] for n, s in changed.items()} == {"ta": "cached", "q8": "cached", "med": "ran", "q4": "ran"}
    assert changed["med"]["key"] != first["med"]["key"] and Path(first["med"]["output"]).is_dir()

    # a changed input (a file touched): the steps reading it run again
    w = fts[1] / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    _, touched = _run_json(adaptkit_cli, p)
    assert {n: s["status"] for n, s in touched.items()} == dict.fromkeys(first, "ran")

    # --from: that step and every step reading it rerun although finished, in the same folders
    _, forced = _run_json(adaptkit_cli, p, "--from", "ta")
    assert {n: s["status"] for n, s in forced.items()} == {"ta": "ran", "q8": "ran", "med": "cached", "q4": "cached"}
    assert forced["ta"]["output"] == touched["ta"]["output"]
    assert leftovers(tmp_path / "out") == []

    # --dry-run: the plan, nothing run
    r = adaptkit_cli("run", p, "--dry-run")
    assert r.exit_code == 0 and "0 step(s) to run, 4 finished earlier" in r.stdout


def test_step_failing_midway_keeps_earlier_outputs_leaves_nothing_and_resumes(adaptkit_cli, tmp_path, three,
                                                                              monkeypatch):
    base, fts = three
    doc = pipeline_doc(base, fts)
    doc["steps"] = [doc["steps"][0], {"name": "bad", "quantize": {"model": "ta", "method": "flaky8"}},
                    {"name": "after", "merge": {"merge_method": "linear",
                                                "models": [{"model": "bad", "parameters": {"weight": 1.0}}]}}]
    p = write_pipeline(tmp_path / "p.yml", doc)
    plugin = MidwayFailingQuant()
    monkeypatch.setenv(ENV, "1")
    r = adaptkit_cli("run", p, extra_plugins=[plugin])
    assert r.exit_code != 0
    err = one_error(r)
    assert "step 'bad' (quantize) failed" in err and "simulated crash" in err
    assert "--from bad" in err and "finished steps are skipped" in err
    out = tmp_path / "out"
    state = json.loads((out / "pipeline.json").read_text())
    by = {s["name"]: s for s in state["steps"]}
    assert by["ta"]["status"] == "ran" and by["bad"]["status"] == "failed" and by["after"]["status"] == "not run"
    assert Path(by["ta"]["output"]).is_dir()  # earlier output kept
    assert not Path(by["bad"]["output"]).exists()  # nothing half-written
    assert leftovers(out) == []  # no temporary folder left beside it
    assert not Path(by["after"]["output"]).exists()

    monkeypatch.delenv(ENV)
    _, steps = _run_json(adaptkit_cli, p, extra_plugins=[plugin])
    assert {n: s["status"] for n, s in steps.items()} == {"ta": "cached", "bad": "ran", "after": "ran"}
    assert steps["bad"]["key"] == by["bad"]["key"]
    q = tensors(Path(steps["bad"]["output"]))
    ta = tensors(Path(steps["ta"]["output"]))
    w = ta["model.layers.1.mlp.down_proj.weight"].double()
    assert torch.equal(q["model.layers.1.mlp.down_proj.weight"].to(torch.int64),
                       torch.round(w / w.abs().amax(dim=1)[:, None] * 127).to(torch.int64))


def test_interrupted_step_leaves_nothing_and_the_rerun_resumes_there(adaptkit_cli, tmp_path, three, monkeypatch):
    """Ctrl-C in the middle of a step: exit 130, the step's temporary folder is gone, the rerun resumes."""
    base, fts = three
    doc = pipeline_doc(base, fts)
    p = write_pipeline(tmp_path / "p.yml", doc)
    import adaptkit.quantize.runner as qr

    real = qr.run_quantize
    calls = {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(qr, "run_quantize", interrupted)
    r = adaptkit_cli("run", p)
    assert r.exit_code == 130, (r.exit_code, r.stderr)
    assert "interrupted in step 'q8'" in r.stderr and "--from q8" in r.stderr
    state = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert [s["status"] for s in state["steps"]] == ["ran", "ran", "interrupted", "not run"]
    _, steps = _run_json(adaptkit_cli, p)
    assert {n: s["status"] for n, s in steps.items()} == {"ta": "cached", "med": "cached", "q8": "ran", "q4": "ran"}
