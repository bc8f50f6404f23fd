"""GPTQ against an independent float64 reference written plainly here (the OBS recursion, column by column,
with the inverse Hessian updated by Gaussian elimination instead of a Cholesky factor), plus the
fix-up paths, act-order grouping and the streaming driver on the tiny Llama."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adaptkit.errors import CheckpointError  # noqa: E402
from adaptkit_quant import gptq  # noqa: E402
from adaptkit.quantize.api import QuantSpec  # noqa: E402


# -- an independent reference ------------------------------------------------------------------------------
def ref_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented grid (api.py / specs/formats.md), written from the spec: per row scale, zero."""
    maxq = 2**bits - 1
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    scale = torch.empty_like(lo)
    zero = torch.empty_like(lo)
    for r in range(w.shape[0]):
        a, b = float(lo[r]), float(hi[r])
        if sym:
            m = max(-a, b) or 1.0
            s = float(torch.tensor(2 * m / maxq).half())
            z = 2 ** (bits - 1)
        else:
            if a == 0 and b == 0:
                a, b = -1.0, 1.0
            s = float(torch.tensor((b - a) / maxq).half())
            z = round(-a / s)
            if z < 1:
                s = max(s, float(torch.tensor(b / (maxq - 1)).half()))
                z = 1
        scale[r], zero[r] = s, z
    return scale, zero


