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


COMBINE_CHUNK = 1 << 18  #: elements per chunk of the combination loop (buffers stay in cache)


def _as_masker(m: Any) -> "Masker | None":
    from adaptkit.merge.sparsify import Masker, TensorMasker

    if m is None or isinstance(m, Masker):
        return m
    return TensorMasker(m)


def l1_rescale_factor(x: "torch.Tensor", base: "torch.Tensor", mask: Any, chunk: int = COMBINE_CHUNK) -> float:
    """mergekit's L1 rescale of the sparsified ``delta = x - base``: ``sum|delta| / sum|delta * mask|``,
    float64 sums with a fixed order; 1.0 when either sum is below 1e-7. ``mask``: bool tensor or Masker."""
    import torch

    masker = _as_masker(mask)
    xf = x.reshape(-1)
    bf = base.reshape(-1)
    before = 0.0
    after = 0.0
    buf = torch.empty(min(chunk, max(1, bf.numel())), dtype=bf.dtype, device=bf.device)
    for s, e in flat_chunks(bf.numel(), chunk):
        d = xf[s:e] - bf[s:e]
        m = None if masker is None else masker.mask(s, e, d, buf[: e - s])
        a = d.abs_()
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
            factors[i] = l1_rescale_factor(ts[i], b, maskers[i], chunk)
        elif rescale == "inverse_p":
            p = keep_probs[i]
            if p is None:
                raise ValueError("rescale='inverse_p' needs keep_probs")
            divs[i] = p.reshape(-1) if hasattr(p, "reshape") else float(p)
        else:
            raise ValueError(f"unknown rescale mode {rescale!r}")

    out = torch.empty_like(b)
    if n == 0 or total == 0:
        out.copy_(b)
        return out.view(base.shape)
    size = min(chunk, total)

    def buf(dtype=b.dtype):
        return torch.empty(size, dtype=dtype, device=b.device)

    dbuf = [buf() for _ in range(n)]
    mixed_buf, div_buf, mask_buf, elect_buf = buf(), buf(), buf(), buf()
    weighted = sign_election == "weighted"
    # the "sum" election score is accumulated in float64: an exactly cancelling sum (common with bf16
    # checkpoints and simple weights) must elect +1 as in exact arithmetic, not follow fp32 rounding
    score64 = consensus == "sum" and election_precision == "float64" and b.dtype != torch.float64
    if score64:
        acc_buf, tmp_buf, bool_buf = buf(torch.float64), buf(torch.float64), buf(torch.bool)
    src_buf = [buf() for _ in range(n)] if consensus is not None and not weighted else []
    weight_total = sum(w)
    for s, e in flat_chunks(total, chunk):
        ln = e - s
        bc = b[s:e]
        deltas = []
        if score64:
            acc = acc_buf[:ln]
            tmp = tmp_buf[:ln]
            acc.zero_()
        for i in range(n):
            d = dbuf[i][:ln]
            torch.sub(ts[i][s:e], bc, out=d)
            if maskers[i] is not None:
                d.mul_(maskers[i].mask(s, e, d, mask_buf[:ln]))
            if factors[i] != 1.0:
                d.mul_(factors[i])
            if divs[i] is not None:
                d.div_(divs[i] if isinstance(divs[i], float) else divs[i][s:e])
            if score64:
                tmp.copy_(d)
                if weighted:
                    tmp.mul_(w[i])
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
                torch.ge(acc, 0, out=bool_buf[:ln])
                elected.copy_(bool_buf[:ln]).mul_(2).sub_(1)
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
    masks: list[Any] = [None] * n
    keep_probs: list[Any] = [None] * n
    for i, x in enumerate(inputs.tensors):
        p = inputs.params[i]
        density = float(p.get("density", 1.0))
        keep_probs[i] = density
        if sparsification is None:
            continue
        if sparsification == "magnitude":
            if sort_ties:
                masks[i] = sp.sort_magnitude_mask(x - base, density)
            else:
                masks[i] = sp.magnitude_masker(x, base, density)
        elif sparsification == "magnitude_outliers":
            gamma = float(p["gamma"])
            if sort_ties:
                masks[i] = sp.sort_outliers_mask(x - base, density, gamma)
            else:
                masks[i] = sp.outliers_masker(x, base, density, gamma)
        elif sparsification == "random":
            masks[i] = sp.bernoulli_mask(base.shape, density, inputs.generator(i, base.device), base.device)
        elif sparsification == "della":
            masks[i], keep_probs[i] = sp.della_mask(
                x - base, density, float(p["epsilon"]), inputs.generator(i, base.device), name=inputs.name
            )
        else:  # pragma: no cover
            raise ValueError(sparsification)
    rescale = g.get("rescale_mode", "l1") if g.get("rescale", False) else None
    return combine_task_vectors(
        base,
        inputs.tensors,
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
    )


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
