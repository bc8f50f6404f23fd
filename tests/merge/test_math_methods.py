"""Properties of the merge math that the float64 vectors cannot show: randomness (kept fraction, rescale,
reproducibility), thread-count independence, the large-tensor selection path, slerp's fallback counter,
float32 evaluation against the float64 formulas."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptkit.errors import ConfigError
from adaptkit.merge import sparsify as sp
from adaptkit.merge.api import MergeInputs
from adaptkit.registry import MergerRegistry

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("merge_ref", ROOT / "specs" / "tools" / "make_merge_vectors.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _registry():
    from adaptkit.builtins import mergers

    reg = MergerRegistry()
    mergers.adaptkit_register_mergers(reg)
    return reg


REG = _registry()


def make_inputs(method, tensors, base=None, params=None, global_params=None, *, name="w", seed=0):
    comp = REG.get(method)
    params = [dict(p) for p in (params or [{} for _ in tensors])]
    for p in params:
        for d in comp.params:
            if d.scope != "global" and d.name not in p and not d.required:
                p[d.name] = d.default
    g = dict(global_params or {})
    for d in comp.params:
        if d.scope != "model" and d.name not in g and not d.required:
            g[d.name] = d.default
    return MergeInputs(name=name, tensors=list(tensors), base=base, params=params, global_params=g, seed=seed)


def run(method, *args, **kw):
    inputs = make_inputs(method, *args, **kw)
    return REG.get(method).load()(inputs), inputs


def models(n, shape=(40, 64), seed=0, spread=0.05, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    xs = [base + spread * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


# -- DARE ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_within_binomial_bounds(density):
    base, (x,) = models(1, shape=(100, 100), seed=1)
    out, _ = run("dare_linear", [x], base, [{"weight": 1.0, "density": density}],
                 {"rescale": True, "rescale_mode": "inverse_p"}, seed=3)
    n = base.numel()
    kept = int(((out - base) != 0).sum())
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) <= 5 * sd, (kept, n * density)


def test_dare_rescale_factors():
    base, (x,) = models(1, shape=(64, 64), seed=2)
    b64 = base.double()
    delta = x.double() - b64
    # inverse_p: every kept entry is base + delta / p
    out, _ = run("dare_linear", [x], base, [{"weight": 1.0, "density": 0.3}],
                 {"rescale": True, "rescale_mode": "inverse_p"}, seed=5)
    kept = (out - base) != 0
    torch.testing.assert_close(out.double()[kept], (b64 + delta / 0.3)[kept], rtol=0, atol=3e-6)
    assert torch.equal(out[~kept], base[~kept])
    # l1 (mergekit): every kept entry is base + delta * sum|delta| / sum|kept delta|
    out, _ = run("dare_linear", [x], base, [{"weight": 1.0, "density": 0.3}], {"rescale": True}, seed=5)
    kept = (out - base) != 0
    factor = float(delta.abs().sum() / delta[kept].abs().sum())
    torch.testing.assert_close(out.double()[kept], (b64 + delta * factor)[kept], rtol=0, atol=3e-6)
    assert 1 / 0.3 * 0.8 < factor < 1 / 0.3 * 1.25
    # no rescale: kept entries are the model's own
    out, _ = run("dare_linear", [x], base, [{"weight": 1.0, "density": 0.3}], {"rescale": False}, seed=5)
    kept = (out - base) != 0
    torch.testing.assert_close(out[kept], x[kept], rtol=0, atol=3e-7)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_randomized_reproducible_and_seed_dependent(method):
    base, xs = models(2, seed=3)
    params = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.4}]
    a, _ = run(method, xs, base, params, seed=7)
    b, _ = run(method, xs, base, params, seed=7)
    c, _ = run(method, xs, base, params, seed=8)
    d, _ = run(method, xs, base, params, seed=7, name="other.weight")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)


def test_dare_mask_independent_of_other_models_and_dtype():
    """Model i's mask depends on (seed, tensor name, i) only: adding a model or computing in float64
    does not change it."""
    base, xs = models(2, seed=4)
    g = {"rescale": False}
    one, _ = run("dare_linear", xs[:1], base, [{"weight": 1.0, "density": 0.5}], g, seed=1)
    two, _ = run("dare_linear", xs, base, [{"weight": 1.0, "density": 0.5}, {"weight": 0.0, "density": 0.5}],
                 g, seed=1)
    assert torch.equal((one - base) != 0, (two - base) != 0)
    d64, _ = run("dare_linear", [xs[0].double()], base.double(), [{"weight": 1.0, "density": 0.5}], g, seed=1)
    assert torch.equal((one - base) != 0, (d64 - base.double()) != 0)


def test_della_keep_probabilities_and_kept_fraction():
    base, (x,) = models(1, shape=(50, 200), seed=5)
    delta = x - base
    p = sp.della_keep_probabilities(delta, 0.5, 0.2)
    expected = ref.ref_della_probs(delta.double().numpy(), 0.5, 0.2)
    np.testing.assert_allclose(p.double().numpy(), expected, rtol=1e-6)
    mask, probs = sp.della_mask(delta, 0.5, 0.2, torch.Generator().manual_seed(0))
    # larger magnitudes are kept more often: kept fraction per magnitude-rank half
    big = p > 0.5
    f_big = float(mask[big].float().mean())
    f_small = float(mask[~big].float().mean())
    assert 0.55 < f_big < 0.65 and 0.35 < f_small < 0.45, (f_big, f_small)


def test_della_epsilon_range_is_a_config_error():
    base, (x,) = models(1, seed=6)
    with pytest.raises(ConfigError, match="della needs"):
        run("della", [x], base, [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}])


# -- thread-count independence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params,g",
    [
        ("ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6}], {"rescale": True}),
        ("dare_ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6}], {}),
        ("slerp", [{}], {"t": 0.35}),
        ("model_stock", [{}, {}], {}),
        ("nuslerp", [{"weight": 0.3}, {"weight": 0.6}], {}),
    ],
)
def test_bit_identical_across_thread_counts(method, params, g):
    base, xs = models(len(params), shape=(600, 1000), seed=7, spread=0.01)  # 600k elements: parallel paths
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run(method, xs, base, params, g, seed=9)
        torch.set_num_threads(4)
        four, _ = run(method, xs, base, params, g, seed=9)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, four)


def test_det_sum_is_thread_count_independent_and_accurate():
    from adaptkit.merge._util import det_sum

    x = torch.randn(3_000_017, generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = det_sum(x)
        torch.set_num_threads(4)
        four = det_sum(x)
    finally:
        torch.set_num_threads(old)
    assert one == four
    exact = math.fsum(x.double().tolist())
    assert abs(one - exact) <= 1e-6 * x.abs().sum().item()  # float32 rows of 16384, float64 across rows
    x64 = x.double()
    assert abs(det_sum(x64) - exact) <= 1e-13 * x.abs().sum().item()


# -- selection ----------------------------------------------------------------------------------------


def _stable_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    order = ref.ref_rank_order(a.double().numpy())
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[torch.from_numpy(order[:k].copy())] = True
    return keep


@pytest.mark.parametrize("k", [1, 1000, 250_000, 599_999])
def test_top_k_large_tensor_with_ties(k):
    g = torch.Generator().manual_seed(k)
    a = (0.01 * torch.randn(600_000, generator=g)).to(torch.bfloat16).float().abs()  # many exact ties
    a[::13] = 0.0
    m = sp.top_k_mask(a, k)
    assert int(m.sum()) == k
    assert torch.equal(m, _stable_topk(a, k))


def test_top_k_when_the_sample_misses():
    """A strided sample that sees only outliers: the bracket check fails and the exact path answers."""
    n = 600_000
    a = torch.rand(n, generator=torch.Generator().manual_seed(1))
    a[:: n // 65536] = 100.0
    m = sp.top_k_mask(a, 300_000)
    assert torch.equal(m, _stable_topk(a, 300_000))


def test_breadcrumbs_mask_large_matches_rank_rule():
    g = torch.Generator().manual_seed(3)
    d = (0.02 * torch.randn(700_000, generator=g)).to(torch.bfloat16).float()
    m = sp.magnitude_outliers_mask(d, 0.4, 0.05)
    expected = ref.ref_outlier_mask(d.double().numpy(), 0.4, 0.05)
    assert np.array_equal(m.numpy(), expected)


def test_magnitude_density_edge_cases():
    d = torch.randn(10)
    assert sp.magnitude_mask(d, 1.0) is None
    assert int(sp.magnitude_mask(d, 0.01).sum()) == 1  # at least one kept (mergekit)
    assert int(sp.magnitude_mask(d, 0.55).sum()) == 5  # int(5.5)


# -- float32 evaluation vs float64 formulas -----------------------------------------------------------


def test_slerp_fp32_and_fallback_counter():
    base, (x,) = models(1, seed=8, spread=1.0)
    out, inputs = run("slerp", [x], base, [{}], {"t": 0.3})
    expected, fb = ref.ref_slerp(0.3, base.double().numpy(), x.double().numpy())
    assert not fb and inputs.stats.get("slerp_lerp_fallback", 0) == 0
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    near = base + 1e-4 * torch.randn(base.shape)
    out, inputs = run("slerp", [near], base, [{}], {"t": 0.3})
    assert inputs.stats["slerp_lerp_fallback"] == 1
    np.testing.assert_allclose(out.double().numpy(), 0.7 * base.double().numpy() + 0.3 * near.double().numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_fp32(flatten, row_wise):
    base, xs = models(2, seed=9, spread=0.5)
    g = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    out, _ = run("nuslerp", xs, base, [{"weight": 0.25}, {"weight": 0.5}], g)
    expected = ref.ref_nuslerp([0.25, 0.5], [x.double().numpy() for x in xs], base.double().numpy(),
                               flatten, row_wise)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_fp32(filter_wise):
    base, xs = models(3, seed=10, spread=0.1)
    out, _ = run("model_stock", xs, base, [{}] * 3, {"filter_wise": filter_wise})
    expected = ref.ref_model_stock(base.double().numpy(), [x.double().numpy() for x in xs], filter_wise)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_linear_zero_weight_sum_is_a_config_error():
    _, xs = models(2, seed=11)
    with pytest.raises(ConfigError, match="sum to"):
        run("linear", xs, None, [{"weight": 1.0}, {"weight": -1.0}])


def test_chunking_does_not_change_task_vector_results():
    """The combination loop runs in fixed chunks; chunk size changes nothing but speed."""
    from adaptkit.merge.task_arithmetic import combine_task_vectors

    base, xs = models(3, shape=(100, 1000), seed=12)
    masks = [sp.magnitude_mask(x - base, 0.4) for x in xs]
    kw = dict(masks=masks, consensus="sum", normalize=True)
    a = combine_task_vectors(base, xs, [0.5, 0.3, 0.2], **kw)
    b = combine_task_vectors(base, xs, [0.5, 0.3, 0.2], chunk=4099, **kw)
    assert torch.equal(a, b)
