"""RTN against a float64 reference of the grid in specs/formats.md."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adaptkit.quantize.api import QuantSpec  # noqa: E402
from adaptkit_quant.rtn import quantize_weight  # noqa: E402


def _ref_group(w: "torch.Tensor", bits: int, sym: bool):
    """float64 reference for one group [out, g]: (scale, zero, codes)."""
    w = w.double()
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    f16 = lambda x: x.clamp(min=2.0**-14).half().double()  # noqa: E731
    if sym:
        amax = torch.maximum(-xmin, xmax)
        amax[amax == 0] = 1
        scale = f16(2 * amax / maxq)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin[empty], xmax[empty] = -1, 1
        scale = f16((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale)
        low = zero < 1
        scale[low] = torch.maximum(scale[low], f16(xmax[low] / (maxq - 1)))
        zero[low] = 1
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return scale, zero, codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_float64_reference(bits: int, sym: bool) -> None:
    g = torch.Generator().manual_seed(bits * 10 + sym)
    w = torch.randn(32, 128, generator=g) * 0.02
    w[3, :32] = w[3, :32].abs()  # a group with no negative values (zero point would be 0)
    w[5, 32:64] = 0.0  # an all-zero group
    spec = QuantSpec(bits=bits, group_size=32, sym=sym)
    q = quantize_weight(w, spec)
    assert q.codes.shape == (32, 128) and q.scales.shape == (4, 32) and q.zeros.shape == (4, 32)
    assert torch.equal(q.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    for gi in range(4):
        s, z, c = _ref_group(w[:, gi * 32:(gi + 1) * 32], bits, sym)
        assert torch.equal(q.scales[gi].double(), s), gi
        assert torch.equal(q.zeros[gi].double(), z), gi
        mism = (q.codes[:, gi * 32:(gi + 1) * 32].double() != c)
        # only exact .5 ties may round differently between fp32 and fp64 division
        assert int(mism.sum()) <= 1
    assert int(q.zeros.min()) >= 1  # GPTQ v1 representable
    w_hat = q.dequantize()
    err = (w_hat - w).abs()
    half_step = q.scales[q.g_idx.long()].T / 2
    # half a step, plus what rounding the scale to fp16 (rel. 2**-11) moves the outermost grid point
    assert bool((err <= half_step * (1 + 2**bits * 2.0**-11) + 1e-7).all())


def test_rtn_per_channel() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, QuantSpec(bits=4, group_size=-1, sym=False))
    assert q.scales.shape == (1, 16) and int(q.g_idx.max()) == 0
    s, z, c = _ref_group(w, 4, False)
    assert torch.equal(q.scales[0].double(), s) and torch.equal(q.codes.double(), c)


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_partial_last_group_matches_reference(sym: bool) -> None:
    """in_features 80 with groups of 32: groups [0,32), [32,64) and a shorter [64,80) (--partial-groups)."""
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(5)) * 0.02
    w[2, 64:] = w[2, 64:].abs() + 0.01  # the short group of row 2 has no negative value
    q = quantize_weight(w, QuantSpec(bits=4, group_size=32, sym=sym, partial_groups=True))
    assert q.codes.shape == (16, 80) and q.scales.shape == (3, 16)
    assert torch.equal(q.g_idx, torch.arange(80, dtype=torch.int32) // 32)
    for gi, (a, b) in enumerate([(0, 32), (32, 64), (64, 80)]):
        s, z, c = _ref_group(w[:, a:b], 4, sym)
        assert torch.equal(q.scales[gi].double(), s), gi
        assert torch.equal(q.zeros[gi].double(), z), gi
        assert int((q.codes[:, a:b].double() != c).sum()) <= 1, gi
