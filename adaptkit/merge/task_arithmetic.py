"""Task-vector methods: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
della_linear. Pure tensor functions; formulas and defaults in specs/merge-math.md.

Every method is ``base + lambda * combine(sparsify(model_i - base))``:

1. ``delta_i = tensors[i] - base``;
2. sparsify: ``delta_i * mask_i`` (``adaptkit.merge.sparsify``), then rescale (``l1``: multiply by
   ``sum|delta_i| / sum|delta_i * mask_i|``, mergekit; ``inverse_p``: divide each kept element by its keep
   probability, the DARE/DELLA papers) -- models whose mask is ``None`` (density >= 1) are left unscaled;
3. weight: ``wdelta_i = weight_i * delta_i``;
4. optional TIES consensus (``adaptkit.merge.consensus``): only entries agreeing with the elected sign count;
5. ``mixed = sum_i wdelta_i [* agree_i]``, divided by the divisor when ``normalize``;
6. ``out = base + lambda * mixed`` (the multiplication is skipped when lambda == 1).

``combine_task_vectors`` performs steps 1-6 for given masks (so tests can pass a fixed mask); the method
functions below build the masks from ``MergeInputs`` and call it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from adaptkit.merge._util import det_sum, flat_chunks
from adaptkit.merge.consensus import agreement, elect_sign

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs
    from adaptkit.merge.sparsify import Masker

_RESCALE_EPS = 1e-7  # mergekit: no L1 rescale when either norm is below this
_WEIGHT_SUM_EPS = 1e-8  # mergekit: a weight sum below this is treated as 1 when normalizing


COMBINE_CHUNK = 1 << 18  #: elements per chunk of the L1 sums (their float64 grouping)
LOOP_CHUNK = 1 << 16  #: elements per piece of the elementwise combination loop (buffers stay in cache)


def _as_masker(m: Any) -> "Masker | None":
    from adaptkit.merge.sparsify import Masker, TensorMasker

    if m is None or isinstance(m, Masker):
        return m
    return TensorMasker(m)


def l1_rescale_factor(x: "torch.Tensor", base: "torch.Tensor | None", mask: Any, chunk: int = COMBINE_CHUNK) -> float:
    """mergekit's L1 rescale of the sparsified ``delta = x - base``: ``sum|delta| / sum|delta * mask|``,
    float64 sums with a fixed order; 1.0 when either sum is below 1e-7. ``mask``: bool tensor or Masker.
    ``base=None``: ``x`` already is the delta."""
    import torch

    masker = _as_masker(mask)
    xf = x.reshape(-1)
    bf = None if base is None else base.reshape(-1)
    n = xf.numel()
    before = 0.0
    after = 0.0
    buf = torch.empty(min(chunk, max(1, n)), dtype=xf.dtype, device=xf.device)
    dbuf = torch.empty(min(chunk, max(1, n)), dtype=xf.dtype, device=xf.device)
    for s, e in flat_chunks(n, chunk):
        if bf is None:
            d = xf[s:e]
        else:
            d = torch.sub(xf[s:e], bf[s:e], out=dbuf[: e - s])
        m = None if masker is None else masker.mask(s, e, d, buf[: e - s])
        a = torch.abs(d, out=dbuf[: e - s])
        before += det_sum(a)
        if m is not None:
            a.mul_(m)
        after += det_sum(a)
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return 1.0
    return before / after


def combine_task_vectors(
    base: "torch.Tensor",
    tensors: Sequence["torch.Tensor"],
    weights: Sequence[float],
    *,
    masks: Sequence[Any] | None = None,
    rescale: str | None = None,
    keep_probs: Sequence["float | torch.Tensor | None"] | None = None,
    consensus: str | None = None,
    sign_election: str = "weighted",
    normalize: bool = False,
    normalize_by: str = "weight",
    lambda_: float = 1.0,
    election_precision: str = "float64",
    chunk: int = COMBINE_CHUNK,
    deltas_given: bool = False,
    out: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """Steps 1-6 of the module docstring, in fixed chunks of the flattened tensors.

    ``masks[i]``: a boolean keep-mask, a ``sparsify.Masker`` (evaluated chunk by chunk), or ``None`` (no
    sparsification, no rescale). ``rescale``: ``None``, ``"l1"`` or ``"inverse_p"``; for ``"inverse_p"``
    ``keep_probs[i]`` is the keep probability (a float, or a tensor of per-element probabilities for
    DELLA). ``consensus``: ``None``, ``"sum"`` or ``"count"``; ``sign_election``: ``"weighted"`` (elect on
    ``weight_i * delta_i``) or ``"unweighted"`` (on ``delta_i``). ``normalize_by``: ``"weight"`` divides by
    the sum of the weights (of the agreeing models under consensus), ``"count"`` by the number of models
    (agreeing models under consensus). Under consensus a zero divisor becomes 1; without consensus a weight
    sum with ``|sum| < 1e-8`` becomes 1. ``election_precision``: ``"float64"`` accumulates the ``"sum"``
    election score in float64 from float64 products ``w_i * d_i`` (so an exactly cancelling score
    elects +1 as in exact arithmetic); ``"compute"`` sums the compute-dtype ``wd_i`` (mergekit).

    Per element the operations are, in the compute dtype and in this order: ``d = x_i - base``;
    ``d *= mask_i``; ``d *= f_i`` (l1, ``f_i`` rounded once) or ``d /= p_i`` (inverse_p);
    ``wd_i = d * w_i``; under consensus ``acc = wd_0 + wd_1 + ...`` (model order) elects the sign;
    ``mixed = sum_i wd_i [* agree_i]`` (model order); ``mixed /= divisor``; ``mixed *= lambda``;
    ``out = base + mixed``.

    ``deltas_given=True`` (the engine's in-place path): ``tensors`` already hold ``x_i - base`` (computed
    exactly as step 1 would) and are overwritten chunk by chunk; ``out`` may be ``base`` itself (each chunk
    of ``base`` is read before it is overwritten). Results are bit-identical to the default path.
    """
    import torch

    n = len(tensors)
    masks = [None] * n if masks is None else list(masks)
    if keep_probs is None:
        keep_probs = [None] * n
    maskers = [_as_masker(m) for m in masks]
    b = base.reshape(-1)
    ts = [t.reshape(-1) for t in tensors]
    total = b.numel()
    w = [float(x) for x in weights]

    factors: list[float] = [1.0] * n
    divs: list[Any] = [None] * n
    for i in range(n):
        if maskers[i] is None or rescale is None:
            continue
        if rescale == "l1":
            factors[i] = l1_rescale_factor(ts[i], None if deltas_given else b, maskers[i], chunk)
        elif rescale == "inverse_p":
            p = keep_probs[i]
            if p is None:
                raise ValueError("rescale='inverse_p' needs keep_probs")
            divs[i] = p.reshape(-1) if hasattr(p, "reshape") else float(p)
        else:
            raise ValueError(f"unknown rescale mode {rescale!r}")

    if out is None:
        out = torch.empty_like(b)
    else:
        out = out.reshape(-1)
    if n == 0 or total == 0:
        if out.data_ptr() != b.data_ptr():
            out.copy_(b)
        return out.view(base.shape)
    # the elementwise loop runs over smaller pieces than the L1 sums (whose float64 grouping is per ``chunk``):
    # its two dozen chunk buffers then stay in the core's cache; elementwise results do not depend on it
    step = min(chunk, LOOP_CHUNK)
    size = min(step, total)

    def buf(dtype=b.dtype):
        return torch.empty(size, dtype=dtype, device=b.device)

    dbuf = [] if deltas_given else [buf() for _ in range(n)]
    mixed_buf, div_buf, mask_buf, elect_buf = buf(), buf(), buf(), buf()
    weighted = sign_election == "weighted"
    # the "sum" election score is accumulated in float64: an exactly cancelling sum (common with bf16
    # checkpoints and simple weights) must elect +1 as in exact arithmetic, not follow fp32 rounding
    score64 = consensus == "sum" and election_precision == "float64" and b.dtype != torch.float64
    if score64:
        acc_buf, tmp_buf = buf(torch.float64), buf(torch.float64)
        ones = torch.ones(size, dtype=b.dtype, device=b.device)
    src_buf = [buf() for _ in range(n)] if consensus is not None and not weighted else []
    weight_total = sum(w)
    # a zero divisor becomes 1; when every weight is positive a divisor is either 0 (no model agrees, and
    # then ``mixed`` is 0 too) or at least the smallest weight, so raising it to a tiny positive value
    # gives the same quotient (+-0) in one pass instead of two
    floor_div = normalize_by == "count" or all(x > 1e-20 for x in w)
    for s, e in flat_chunks(total, step):
        ln = e - s
        bc = b[s:e]
        deltas = []
        if score64:
            acc = acc_buf[:ln]
            tmp = tmp_buf[:ln]
        for i in range(n):
            if deltas_given:
                d = ts[i][s:e]
            else:
                d = dbuf[i][:ln]
                torch.sub(ts[i][s:e], bc, out=d)
            if maskers[i] is not None:
                maskers[i].trim(s, e, d, mask_buf[:ln])
            if factors[i] != 1.0:
                d.mul_(factors[i])
            if divs[i] is not None:
                d.div_(divs[i] if isinstance(divs[i], float) else divs[i][s:e])
            if score64:
                # acc = 0 + p_0 + p_1 + ...: starting from p_0 only differs in the sign of an all-zero sum,
                # which no model agrees with either way (zeros never agree)
                t64 = acc if i == 0 else tmp
                t64.copy_(d)
                if weighted:
                    t64.mul_(w[i])
                if i:
                    acc.add_(tmp)
            if src_buf:
                src_buf[i][:ln].copy_(d)
            d.mul_(w[i])
            deltas.append(d)
        mixed = mixed_buf[:ln]
        if consensus is not None:
            src = deltas if weighted else [x[:ln] for x in src_buf]
            if score64:
                elected = elect_buf[:ln]
                # +1 where acc >= +0, -1 where acc < 0 (and at -0.0, an all-zero score: no model agrees there).
                # Rounding acc to float32 keeps its sign (a tiny negative becomes -0.0, still -1 here).
                elected.copy_(acc)
                torch.copysign(ones[:ln], elected, out=elected)
            else:
                elected = elect_sign(src, consensus, out=elect_buf[:ln])
            divisor = div_buf[:ln] if normalize else None
            for i in range(n):
                agree = agreement(src[i], elected, out=mask_buf[:ln])
                if divisor is not None:
                    wi = 1.0 if normalize_by == "count" else w[i]
                    if i == 0:
                        torch.mul(agree, wi, out=divisor)
                    else:
                        divisor.add_(agree, alpha=wi)  # agree is 0/1: exact either way
                if i == 0:
                    torch.mul(deltas[0], agree, out=mixed)
                else:
                    mixed.addcmul_(deltas[i], agree)  # deltas[i] * agree is exact
            if divisor is not None:
                if floor_div:
                    divisor.clamp_(min=1e-30)
                else:
                    zero = torch.eq(divisor, 0, out=mask_buf[:ln])
                    divisor.add_(zero)  # a zero divisor becomes 1
                mixed.div_(divisor)
        else:
            mixed.copy_(deltas[0])
            for d in deltas[1:]:
                mixed.add_(d)
            if normalize:
                if normalize_by == "count":
                    mixed.div_(n)
                elif abs(weight_total) >= _WEIGHT_SUM_EPS:
                    mixed.div_(weight_total)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        torch.add(bc, mixed, out=out[s:e])
    return out.view(base.shape)


# ---------------------------------------------------------------------------------------------------
# method entry points: func(inputs: MergeInputs) -> Tensor
# ---------------------------------------------------------------------------------------------------


def _run(inputs: "MergeInputs", sparsification: str | None, consensus: bool) -> "torch.Tensor":
    from adaptkit.merge import sparsify as sp

    base = inputs.base
    if base is None:
        raise ValueError(f"tensor {inputs.name!r}: this merge method needs a base model")
    if not inputs.tensors:
        return base.clone()
    g = inputs.global_params
    sort_ties = g.get("magnitude_tiebreak", "index") == "sort"
    n = len(inputs.tensors)
    tensors = list(inputs.tensors)
    rescale_mode = g.get("rescale_mode", "l1") if g.get("rescale", False) else None
    # The engine hands over freshly upcast tensors it will not read again (``inputs.owned``): then the task
    # vectors are computed once, in place (x_i -= base, the same fp32 subtraction as everywhere else), every
    # pass reads them instead of recomputing them, and the result is written into ``base``.
    in_place = _owned_distinct(inputs)
    if in_place:
        for x in tensors:
            x.sub_(base)
    masks: list[Any] = [None] * n
    keep_probs: list[Any] = [None] * n
    for i, x in enumerate(tensors):
        p = inputs.params[i]
        density = float(p.get("density", 1.0))
        keep_probs[i] = density
        if sparsification is None:
            continue
        y = None if in_place else base
        if sparsification == "magnitude":
            if sort_ties:
                masks[i] = sp.sort_magnitude_mask(x if in_place else x - base, density)
            else:
                masks[i] = sp.magnitude_masker(x, y, density)
        elif sparsification == "magnitude_outliers":
            gamma = float(p["gamma"])
            if sort_ties:
                masks[i] = sp.sort_outliers_mask(x if in_place else x - base, density, gamma)
            else:
                masks[i] = sp.outliers_masker(x, y, density, gamma)
        elif sparsification == "random":
            gen = inputs.generator(i, base.device)
            if in_place and rescale_mode in (None, "l1", "inverse_p") and density < 1:
                # drop (and rescale) the task vector in place while the mask is drawn: same draws, same
                # chunks and the same per-element operations as bernoulli_mask + combine_task_vectors, without
                # the full-size boolean mask or a second pass
                _dare_in_place(x, density, gen, rescale_mode)
                continue
            masks[i] = sp.bernoulli_mask(base.shape, density, gen, base.device)
        elif sparsification == "della":
            masks[i], keep_probs[i] = sp.della_mask(
                x if in_place else x - base, density, float(p["epsilon"]), inputs.generator(i, base.device),
                name=inputs.name,
            )
        else:  # pragma: no cover
            raise ValueError(sparsification)
    rescale = rescale_mode
    return combine_task_vectors(
        base,
        tensors,
        [float(p["weight"]) for p in inputs.params],
        masks=masks,
        rescale=rescale,
        keep_probs=keep_probs,
        consensus=g.get("consensus_method", "sum") if consensus else None,
        sign_election=g.get("sign_election", "weighted"),
        normalize=bool(g.get("normalize", False)),
        normalize_by=g.get("normalize_by", "weight"),
        lambda_=float(g.get("lambda", 1.0)),
        election_precision=g.get("election_precision", "float64"),
        deltas_given=in_place,
        out=base if in_place else None,
    )


def _dare_in_place(d: "torch.Tensor", density: float, gen: "torch.Generator", rescale: str | None,
                   chunk: int = COMBINE_CHUNK) -> None:
    """``d *= bernoulli_mask(...)`` then the rescale of ``combine_task_vectors`` (``l1``: ``d *= f`` with the
    factor of ``l1_rescale_factor`` -- the same ``det_sum`` per ``chunk`` -- ``inverse_p``: ``d /= density``),
    in place on the task vector ``d``. The uniforms are drawn exactly as in ``sparsify.bernoulli_mask``."""
    import torch

    from adaptkit.merge.sparsify import CHUNK

    flat = d.view(-1)
    n = flat.numel()
    size = min(CHUNK, max(1, n))
    ubuf = torch.empty(size, dtype=torch.float32, device=d.device)
    mbuf = torch.empty(size, dtype=d.dtype, device=d.device)
    abuf = torch.empty(min(chunk, size), dtype=d.dtype, device=d.device) if rescale == "l1" else None
    before = 0.0
    after = 0.0
    assert CHUNK % chunk == 0
    for s, e in flat_chunks(n, CHUNK):
        u = torch.rand(e - s, generator=gen, dtype=torch.float32, out=ubuf[: e - s])
        m = torch.lt(u, density, out=mbuf[: e - s])  # 1.0 / 0.0, the comparison done in float32 as for bool
        if abuf is None:
            flat[s:e].mul_(m)
            continue
        for cs in range(s, e, chunk):
            ce = min(e, cs + chunk)
            dc = flat[cs:ce]
            mc = m[cs - s : ce - s]
            a = torch.abs(dc, out=abuf[: ce - cs])
            before += det_sum(a)
            a.mul_(mc)
            after += det_sum(a)
            dc.mul_(mc)
    if rescale == "l1":
        if not (before < _RESCALE_EPS or after < _RESCALE_EPS):
            f = before / after
            if f != 1.0:
                flat.mul_(f)
    elif rescale == "inverse_p":
        flat.div_(float(density))


def _owned_distinct(inputs: "MergeInputs") -> bool:
    """Whether the method may overwrite ``inputs.tensors`` and ``inputs.base``: the engine marks inputs it
    upcast for this call only (``owned``), and every tensor must be its own contiguous storage."""
    if not inputs.owned:
        return False
    ts = [*inputs.tensors, inputs.base]
    if any(not t.is_contiguous() or not t.is_floating_point() for t in ts):
        return False
    ptrs = {t.untyped_storage().data_ptr() for t in ts}
    return len(ptrs) == len(ts)


def rows_independent(params: list[dict[str, Any]], global_params: dict[str, Any]) -> bool:
    """``task_arithmetic``'s declared ``row_separable``: without sparsification (every density 1) each output
    element depends only on the same element of the inputs, so any block of rows can be merged alone."""
    return all(float(p.get("density", 1.0)) >= 1.0 for p in params)


def task_arithmetic(inputs: "MergeInputs") -> "torch.Tensor":
    """Task arithmetic (Ilharco et al. 2022): ``base + lambda * sum_i w_i (model_i - base)``."""
    return _run(inputs, None, consensus=False)


def ties(inputs: "MergeInputs") -> "torch.Tensor":
    """TIES (Yadav et al. 2023): magnitude trim, sign election, disjoint merge."""
    return _run(inputs, "magnitude", consensus=True)


def dare_ties(inputs: "MergeInputs") -> "torch.Tensor":
    """DARE (Yu et al. 2023) random drop + rescale, then TIES sign election."""
    return _run(inputs, "random", consensus=True)


def dare_linear(inputs: "MergeInputs") -> "torch.Tensor":
    """DARE random drop + rescale, then a weighted sum of the task vectors."""
    return _run(inputs, "random", consensus=False)


def breadcrumbs(inputs: "MergeInputs") -> "torch.Tensor":
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop outliers and small entries, weighted sum."""
    return _run(inputs, "magnitude_outliers", consensus=False)


def breadcrumbs_ties(inputs: "MergeInputs") -> "torch.Tensor":
    """Model Breadcrumbs trim, then TIES sign election."""
    return _run(inputs, "magnitude_outliers", consensus=True)


def della(inputs: "MergeInputs") -> "torch.Tensor":
    """DELLA (Deep et al. 2024): MagPrune (rank-dependent keep probability) + rescale, TIES election."""
    return _run(inputs, "della", consensus=True)


def della_linear(inputs: "MergeInputs") -> "torch.Tensor":
    """DELLA MagPrune + rescale, weighted sum."""
    return _run(inputs, "della", consensus=False)
