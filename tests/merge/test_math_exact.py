"""TIES and DARE (fixed mask) against an independent float64 reference, correctly rounded to bf16.

adaptkit computes in fp32 and the engine rounds once to the output dtype; the float64 reference
(specs/tools/make_merge_vectors.py, numpy) is rounded once to bf16 *directly* (round-half-even on 8
significant bits, no double rounding through fp32). Every element must round to the same bf16 value, except
elements whose exact value lies so close to a bf16 rounding boundary that fp32 evaluation error can move it
across: within 8 fp32 ulps of the magnitudes involved (|base| + sum_i |w_i delta_i|). Such differing elements
are counted and must be rare (at most 3 of 3840; observed 0 or 1).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptkit.merge import sparsify as sp
from adaptkit.merge.task_arithmetic import combine_task_vectors

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("merge_ref", ROOT / "specs" / "tools" / "make_merge_vectors.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float64 -> bf16 value (as float64), round half to even; normal range only."""
    m, e = np.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    return np.ldexp(np.rint(m * 256.0), e - 8)


def boundary_distance(x: np.ndarray) -> np.ndarray:
    """Distance of x to the nearest bf16 rounding boundary (midpoint between two bf16 values)."""
    m, e = np.frexp(x)
    s = np.abs(m) * 256.0
    return np.abs(s - (np.floor(s) + 0.5)) * np.ldexp(1.0, e - 8)


def assert_bf16_equal(ours: torch.Tensor, ref64: np.ndarray, scale: np.ndarray, max_excused: int = 3) -> int:
    got = ours.to(torch.bfloat16).to(torch.float64).numpy()
    want = round_bf16(ref64)
    tol = 8 * 2.0**-24 * scale
    excused = boundary_distance(ref64) <= tol
    bad = (got != want) & ~excused
    assert not bad.any(), (
        f"{int(bad.sum())} elements differ from the correctly rounded reference, e.g. "
        f"ours={got[bad][:3]}, ref={want[bad][:3]}, exact={ref64[bad][:3]}"
    )
    n_excused = int(((got != want) & excused).sum())
    assert n_excused <= max_excused, f"{n_excused} differing elements near a bf16 boundary (expected ~none)"
    return n_excused


def bf16_models(n_models: int, shape=(48, 80), seed=0, spread=0.02):
    """bf16-valued checkpoints (as fp32, like the engine's upcast), fine-tunes of a common base."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    xs = [(base + spread * torch.randn(shape, generator=g)).to(torch.bfloat16).float() for _ in range(n_models)]
    return base, xs


def _scale(base, xs, weights, masks=None, factors=None):
    s = np.abs(base.double().numpy())
    for i, (x, w) in enumerate(zip(xs, weights)):
        d = np.abs((x.double() - base.double()).numpy()) * abs(w)
        if factors is not None:
            d = d * factors[i]
        s = s + d
    return s


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"normalize_by": "count"},
        {"sign_election": "unweighted", "consensus": "count"},
        {"rescale": "l1"},
        {"normalize": False, "lambda_": 0.7},
    ],
    ids=["mergekit", "disjoint-mean", "paper-election", "l1-rescale", "sum-lambda"],
)
def test_ties_equals_correctly_rounded_fp64(opts):
    base, xs = bf16_models(3, seed=1)
    weights = [0.6, 0.3, 0.45]
    densities = [0.4, 0.25, 0.7]
    b64 = base.double().numpy()
    x64 = [x.double().numpy() for x in xs]
    # the mask: adaptkit's trim must equal the reference's (exact top-k, ties by lower index) ...
    masks = [sp.magnitude_mask(x - base, d) for x, d in zip(xs, densities)]
    ref_masks = [ref.ref_topk_mask(x - b64, d) for x, d in zip(x64, densities)]
    for m, rm in zip(masks, ref_masks):
        assert np.array_equal(m.numpy(), rm)
    options = {"consensus": "sum", "normalize": True}
    options.update(opts)
    lam = options.pop("lambda_", 1.0)
    ours = combine_task_vectors(base, xs, weights, masks=masks, lambda_=lam, **options)
    expected = ref.ref_task_vectors(b64, x64, weights, masks=ref_masks, lam=lam, **options)
    factors = None
    if options.get("rescale") == "l1":
        factors = [
            np.abs(x - b64).sum() / np.abs((x - b64) * m).sum() for x, m in zip(x64, ref_masks)
        ]
    assert_bf16_equal(ours, expected, _scale(base, xs, weights, factors=factors) * abs(lam) + np.abs(b64))


@pytest.mark.parametrize("rescale", ["l1", "inverse_p"])
@pytest.mark.parametrize("consensus", ["sum", None])
def test_dare_fixed_mask_equals_correctly_rounded_fp64(rescale, consensus):
    base, xs = bf16_models(2, seed=2)
    weights = [0.8, 0.5]
    densities = [0.3, 0.6]
    rng = np.random.default_rng(5)
    masks = [rng.random(base.shape) < d for d in densities]
    ours = combine_task_vectors(
        base, xs, weights, masks=[torch.from_numpy(m) for m in masks], rescale=rescale,
        keep_probs=densities, consensus=consensus, normalize=False,
    )
    b64 = base.double().numpy()
    x64 = [x.double().numpy() for x in xs]
    expected = ref.ref_task_vectors(
        b64, x64, weights, masks=masks, rescale=rescale, keep_probs=densities, consensus=consensus
    )
    factors = [1 / d for d in densities]
    assert_bf16_equal(ours, expected, _scale(base, xs, weights, factors=factors) * 1.5)


def test_dare_mask_builder_is_the_mask_used():
    """The exposed mask builder gives exactly the mask dare_linear applies (same seed, same tensor)."""
    from adaptkit.merge.api import MergeInputs
    from adaptkit.merge.task_arithmetic import dare_linear

    base, xs = bf16_models(1, seed=3)
    inp = MergeInputs(
        name="w", tensors=xs, base=base, params=[{"weight": 1.0, "density": 0.35}],
        global_params={"rescale": True, "rescale_mode": "inverse_p", "normalize": False, "lambda": 1.0},
        seed=11,
    )
    out = dare_linear(inp)
    mask = sp.bernoulli_mask(base.shape, 0.35, inp.generator(0))
    expected = ref.ref_task_vectors(
        base.double().numpy(), [xs[0].double().numpy()], [1.0], masks=[mask.numpy()],
        rescale="inverse_p", keep_probs=[0.35],
    )
    assert_bf16_equal(out, expected, _scale(base, xs, [1.0], factors=[1 / 0.35]))
