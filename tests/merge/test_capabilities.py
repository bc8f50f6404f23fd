"""The engine acts on what a merge method *declares* (``row_separable``, ``propagates_nonfinite``, ``in_place``,
``identity_params``), never on its name: a third-party method declaring what ``linear`` declares is treated
like ``linear``, the same function declaring nothing is not. Results are held to float64 formulas computed
here from the input files."""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from adaptkit import hookimpl
from adaptkit.errors import CheckpointError
from adaptkit.merge import budget
from adaptkit.merge.engine import merge
from adaptkit.registry import MergeMethod, Param

WEIGHT = Param("weight", scope="model")
CALLS: dict[str, list] = {}


def _weighted_sum(method: str):
    def impl(inputs):
        CALLS.setdefault(method, []).append((inputs.name, tuple(inputs.tensors[0].shape), inputs.owned))
        acc = torch.zeros_like(inputs.tensors[0])
        for p, t in zip(inputs.params, inputs.tensors):
            acc.add_(t, alpha=p["weight"])
        return acc
    return impl


def _first_only(method: str):
    def impl(inputs):
        CALLS.setdefault(method, []).append((inputs.name, tuple(inputs.tensors[0].shape), inputs.owned))
        return inputs.tensors[0].clone()
    return impl


def _scaled(method: str):
    def impl(inputs):
        CALLS.setdefault(method, []).append((inputs.name, tuple(inputs.tensors[0].shape), inputs.owned))
        return inputs.tensors[0] * inputs.params[0]["scale"]
    return impl


