"""The built-in merge methods: registered through the hook like any plugin, without importing torch,
with mergekit's parameter names, scopes, defaults and ranges."""
from __future__ import annotations

import subprocess
import sys

import pytest

from adaptkit.errors import ConfigError
from adaptkit.registry import REQUIRED, MergerRegistry

EXPECTED = {
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "passthrough",
}


@pytest.fixture(scope="module")
def reg():
    from adaptkit.builtins import mergers

    r = MergerRegistry()
    mergers.adaptkit_register_mergers(r)
    return r


def test_all_methods_registered_and_importable(reg):
    assert {e.component.name for e in reg.entries()} == EXPECTED
    for e in reg.entries():
        assert callable(e.component.load())


def test_registering_does_not_import_torch():
    code = (
        "import sys\n"
        "from adaptkit.builtins import mergers\n"
        "from adaptkit.registry import MergerRegistry\n"
        "r = MergerRegistry(); mergers.adaptkit_register_mergers(r)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "method,name,default,scope",
    [
        ("ties", "normalize", True, "global"),
        ("ties", "rescale", False, "global"),
        ("ties", "density", 1.0, "both"),
        ("ties", "weight", REQUIRED, "both"),
        ("ties", "lambda", 1.0, "global"),
        ("ties", "int8_mask", False, "global"),
        ("ties", "consensus_method", "sum", "global"),
        ("ties", "sign_election", "weighted", "global"),
        ("ties", "election_precision", "float64", "global"),
        ("ties", "magnitude_tiebreak", "index", "global"),
        ("dare_ties", "rescale", True, "global"),
        ("dare_ties", "normalize", False, "global"),
        ("dare_ties", "rescale_mode", "l1", "global"),
        ("dare_linear", "rescale", True, "global"),
        ("task_arithmetic", "normalize", False, "global"),
        ("della", "normalize", True, "global"),
        ("della", "rescale", True, "global"),
        ("della", "epsilon", 0.15, "both"),
        ("della_linear", "normalize", False, "global"),
        ("breadcrumbs", "gamma", 0.01, "both"),
        ("breadcrumbs_ties", "normalize", False, "global"),
        ("linear", "normalize", True, "global"),
        ("linear", "weight", REQUIRED, "both"),
        ("slerp", "t", REQUIRED, "global"),
        ("nuslerp", "nuslerp_flatten", True, "global"),
        ("nuslerp", "nuslerp_row_wise", False, "global"),
        ("model_stock", "filter_wise", False, "global"),
        ("passthrough", "scale", 1.0, "both"),
    ],
)
def test_parameters_follow_mergekit(reg, method, name, default, scope):
    p = reg.get(method).param(name)
    assert p is not None, f"{method} lacks {name}"
    assert p.default is default or p.default == default
    assert p.scope == scope


def test_method_shapes(reg):
    m = {e.component.name: e.component for e in reg.entries()}
    for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                 "della", "della_linear", "slerp", "model_stock"):
        assert m[name].requires_base, name
    assert {n for n, c in m.items() if c.randomized} == {"dare_ties", "dare_linear", "della", "della_linear"}
    assert (m["slerp"].min_models, m["slerp"].max_models) == (1, 1)
    assert (m["nuslerp"].min_models, m["nuslerp"].max_models) == (2, 2)
    assert m["model_stock"].min_models == 2
    assert m["passthrough"].max_models == 1 and not m["passthrough"].uses_base
    assert not m["linear"].uses_base


@pytest.mark.parametrize(
    "method,name,value",
    [
        ("ties", "density", 0.0),
        ("ties", "density", 1.5),
        ("slerp", "t", 1.2),
        ("slerp", "t", -0.1),
        ("ties", "rescale_mode", "l2"),
        ("ties", "consensus_method", "max"),
        ("breadcrumbs", "gamma", -0.1),
        ("della", "epsilon", 0.6),
        ("ties", "normalize", "yes"),
    ],
)
def test_out_of_range_values_are_config_errors(reg, method, name, value):
    with pytest.raises(ConfigError, match=name):
        reg.get(method).param(name).validate(value, where="config.yml")
