"""adaptkit's merge functions against mergekit 0.1.5's own tensor functions, called in-process on plain
tensors (tests only; skipped without mergekit). Inputs are bf16-valued (as real checkpoints), both tools
compute in float32.

* mergekit mode (``magnitude_tiebreak: sort``, ``election_precision: compute``): ties, breadcrumbs,
  breadcrumbs_ties, task_arithmetic and linear are bit-identical in float32;
* slerp, nuslerp, model_stock reduce in another order (adaptkit: fixed rows, float64 across rows): equal after rounding to
  bf16 except rare one-ulp boundary cases;
* the default mode differs from mergekit only where mergekit's choice is arbitrary (magnitude ties at the
  trim threshold) or decided by fp32 rounding (an exactly cancelling election score);
* DARE / DELLA: same kept fraction and rescale in distribution.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from mergekit.sparsify import bernoulli, magnitude, magnitude_outliers  # noqa: E402

from adaptkit.merge import sparsify as sp  # noqa: E402
from adaptkit.merge.api import MergeInputs  # noqa: E402
from tests.merge.builtin_registry import builtin_registry  # noqa: E402


REG = builtin_registry()


def run(method, tensors, base, params, global_params, *, seed=0):
    """Call a registered method like the engine does: declared defaults filled in."""
    comp = REG.get(method)
    params = [dict(p) for p in params]
    for p in params:
        for d in comp.params:
            if d.scope != "global" and d.name not in p and not d.required:
                p[d.name] = d.default
    g = dict(global_params)
    for d in comp.params:
        if d.scope != "model" and d.name not in g and not d.required:
            g[d.name] = d.default
    inputs = MergeInputs(name="w", tensors=list(tensors), base=base, params=params, global_params=g, seed=seed)
    return comp.load()(inputs), inputs

MERGEKIT_MODE = {"magnitude_tiebreak": "sort", "election_precision": "compute"}


def bf16_models(n, shape=(96, 128), seed=0, spread=0.02):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    xs = [(base + spread * torch.randn(shape, generator=g)).to(torch.bfloat16).float() for _ in range(n)]
    return base, xs


def mk(method, tensors, base, params):
    inputs = ([base] if base is not None else []) + list(tensors)
    return merge_tensors(inputs, method, parameters=params, base_index=0 if base is not None else None,
                         dtype=torch.float32)


def assert_bf16_close(ours, theirs, max_frac=1e-3):
    a = ours.to(torch.bfloat16)
    b = theirs.to(torch.bfloat16)
    diff = a != b
    assert diff.float().mean().item() <= max_frac, f"{int(diff.sum())} of {diff.numel()} bf16 values differ"
    if diff.any():  # at most one bf16 ulp apart (values from cancellation near 0: fp32-noise absolute)
        big = torch.maximum(a.float().abs(), b.float().abs())[diff]
        tol = torch.finfo(torch.bfloat16).eps * big * 1.01 + 1e-6
        assert ((a.float() - b.float()).abs()[diff] <= tol).all()


W = [0.6, 0.3, 0.45]
D = [0.4, 0.25, 0.7]
G = [0.02, 0.05, 0.1]


@pytest.mark.parametrize(
    "method,params,g",
    [
        ("task_arithmetic", {"weight": W}, {"lambda": 0.8}),
        ("task_arithmetic", {"weight": W}, {"normalize": True}),
        ("ties", {"weight": W, "density": D}, {}),
        ("ties", {"weight": [0.7, 0.4, -0.2], "density": D}, {"normalize": False}),
        ("ties", {"weight": W, "density": D}, {"rescale": True}),
        ("breadcrumbs", {"weight": W, "density": D, "gamma": G}, {}),
        ("breadcrumbs_ties", {"weight": W, "density": D, "gamma": G}, {"normalize": True}),
    ],
)
def test_task_vector_methods_bit_identical_in_mergekit_mode(method, params, g):
    base, xs = bf16_models(3, seed=1)
    theirs = mk(method, xs, base, dict(params, **g))
    per_model = [{k: v[i] for k, v in params.items()} for i in range(3)]
    gg = dict(g, **{k: v for k, v in MERGEKIT_MODE.items() if k in {p.name for p in _params(method)}})
    ours, _ = run(method, xs, base, per_model, gg)
    if g.get("rescale"):  # the L1 factor: sums in another order (adaptkit: det_sum), equal after bf16 rounding
        assert_bf16_close(ours, theirs)
    else:
        assert torch.equal(ours, theirs)


def _params(method):
    return REG.get(method).params


def test_ties_default_mode_differs_only_at_arbitrary_choices():
    """Default mode vs mergekit: differences only where the trim threshold has tied magnitudes or the
    election score cancels exactly (to fp32 rounding); elsewhere bit-identical."""
    base, xs = bf16_models(3, seed=2)
    params = {"weight": W, "density": D}
    theirs = mk("ties", xs, base, params)
    ours, _ = run("ties", xs, base, [{"weight": w, "density": d} for w, d in zip(W, D)], {})
    ambiguous = torch.zeros(base.shape, dtype=torch.bool)
    score = torch.zeros(base.shape, dtype=torch.float64)
    scale = torch.zeros(base.shape, dtype=torch.float64)
    for x, w, d in zip(xs, W, D):
        delta = x - base
        a = delta.abs()
        k = max(1, int(d * a.numel()))
        t = a.reshape(-1).kthvalue(a.numel() - k + 1).values
        ambiguous |= a == t
        kept = w * delta.double() * sp.magnitude_mask(delta, d)
        score += kept
        scale += kept.abs()
    ambiguous |= score.abs() <= 1e-6 * scale
    assert torch.equal(ours[~ambiguous], theirs[~ambiguous])


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp(t):
    base, (x,) = bf16_models(1, seed=3, spread=0.5)
    ours, _ = run("slerp", [x], base, [{}], {"t": t})
    assert_bf16_close(ours, mk("slerp", [x], base, {"t": t}))


def test_slerp_near_colinear_falls_back_like_mergekit():
    base, (x,) = bf16_models(1, seed=4, spread=0.001)
    ours, inputs = run("slerp", [x], base, [{}], {"t": 0.4})
    assert inputs.stats["slerp_lerp_fallback"] == 1
    assert_bf16_close(ours, mk("slerp", [x], base, {"t": 0.4}))


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp(with_base, flatten, row_wise):
    base, xs = bf16_models(2, seed=5, spread=0.3)
    b = base if with_base else None
    g = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    ours, _ = run("nuslerp", xs, b, [{"weight": 0.3}, {"weight": 0.8}], g)
    assert_bf16_close(ours, mk("nuslerp", xs, b, dict(g, weight=[0.3, 0.8])))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(filter_wise):
    base, xs = bf16_models(3, seed=6, spread=0.05)
    ours, _ = run("model_stock", xs, base, [{}] * 3, {"filter_wise": filter_wise})
    assert_bf16_close(ours, mk("model_stock", xs, base, {"filter_wise": filter_wise}))


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    _, xs = bf16_models(3, seed=7)
    ours, _ = run("linear", xs, None, [{"weight": w} for w in W], {"normalize": normalize})
    assert_bf16_close(ours, mk("linear", xs, None, {"weight": W, "normalize": normalize}), max_frac=0)


def test_magnitude_masks_against_mergekit_sparsify():
    base, (x,) = bf16_models(1, seed=8, shape=(256, 300))
    delta = x - base
    for density in (0.1, 0.5, 0.9):
        theirs = magnitude(delta, density) != 0
        assert torch.equal(sp.sort_magnitude_mask(delta, density) & (delta != 0), theirs)
        ours = sp.magnitude_mask(delta, density)
        assert int(ours.sum()) == max(1, int(density * delta.numel()))
        # same set above the threshold; only the choice among tied magnitudes differs
        a = delta.abs()
        t = a[ours].min()
        assert torch.equal(ours & (a > t), theirs & (a > t))
        theirs_bc = magnitude_outliers(delta, density, gamma=0.05) != 0
        assert torch.equal(sp.sort_outliers_mask(delta, density, 0.05) & (delta != 0), theirs_bc)


def test_dare_distribution_matches_mergekit_bernoulli():
    base, (x,) = bf16_models(1, seed=9, shape=(200, 250))
    delta = x - base
    torch.manual_seed(0)
    theirs = bernoulli(delta, 0.3, rescale_norm="l1")
    ours, _ = run("dare_linear", [x], base, [{"weight": 1.0, "density": 0.3}], {"rescale": True}, seed=1)
    ours_d = ours - base
    nz = delta != 0  # bf16 checkpoints: some entries do not change at all
    n = int(nz.sum())
    sd = math.sqrt(n * 0.3 * 0.7)
    for kept in (int((theirs[nz] != 0).sum()), int((ours_d[nz] != 0).sum())):
        assert abs(kept - 0.3 * n) <= 5 * sd
    # the L1 norm of the rescaled delta equals the original's in both
    for r in (theirs, ours_d):
        assert abs(r.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-3