def ref_gptq(W: torch.Tensor, X: torch.Tensor, *, bits: int, gs: int, sym: bool, act_order: bool, damp: float,
             order: list[int] | None = None, by_original_group: bool = False):
    """Plain float64 GPTQ: returns (codes [out,in] in original order, W_hat [out,in]). ``order``: an explicit
    processing order; groups are the runs of ``gs`` positions in that order, or with ``by_original_group``
    the runs of positions whose original columns share ``i // gs``."""
    W = W.double().clone()
    X = X.double()
    n = X.shape[1]
    H = 2.0 * X @ X.T / n
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    for i in range(cols):
        if dead[i]:
            H[i, i] = 1.0
            W[:, i] = 0
    order = list(order) if order is not None else list(range(cols))
    if act_order:
        order = sorted(range(cols), key=lambda i: (-float(H[i, i]), i))
    W = W[:, order]
    H = H[order][:, order]
    H = H + damp * float(torch.diag(H).mean()) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    maxq = 2**bits - 1
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scale = zero = None
    if gs == -1:
        scale, zero = ref_grid(W, bits, sym)
    for j in range(cols):
        if gs != -1 and by_original_group and (j == 0 or order[j] // gs != order[j - 1] // gs):
            size = sum(1 for i in order[j:j + gs] if i // gs == order[j] // gs)
            scale, zero = ref_grid(W[:, j:j + size], bits, sym)
        elif gs != -1 and not by_original_group and j % gs == 0:
            scale, zero = ref_grid(W[:, j:j + gs], bits, sym)
        w = W[:, j]
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        codes[:, j] = q
        Q[:, j] = scale * (q - zero)
        err = (w - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        # remove variable j from the inverse Hessian (Gaussian elimination)
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    inv = [0] * cols
    for pos, i in enumerate(order):
        inv[i] = pos
    return codes[:, inv], Q[:, inv]


def ref_rtn(W: torch.Tensor, bits: int, gs: int, sym: bool) -> torch.Tensor:
    out = torch.empty_like(W, dtype=torch.float64)
    maxq = 2**bits - 1
    for g0 in range(0, W.shape[1], gs):
        w = W[:, g0:g0 + gs].double()
        s, z = ref_grid(w, bits, sym)
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
        out[:, g0:g0 + gs] = s[:, None] * (q - z[:, None])
    return out


def correlated_inputs(cols: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scales = torch.exp(torch.randn(cols, generator=g))  # channels of different magnitude
    z = torch.randn(cols, n, generator=g)
    return (mix @ z + 0.3 * z) * scales[:, None]


def out_err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W.double() - W_hat.double()) @ X.double()))


def hessian(X: torch.Tensor) -> torch.Tensor:
    acc = gptq.HessianAccumulator(X.shape[0])
    for chunk in X.T.split(97):  # uneven batches: the sum must not depend on batching
        acc.add(chunk)
    return acc.hessian()


@pytest.mark.parametrize(
    "bits,gs,sym,act_order",
    [(4, 32, True, False), (4, 32, False, False), (3, -1, True, False), (4, 32, True, True), (2, 16, False, True), (8, 64, True, False)],
)
def test_gptq_matches_float64_reference(bits, gs, sym, act_order):
    g = torch.Generator().manual_seed(bits * 100 + (gs % 97))
    W = torch.randn(24, 128, generator=g)
    X = correlated_inputs(128, 512, seed=3)
    spec = QuantSpec(bits=bits, group_size=gs, sym=sym, act_order=act_order, damp=0.01)
    ql, stats = gptq.gptq_quantize(W, hessian(X), spec, block_size=48, compute_dtype=torch.float64)
    codes_ref, W_ref = ref_gptq(W, X, bits=bits, gs=gs, sym=sym, act_order=act_order, damp=0.01)
    mismatch = float((ql.codes.double() != codes_ref).double().mean())
    assert mismatch < 0.002, f"{mismatch:.4%} of codes differ from the reference"
    e_ours, e_ref = out_err(W, ql.dequantize(), X), out_err(W, W_ref, X)
    assert e_ours == pytest.approx(e_ref, rel=1e-3)
    assert stats.retries == 0


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_partial_last_group_matches_float64_reference(act_order):
    """112 input columns in groups of 32: the fourth group has 16 columns (--partial-groups)."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(20, 112, generator=g)
    X = correlated_inputs(112, 512, seed=5)
    spec = QuantSpec(bits=4, group_size=32, sym=False, act_order=act_order, damp=0.01, partial_groups=True)
    ql, _ = gptq.gptq_quantize(W, hessian(X), spec, block_size=64, compute_dtype=torch.float64)
    assert ql.scales.shape == (4, 20)
    assert torch.bincount(ql.g_idx.long(), minlength=4).tolist() == [32, 32, 32, 16]
    codes_ref, W_ref = ref_gptq(W, X, bits=4, gs=32, sym=False, act_order=act_order, damp=0.01)
    assert float((ql.codes.double() != codes_ref).double().mean()) < 0.002
    assert out_err(W, ql.dequantize(), X) == pytest.approx(out_err(W, W_ref, X), rel=1e-3)


def test_group_aware_order_matches_reference_and_keeps_contiguous_groups():
    """GAR: inside each group columns by decreasing diag(H), groups by decreasing max diag(H); the result
    equals the float64 recursion run in that order, and g_idx stays i // group_size."""
    g = torch.Generator().manual_seed(21)
    W = torch.randn(24, 128, generator=g)
    X = correlated_inputs(128, 512, seed=6)
    H = hessian(X)
    d = [float(v) for v in torch.diagonal(2.0 * X.double() @ X.double().T / X.shape[1])]
    groups = [list(range(g0, g0 + 32)) for g0 in range(0, 128, 32)]
    inner = [sorted(grp, key=lambda i: (-d[i], i)) for grp in groups]
    gorder = sorted(range(4), key=lambda k: (-max(d[i] for i in groups[k]), k))
    order = [i for k in gorder for i in inner[k]]
    assert gorder != [0, 1, 2, 3]  # the test data does reorder the groups
    spec = QuantSpec(bits=4, group_size=32, sym=True, damp=0.01)
    ql, _ = gptq.gptq_quantize(W, H, spec, block_size=64, compute_dtype=torch.float64, group_aware=True)
    assert torch.equal(ql.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    codes_ref, W_ref = ref_gptq(W, X, bits=4, gs=32, sym=True, act_order=False, damp=0.01, order=order)
    assert float((ql.codes.double() != codes_ref).double().mean()) < 0.002
    assert out_err(W, ql.dequantize(), X) == pytest.approx(out_err(W, W_ref, X), rel=1e-3)
    # and it is not the natural order's result
    plain, _ = gptq.gptq_quantize(W, H, spec, block_size=64, compute_dtype=torch.float64)
    assert not torch.equal(plain.codes, ql.codes)


def test_group_aware_order_with_a_partial_group():
    """112 columns in groups of 32: the 16-column group may be processed anywhere in GAR order."""
    g = torch.Generator().manual_seed(22)
    W = torch.randn(16, 112, generator=g)
    X = correlated_inputs(112, 512, seed=7)
    X[96:] *= 5.0  # the short group holds the most salient columns: GAR processes it first
    spec = QuantSpec(bits=4, group_size=32, sym=False, damp=0.01, partial_groups=True)
    ql, _ = gptq.gptq_quantize(W, hessian(X), spec, block_size=64, compute_dtype=torch.float64, group_aware=True)
    assert ql.scales.shape == (4, 16)
    assert torch.equal(ql.g_idx, torch.arange(112, dtype=torch.int32) // 32)
    d = [float(v) for v in torch.diagonal(2.0 * X.double() @ X.double().T / X.shape[1])]
    groups = [list(range(g0, min(g0 + 32, 112))) for g0 in range(0, 112, 32)]
    inner = [sorted(grp, key=lambda i: (-d[i], i)) for grp in groups]
    gorder = sorted(range(4), key=lambda k: (-max(d[i] for i in groups[k]), k))
    assert gorder[0] == 3  # the short group first
    order = [i for k in gorder for i in inner[k]]
    codes_ref, W_ref = ref_gptq(W, X, bits=4, gs=32, sym=False, act_order=False, damp=0.01, order=order,
                                by_original_group=True)
    assert float((ql.codes.double() != codes_ref).double().mean()) < 0.002
    assert out_err(W, ql.dequantize(), X) == pytest.approx(out_err(W, W_ref, X), rel=1e-3)
    assert out_err(W, ql.dequantize(), X) < out_err(W, ref_rtn(W, 4, 32, False), X)


def test_gptq_float32_close_to_reference():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 256, generator=g)
    X = correlated_inputs(256, 1024, seed=4)
    ql, _ = gptq.gptq_quantize(W, hessian(X), QuantSpec(bits=4, group_size=128), compute_dtype=torch.float32)
    _, W_ref = ref_gptq(W, X, bits=4, gs=128, sym=True, act_order=False, damp=0.01)
    assert out_err(W, ql.dequantize(), X) == pytest.approx(out_err(W, W_ref, X), rel=0.02)


@pytest.mark.parametrize("bits,gs", [(4, 32), (3, 64), (4, -1)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, gs):
    g = torch.Generator().manual_seed(11)
    W = torch.randn(48, 128, generator=g)
    X = correlated_inputs(128, 1024, seed=5)
    ql, _ = gptq.gptq_quantize(W, hessian(X), QuantSpec(bits=bits, group_size=gs, sym=True))
    rtn = ref_rtn(W, bits, 128 if gs == -1 else gs, True)
    e_gptq, e_rtn = out_err(W, ql.dequantize(), X), out_err(W, rtn, X)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_act_order_g_idx_is_a_valid_permuted_grouping():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 128, generator=g)
    X = correlated_inputs(128, 400, seed=6)
    H = hessian(X)
    ql, _ = gptq.gptq_quantize(W, H, QuantSpec(bits=4, group_size=32, act_order=True))
    g_idx = ql.g_idx.long()
    assert sorted(torch.bincount(g_idx).tolist()) == [32, 32, 32, 32]
    order = sorted(range(128), key=lambda i: (-float(H[i, i]), i))
    for pos, col in enumerate(order):
        assert int(g_idx[col]) == pos // 32
    assert not torch.equal(g_idx, torch.arange(128) // 32)  # really permuted
    # the stored (unpermuted) codes decode to the reference reconstruction
    _, W_ref = ref_gptq(W, X, bits=4, gs=32, sym=True, act_order=True, damp=0.01)
    assert out_err(W, ql.dequantize(), X) == pytest.approx(out_err(W, W_ref, X), rel=0.02)


def test_static_groups_keep_contiguous_groups():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(8, 64, generator=g)
    X = correlated_inputs(64, 300, seed=1)
    spec = QuantSpec(bits=4, group_size=16, act_order=True, static_groups=True)
    ql, _ = gptq.gptq_quantize(W, hessian(X), spec)
    assert torch.equal(ql.g_idx.long(), torch.arange(64) // 16)
    s_ref, _ = ref_grid(W[:, :16].double(), 4, True)
    assert torch.allclose(ql.scales[0].double(), s_ref)


def test_dead_columns_are_zeroed_and_finite():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(32, 200, generator=g)
    X[[3, 17]] = 0.0
    ql, stats = gptq.gptq_quantize(W, hessian(X), QuantSpec(bits=4, group_size=16))
    assert stats.dead == 2
    deq = ql.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, [3, 17]] == 0)


def _indefinite_hessian(n: int, min_eig_frac: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    mean_diag = float(lam.mean())
    lam[0] = -min_eig_frac * mean_diag
    return (q * lam) @ q.T


def test_non_positive_definite_hessian_is_fixed_by_more_damping():
    H = _indefinite_hessian(32, 0.05)  # damp 0.01 cannot fix it, 0.1 can
    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    ql, stats = gptq.gptq_quantize(W, H, QuantSpec(bits=4, group_size=16, damp=0.01))
    assert stats.retries == 1 and stats.damp == pytest.approx(0.1)
    assert "damp=0.1" in stats.notes[0]
    assert torch.isfinite(ql.dequantize()).all()


def test_unfixable_hessian_is_a_one_line_error():
    H = _indefinite_hessian(32, 50.0)  # needs damp > 10: beyond the limit
    W = torch.randn(4, 32)
    with pytest.raises(CheckpointError) as exc:
        gptq.gptq_quantize(W, H, QuantSpec(bits=4, group_size=16), name="model.layers.0.mlp.down_proj")
    msg = exc.value.one_line()
    assert "model.layers.0.mlp.down_proj" in msg and "not positive definite" in msg and "\n" not in msg
    H2 = torch.eye(32, dtype=torch.float64)
    H2[1, 1] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/inf"):
        gptq.gptq_quantize(W, H2, QuantSpec(bits=4, group_size=16), name="x")


def test_hessian_accumulation_matches_formula():
    X = correlated_inputs(16, 300, seed=2)
    H = hessian(X.float())
    ref = 2.0 * X.double() @ X.double().T / 300
    assert torch.allclose(H, ref, rtol=1e-5, atol=1e-6)
