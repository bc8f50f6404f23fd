"""specs/merge-vectors.json: float64 inputs and expected outputs from the independent numpy reference
(specs/tools/make_merge_vectors.py). adaptkit computes in float64 for float64 inputs, so the results must
agree to a few float64 ulps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptkit.merge.api import MergeInputs
from adaptkit.registry import MergerRegistry

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "specs" / "merge-vectors.json").read_text())


def _registry() -> MergerRegistry:
    from adaptkit.builtins import mergers

    reg = MergerRegistry()
    mergers.adaptkit_register_mergers(reg)
    return reg


REG = _registry()


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _filled(method, case):
    """Per-model and global params with declared defaults filled in (what the engine does)."""
    comp = REG.get(method)
    params = []
    for p_in in case["params"]:
        p = dict(p_in)
        for decl in comp.params:
            if decl.scope in ("model", "both") and decl.name not in p and not decl.required:
                p[decl.name] = decl.default
        params.append(p)
    g = dict(case["global_params"])
    for decl in comp.params:
        if decl.scope in ("global", "both") and decl.name not in g and not decl.required:
            g[decl.name] = decl.default
    for name, value in list(g.items()) + [(k, v) for p in params for k, v in p.items()]:
        decl = comp.param(name)
        assert decl is not None, f"vector uses undeclared parameter {name!r} for {method}"
        decl.validate(value, where=method)
    return params, g


@pytest.mark.parametrize("case", VECTORS["methods"], ids=lambda c: f"{c['method']}:{c['note'][:30]}")
def test_method_vector(case):
    method = case["method"]
    params, g = _filled(method, case)
    inputs = MergeInputs(
        name="model.layers.0.mlp.up_proj.weight",
        tensors=[_t(x) for x in case["tensors"]],
        base=None if case["base"] is None else _t(case["base"]),
        params=params,
        global_params=g,
    )
    out = REG.get(method).load()(inputs)
    expected = _t(case["expected"])
    assert out.dtype == torch.float64
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for key, n in case.get("events", {}).items():
        assert inputs.stats.get(key, 0) == n, key


@pytest.mark.parametrize("case", VECTORS["combine_fixed_mask"], ids=lambda c: c["note"][:50])
def test_fixed_mask_vector(case):
    from adaptkit.merge.task_arithmetic import combine_task_vectors

    kp = [p if isinstance(p, float) else _t(p) for p in case["keep_probs"]]
    out = combine_task_vectors(
        _t(case["base"]),
        [_t(x) for x in case["tensors"]],
        case["weights"],
        masks=[torch.tensor(m, dtype=torch.bool) for m in case["masks"]],
        keep_probs=kp,
        **case["options"],
    )
    torch.testing.assert_close(out, _t(case["expected"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", VECTORS["della_probabilities"], ids=lambda c: f"density={c['density']}")
def test_della_probability_vector(case):
    from adaptkit.merge.sparsify import della_keep_probabilities

    p = della_keep_probabilities(_t(case["delta"]), case["density"], case["epsilon"])
    torch.testing.assert_close(p, _t(case["expected"]), rtol=1e-12, atol=1e-12)


def test_every_deterministic_method_has_vectors():
    covered = {c["method"] for c in VECTORS["methods"]}
    deterministic = {e.component.name for e in REG.entries() if not e.component.randomized}
    assert deterministic <= covered, deterministic - covered
