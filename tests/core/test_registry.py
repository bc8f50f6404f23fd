"""Params validate values before any tensor is read; registries resolve names and suggest near misses."""
from __future__ import annotations

import math

import pytest

from adaptkit.errors import ConfigError, PluginError
from adaptkit.registry import MergeMethod, MergerRegistry, Owner, Param, Quantizer, resolve_impl


@pytest.mark.parametrize(
    "param,value,expected",
    [
        (Param("density", float, min=0.0, min_exclusive=True, max=1.0), 0.5, 0.5),
        (Param("density", float, min=0.0, min_exclusive=True, max=1.0), 1, 1.0),
        (Param("k", int, min=1), 3.0, 3),
        (Param("normalize", bool), True, True),
        (Param("mode", str, choices=("sum", "count")), "count", "count"),
    ],
)
def test_param_accepts(param, value, expected):
    out = param.validate(value, "cfg.yml: models[0]")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "param,value,fragment",
    [
        (Param("density", float, min=0.0, min_exclusive=True, max=1.0), 0.0, "must be > 0.0"),
        (Param("density", float, min=0.0, min_exclusive=True, max=1.0), 1.5, "must be <= 1.0"),
        (Param("density", float), "high", "must be a number"),
        (Param("density", float), math.nan, "must be finite"),
        (Param("density", float), True, "must be a number"),
        (Param("k", int), 2.5, "must be an integer"),
        (Param("normalize", bool), 1, "must be true or false"),
        (Param("mode", str, choices=("sum", "count")), "mean", "must be one of sum, count"),
    ],
)
def test_param_rejects_with_location(param, value, fragment):
    with pytest.raises(ConfigError) as err:
        param.validate(value, "cfg.yml: models[1].parameters")
    msg = str(err.value)
    assert fragment in msg and msg.startswith("cfg.yml: models[1].parameters: parameter")


def test_registry_suggests_nearest_and_checks_types():
    reg = MergerRegistry()
    reg.register(MergeMethod(name="ties", impl="a:b"))
    reg.register(MergeMethod(name="dare_ties", impl="a:c"))
    with pytest.raises(ConfigError, match=r"unknown merge method 'tise'; did you mean 'ties'\?"):
        reg.get("tise")
    with pytest.raises(PluginError, match="takes MergeMethod"):
        reg.register(Quantizer(name="gptq", impl="a:b"))
    with pytest.raises(PluginError, match="invalid merge method name"):
        reg.register(MergeMethod(name="Bad Name", impl="a:b"))
    assert reg.get("adaptkit:ties").impl == "a:b"


def test_registry_ambiguity_and_qualified_names():
    reg = MergerRegistry()
    reg._set_owner(Owner("p1", "dist-one"))
    reg.register(MergeMethod(name="x", impl="one:f"))
    reg._set_owner(Owner("p2", "dist-two"))
    reg.register(MergeMethod(name="x", impl="two:f"))
    assert "x" not in reg
    assert reg.names() == ["dist-one:x", "dist-two:x"]
    with pytest.raises(PluginError, match=r"registered by dist-one \(dist-one:x\) and dist-two \(dist-two:x\)"):
        reg.get("x")


def test_resolve_impl_is_lazy_and_reports_bad_references():
    assert resolve_impl("math:sqrt")(9.0) == 3.0
    with pytest.raises(PluginError, match="cannot import implementation 'no_such_mod_xyz:f'"):
        resolve_impl("no_such_mod_xyz:f")
    with pytest.raises(PluginError, match="must look like"):
        resolve_impl("no_colon")
