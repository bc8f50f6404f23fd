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
    "sce", "ram", "ramplus_tl", "multislerp", "karcher", "nearswap", "arcee_fusion",
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
        # issue 12: mergekit 0.1.5's method guide and signatures
        ("sce", "select_topk", 1.0, "global"),
        ("ram", "epsilon", 1e-5, "global"),
        ("ramplus_tl", "r", 0.1, "global"),
        ("ramplus_tl", "alpha", 0.2, "global"),
        ("ramplus_tl", "epsilon", 1e-5, "global"),
        ("multislerp", "weight", REQUIRED, "both"),
        ("multislerp", "normalize_weights", True, "global"),
        ("multislerp", "eps", 1e-8, "global"),
        ("karcher", "max_iter", 10, "global"),
        ("karcher", "tol", 1e-5, "global"),
        ("nearswap", "t", REQUIRED, "global"),
    ],
)
def test_parameters_follow_mergekit(reg, method, name, default, scope):
    p = reg.get(method).param(name)
    assert p is not None, f"{method} lacks {name}"
    assert p.default is default or p.default == default
    assert p.scope == scope


# What mergekit documents about each method's inputs (not read from adaptkit's declarations).
NEEDS_BASE = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
              "della_linear", "slerp", "model_stock", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"}
PARAMS = {"slerp": {"t": 0.5}, "model_stock": {}, "passthrough": {}, "nuslerp": {"weight": 0.5}, "sce": {},
          "ram": {}, "ramplus_tl": {}, "karcher": {}, "nearswap": {"t": 0.001}, "arcee_fusion": {}}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy

    root = tmp_path_factory.mktemp("trio")
    make_tiny_llama(root / "base", seed=41)
    for i, name in enumerate(("a", "b", "c"), start=1):
        perturbed_copy(root / "base", root / name, seed=i)
    return root


def _try_plan(reg, root, method, models, base=None):
    from adaptkit.config import parse_merge_config
    from adaptkit.merge.plan import build_plan

    raw = {"merge_method": method, "models": [{"model": str(root / m)} for m in models],
           "parameters": PARAMS.get(method, {"weight": 0.5})}
    if base:
        raw["base_model"] = str(root / base)
    try:
        build_plan(parse_merge_config(raw), None, reg).close()
    except ConfigError as exc:
        return exc.one_line()
    return None


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_model_count_and_base_rules_follow_mergekit(reg, trio, method):
    """Planning (headers only) enforces mergekit's input rules: which methods need a base model, slerp takes
    one model besides the base, nuslerp exactly two models, model_stock at least two fine-tunes, passthrough
    one model per slice."""
    err = _try_plan(reg, trio, method, ["a", "b"])
    if method in NEEDS_BASE:
        assert err is not None and "needs a base_model" in err
    elif method == "passthrough":
        assert err is not None and "at most 1" in err
    else:
        assert err is None, err
    if method == "slerp":
        assert _try_plan(reg, trio, method, ["a"], base="base") is None
        assert "at most 1 non-base" in _try_plan(reg, trio, method, ["a", "b"], base="base")
    if method == "nuslerp":
        assert "at least 2" in _try_plan(reg, trio, method, ["a"])
        assert "at most 2" in _try_plan(reg, trio, method, ["a", "b", "c"])
    if method == "model_stock":
        assert "at least 2 non-base" in _try_plan(reg, trio, method, ["a"], base="base")
        assert _try_plan(reg, trio, method, ["a", "b"], base="base") is None
    if method == "passthrough":
        assert _try_plan(reg, trio, method, ["a"]) is None
    if method in ("nearswap", "arcee_fusion"):
        assert _try_plan(reg, trio, method, ["a"], base="base") is None
        assert "at most 1 non-base" in _try_plan(reg, trio, method, ["a", "b"], base="base")
    if method in ("multislerp", "karcher"):
        assert _try_plan(reg, trio, method, ["a", "b", "c"]) is None


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