def _register(registry) -> None:
    scale = (Param("scale", float, 1.0, scope="both"),)
    registry.register(MergeMethod(name="rowwise", impl=_weighted_sum("rowwise"), uses_base=False, params=(WEIGHT,),
                                  row_separable=True, propagates_nonfinite=True))
    registry.register(MergeMethod(name="plain", impl=_weighted_sum("plain"), uses_base=False, params=(WEIGHT,)))
    registry.register(MergeMethod(name="inplace", impl=_weighted_sum("inplace"), uses_base=False, params=(WEIGHT,),
                                  in_place=True))
    registry.register(MergeMethod(name="first-trusting", impl=_first_only("first-trusting"), uses_base=False,
                                  params=(WEIGHT,), propagates_nonfinite=True))
    registry.register(MergeMethod(name="first-plain", impl=_first_only("first-plain"), uses_base=False,
                                  params=(WEIGHT,)))
    registry.register(MergeMethod(name="scaled", impl=_scaled("scaled"), uses_base=False, max_models=1,
                                  params=scale, identity_params=(("scale", 1.0),)))
    registry.register(MergeMethod(name="scaled-plain", impl=_scaled("scaled-plain"), uses_base=False, max_models=1,
                                  params=scale))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy

    root = tmp_path_factory.mktemp("capmodels")
    make_tiny_llama(root / "a", seed=11)
    perturbed_copy(root / "a", root / "b", seed=2, scale=0.1)
    shutil.copytree(root / "b", root / "nanb")
    t = load_file(str(root / "nanb" / "model.safetensors"))
    w = t["model.norm.weight"].clone()
    w[7] = float("nan")
    t["model.norm.weight"] = w
    save_file(t, str(root / "nanb" / "model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.fixture
def host(adaptkit_pm_factory):
    CALLS.clear()
    plugin = types.SimpleNamespace(__name__="thirdparty_merge", ADAPTKIT_DISTRIBUTION="thirdparty-merge",
                                   adaptkit_register_mergers=hookimpl(_register))
    return adaptkit_pm_factory(load_entrypoints=False, extra_plugins=[plugin])


def _cfg(method: str, root: Path, *pairs: tuple[str, float]) -> dict:
    return {"merge_method": method,
            "models": [{"model": str(root / m), "parameters": {"weight": w}} for m, w in pairs]}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_declared_row_separable_is_fed_in_row_blocks_and_undeclared_is_not(models, host, tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "ROW_CHUNK_NUMEL", 1000)
    monkeypatch.setattr(budget, "PREFETCH_MAX_BYTES", 0)  # no tensor is loaded ahead whole
    merge(_cfg("rowwise", models, ("a", 0.3), ("b", 0.7)), tmp_path / "rows", host=host)
    merge(_cfg("plain", models, ("a", 0.3), ("b", 0.7)), tmp_path / "whole", host=host)
    emb = "model.embed_tokens.weight"  # 512 x 64 = 32768 elements
    row_shapes = [s for n, s, _ in CALLS["rowwise"] if n == emb]
    assert len(row_shapes) > 1 and all(s[1] == 64 and s[0] * 64 <= 1000 for s in row_shapes)
    assert sum(s[0] for s in row_shapes) == 512
    assert [s for n, s, _ in CALLS["plain"] if n == emb] == [(512, 64)]
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    # float64 reference: 0.3 a + 0.7 b, within fp32 accumulation error
    A, B, out = _tensors(models / "a"), _tensors(models / "b"), _tensors(tmp_path / "rows")
    for name, o in out.items():
        ref = 0.3 * A[name].double() + 0.7 * B[name].double()
        scale = A[name].double().abs() + B[name].double().abs()
        assert o.dtype == torch.float32
        assert ((o.double() - ref).abs() <= 4 * 2.0**-24 * scale + 1e-30).all(), name


def test_task_arithmetic_row_blocks_only_without_sparsification(models, tmp_path, monkeypatch):
    """Built-in task_arithmetic declares row_separable through a function of its parameters: dense (every
    density 1) merges are fed in row blocks with the same bytes as whole tensors; sparsified ones are not."""
    from adaptkit.config import parse_merge_config
    from adaptkit.merge.executor import TensorExecutor
    from adaptkit.merge.plan import build_plan

    def cfg(density):
        return {"merge_method": "task_arithmetic", "base_model": str(models / "a"),
                "models": [{"model": str(models / "b"), "parameters": {"weight": 0.8, "density": density}}],
                "parameters": {"lambda": 0.5}}

    merge(cfg(1.0), tmp_path / "whole")
    monkeypatch.setattr(budget, "ROW_CHUNK_NUMEL", 1000)
    monkeypatch.setattr(budget, "PREFETCH_MAX_BYTES", 0)
    for density, chunked in ((1.0, True), (0.5, False)):
        plan = build_plan(parse_merge_config(cfg(density)), None)
        try:
            ex = TensorExecutor(plan, "cpu")
            task = next(t for t in plan.tasks if t.out_name == "model.embed_tokens.weight")
            assert ex.uses_row_blocks(task) is chunked
        finally:
            plan.close()
    merge(cfg(1.0), tmp_path / "rows")
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    A, B, out = _tensors(models / "a"), _tensors(models / "b"), _tensors(tmp_path / "rows")
    for name, o in out.items():
        a, b = A[name].double(), B[name].double()
        ref = a + 0.5 * 0.8 * (b - a)
        assert ((o.double() - ref).abs() <= 8 * 2.0**-24 * (a.abs() + b.abs()) + 1e-30).all(), name


def test_declared_propagates_nonfinite_checks_the_result_instead_of_each_input(models, host, tmp_path):
    """A method declaring ``propagates_nonfinite`` is trusted: the engine checks its result and inspects the
    inputs only when the result is non-finite. A weighted sum with a NaN input therefore still fails naming
    the input; a method that (contrary to its declaration) drops the NaN input passes, while the same
    function declaring nothing has every input checked."""
    nan = ("nanb", 0.5)
    with pytest.raises(CheckpointError, match=r"model '.*nanb': tensor 'model.norm.weight' contains NaN \(1 of 64"):
        merge(_cfg("rowwise", models, ("a", 0.5), nan), tmp_path / "o1", host=host)
    with pytest.raises(CheckpointError, match=r"model '.*nanb': tensor 'model.norm.weight' contains NaN"):
        merge(_cfg("first-plain", models, ("a", 0.5), nan), tmp_path / "o2", host=host)
    merge(_cfg("first-trusting", models, ("a", 0.5), nan), tmp_path / "o3", host=host)
    assert torch.equal(_tensors(tmp_path / "o3")["model.norm.weight"], _tensors(models / "a")["model.norm.weight"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_owned_only_for_methods_declaring_in_place(models, host, tmp_path):
    merge(_cfg("inplace", models, ("a", 0.5), ("b", 0.5)), tmp_path / "o1", host=host)
    merge(_cfg("plain", models, ("a", 0.5), ("b", 0.5)), tmp_path / "o2", host=host)
    assert CALLS["inplace"] and all(owned is True for _, _, owned in CALLS["inplace"])
    assert CALLS["plain"] and all(owned is False for _, _, owned in CALLS["plain"])


def _slices(method: str, root: Path, scale: float) -> dict:
    return {"merge_method": method, "parameters": {"scale": scale}, "slices": [
        {"sources": [{"model": str(root / "a"), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(root / "b"), "layer_range": [1, 2]}]}]}


def test_identity_params_copy_without_calling_the_method(models, host, tmp_path):
    A, B = _tensors(models / "a"), _tensors(models / "b")
    merge(_slices("scaled", models, 1.0), tmp_path / "copy", host=host)
    assert "scaled" not in CALLS  # every tensor copied as stored
    out = _tensors(tmp_path / "copy")
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], A["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], B["model.layers.1.mlp.up_proj.weight"])
    merge(_slices("scaled", models, 2.0), tmp_path / "x2", host=host)
    assert CALLS["scaled"]
    out2 = _tensors(tmp_path / "x2")
    assert torch.equal(out2["model.norm.weight"].double(), 2 * B["model.norm.weight"].double())  # exact in fp32
    merge(_slices("scaled-plain", models, 1.0), tmp_path / "plain", host=host)
    assert len(CALLS["scaled-plain"]) == len(out)  # no declaration: the method runs for every tensor
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == \
        (tmp_path / "copy" / "model.safetensors").read_bytes()


def test_qualified_passthrough_behaves_like_passthrough(models, adaptkit_cli, tmp_path):
    outs = {}
    for method in ("passthrough", "adaptkit:passthrough"):
        cfg = _slices(method, models, 1.0)
        p = tmp_path / f"{method.replace(':', '_')}.yml"
        p.write_text(yaml.safe_dump(cfg))
        r = adaptkit_cli("merge", p, tmp_path / "dry", "--dry-run", "--json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["tensor_kinds"] == {"copy": doc["tensors"]}
        out = tmp_path / method.replace(":", "_")
        r = adaptkit_cli("merge", p, out, "-q")
        assert r.exit_code == 0, r.stderr
        outs[method] = out
    a, b = outs.values()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "config.json").read_text())["num_hidden_layers"] == 2
