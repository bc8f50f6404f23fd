"""Sparsification masks for task vectors (TIES, breadcrumbs, DARE, DELLA). Pure tensor functions.

Every builder returns a boolean keep-mask of the delta's shape, or ``None`` for "keep everything and do not
rescale" (density >= 1, as in mergekit). The masks are separate from the combination step
(``adaptkit.merge.task_arithmetic.combine_task_vectors``) so a test can hand the same mask to an
independent float64 reference. The magnitude trims also exist as chunked ``Masker`` objects that the
combination step evaluates chunk by chunk (the full mask is never materialized).

Magnitude order (documented in specs/merge-math.md): elements are ranked by ``|delta|`` descending; among
equal magnitudes the element with the *lower flat index* ranks higher. ``top_k_mask`` keeps the ``k``
highest-ranked elements, exactly ``k`` of them, whatever the ties. Thresholds come from an exact selection
(``torch.kthvalue``), narrowed first by a deterministic strided sample, never from a full sort. With heavy
ties (bf16 checkpoints: a task vector takes a few thousand distinct values, the commonest holding 10-20 % of
the entries) the sample's estimate of the threshold is tested first with one counting pass; the counts decide,
so the result is the same either way. The TIES trim is then applied as ``hardshrink`` (``TopKMasker.trim``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from adaptkit.errors import ConfigError
from adaptkit.merge._util import CHUNK, flat_chunks

if TYPE_CHECKING:  # pragma: no cover
    import torch

_SAMPLE = 1 << 15  # strided sample size used to bracket the threshold
_EXACT_BELOW = 1 << 18  # below this many elements select on everything at once


class AbsDelta:
    """``|x - y|`` (or ``|x|``) of flat tensors, produced chunk by chunk (never materialized whole).

    ``chunk`` returns a view of an internal buffer, valid until the next call."""

    def __init__(self, x: "torch.Tensor", y: "torch.Tensor | None" = None) -> None:
        self.x = x.reshape(-1)
        self.y = None if y is None else y.reshape(-1)
        self.n = self.x.numel()
        self._buf = None

    def chunk(self, s: int, e: int) -> "torch.Tensor":
        import torch

        n = e - s
        if n > CHUNK:
            out = torch.empty(n, dtype=self.x.dtype, device=self.x.device)
        else:
            if self._buf is None:
                self._buf = torch.empty(min(CHUNK, self.n), dtype=self.x.dtype, device=self.x.device)
            out = self._buf[:n]
        if self.y is None:
            return torch.abs(self.x[s:e], out=out)
        torch.sub(self.x[s:e], self.y[s:e], out=out)
        return out.abs_()

    def sample(self, stride: int) -> "torch.Tensor":
        if self.y is None:
            return self.x[::stride].abs()
        return (self.x[::stride] - self.y[::stride]).abs_()


class TopK:
    """Membership in the ``k`` largest values of ``src`` (an ``AbsDelta``), exactly ``k`` of them.

    Order: larger value first; equal values: lower flat index first. The threshold ``t`` (the k-th largest
    value) is found exactly: a strided sample brackets it, one chunked pass counts the values above the
    bracket and collects those inside it, ``torch.kthvalue`` on the (small) bracket gives ``t``; if the
    bracket missed (verified by the counts) ``torch.kthvalue`` runs on all values. The tie rule becomes a
    flat index ``cutoff``: an element is a member iff ``a > t``, or ``a == t`` and its index ``<= cutoff``.
    ``member(a, start, out)`` then answers for any chunk ``a`` starting at flat index ``start``.
    """

    def __init__(self, src: AbsDelta, k: int, chunk: int = CHUNK) -> None:
        self.n = src.n
        self.k = k
        self.t = None
        self.cutoff = -1
        if 0 < k < self.n:
            self.t, self.cutoff = _select(src, k, chunk)

    def member(self, a: "torch.Tensor", start: int, out: "torch.Tensor") -> "torch.Tensor":
        """Write membership (1/0, or True/False for a bool ``out``) of ``a`` (flat indices from ``start``)."""
        import torch

        if self.t is None:
            return out.fill_(1 if self.k >= self.n else 0)
        t = self.t
        end = start + a.numel()
        if end - 1 <= self.cutoff:
            return torch.ge(a, t, out=out)
        if start > self.cutoff:
            return torch.gt(a, t, out=out)
        j = self.cutoff - start + 1
        torch.ge(a[:j], t, out=out[:j])
        torch.gt(a[j:], t, out=out[j:])
        return out


def _cutoff(src: AbsDelta, t: "torch.Tensor", need: int, chunk: int, counts: "list[int] | None") -> int:
    """Flat index of the ``need``-th (1-based) element equal to ``t`` (``counts``: per-chunk counts)."""
    import torch

    seen = 0
    for c, (s, e) in enumerate(flat_chunks(src.n, chunk)):
        if counts is not None:
            cnt = counts[c]
            if seen + cnt < need:
                seen += cnt
                continue
        a = src.chunk(s, e)
        if counts is None:
            cnt = int(torch.count_nonzero(a == t))
            if seen + cnt < need:
                seen += cnt
                continue
        return s + _nth_equal(a, t, need - seen)
    raise AssertionError("selection bookkeeping")  # pragma: no cover


_BLOCK = 4096


def _nth_equal(a: "torch.Tensor", t: "torch.Tensor", m: int) -> int:
    """Index in the flat ``a`` of the ``m``-th (1-based) element equal to ``t`` (it exists). Counts per block of
    4096 (a row reduction on a 0/1 float copy) locate the block, ``nonzero`` runs on that block only."""
    import torch

    n = a.numel()
    rows = n // _BLOCK
    base = 0
    if rows > 1:
        eq = torch.eq(a[: rows * _BLOCK], t, out=torch.empty(rows * _BLOCK, dtype=a.dtype, device=a.device))
        per = eq.view(rows, _BLOCK).sum(dim=1).to(torch.int64)  # exact: at most 4096 per row
        cum = torch.cumsum(per, 0)
        r = int(torch.searchsorted(cum, torch.tensor([m], dtype=torch.int64, device=a.device)))
        if r < rows:
            before = int(cum[r - 1]) if r > 0 else 0
            pos = torch.nonzero(a[r * _BLOCK : (r + 1) * _BLOCK] == t).flatten()
            return r * _BLOCK + int(pos[m - before - 1])
        base = rows * _BLOCK
        m -= int(cum[-1])
    pos = torch.nonzero(a[base:] == t).flatten()
    return base + int(pos[m - 1])


def _count(flags: "torch.Tensor") -> int:
    """Number of ones in a 0/1 float tensor (exact below 2^24 elements: every partial sum is an integer)."""
    if flags.numel() >= 1 << 24:
        import torch

        return int(torch.count_nonzero(flags))
    return int(flags.sum())


def _select(src: AbsDelta, k: int, chunk: int) -> "tuple[torch.Tensor, int]":
    """``(t, cutoff)``: ``t`` the k-th largest value of ``src``; ties at ``t`` kept up to flat index cutoff."""
    import torch

    n = src.n
    if n > _EXACT_BELOW:
        sample = src.sample(n // _SAMPLE)
        s = sample.numel()
        q = k / n
        margin = 8 * math.sqrt(max(s * q * (1 - q), 1.0)) + 16
        r_lo = int(max(1, math.floor(s * (1 - q) - margin)))
        r_hi = int(min(s, math.ceil(s * (1 - q) + margin)))
        ordered = torch.sort(sample).values
        lo = ordered[r_lo - 1]
        hi = ordered[r_hi - 1]
        # Heavy ties (bf16 checkpoints: task vectors take a few thousand distinct values, the most common
        # ones 10-20 % of the entries each): when the sample's estimate of t is such a value, test it with one
        # counting pass (above / equal) instead of collecting every candidate of the bracket. The counts
        # decide; a wrong guess falls through to the bracket pass.
        v = ordered[min(s, max(1, round(s * (1 - q)))) - 1]
        if bool(lo == hi) or int(torch.count_nonzero(ordered == v)) * 64 >= s:
            gt_v = 0
            eq_counts: list[int] = []
            # 0/1 float flags summed: exact (integers below 2^24 per chunk) and cheaper than bool + count
            fl = torch.empty(min(chunk, n), dtype=ordered.dtype, device=ordered.device)
            for cs, ce in flat_chunks(n, chunk):
                a = src.chunk(cs, ce)
                f = fl[: ce - cs] if ce - cs <= fl.numel() else torch.empty_like(a)
                n_gt = _count(torch.gt(a, v, out=f))
                gt_v += n_gt
                eq_counts.append(_count(torch.ge(a, v, out=f)) - n_gt)
            if gt_v < k <= gt_v + sum(eq_counts):
                return v, _cutoff(src, v, k - gt_v, chunk, eq_counts)
        del sample, ordered
        same = bool(lo == hi)
        above = 0
        counts: list[int] = []
        cands = []
        for cs, ce in flat_chunks(n, chunk):
            a = src.chunk(cs, ce)
            above += int(torch.count_nonzero(a > hi))
            if same:
                counts.append(int(torch.count_nonzero(a == hi)))
            else:
                cands.append(a[(a >= lo) & (a <= hi)])
                counts.append(cands[-1].numel())
        inside = sum(counts)
        if above < k <= above + inside:
            if same:
                t = hi
                n_gt = above
            else:
                c = torch.cat(cands)
                t = torch.kthvalue(c, c.numel() - (k - above) + 1).values
                n_gt = above + int(torch.count_nonzero(c > t))
                counts = [int(torch.count_nonzero(x == t)) for x in cands]
            return t, _cutoff(src, t, k - n_gt, chunk, counts)
        del cands
    a = src.chunk(0, n)
    t = torch.kthvalue(a, n - k + 1).values
    n_gt = int(torch.count_nonzero(a > t))
    del a
    return t, _cutoff(src, t, k - n_gt, chunk, None)


class Masker:
    """A keep-mask produced chunk by chunk for ``combine_task_vectors``.

    ``mask(s, e, delta_chunk, out)`` returns the mask of flat indices ``[s, e)`` (``delta_chunk`` holds
    ``x - y`` there): 1.0/0.0 written into the float buffer ``out`` (or True/False for a bool ``out``).
    Masks are stateless: chunks may come in any order and size.
    """

    def mask(self, s: int, e: int, delta: "torch.Tensor", out: "torch.Tensor") -> "torch.Tensor":  # pragma: no cover
        raise NotImplementedError


    def trim(self, s: int, e: int, delta: "torch.Tensor", buf: "torch.Tensor") -> "torch.Tensor":
        """``delta *= mask`` for flat indices ``[s, e)`` (in place; ``buf``: a float scratch chunk)."""
        return delta.mul_(self.mask(s, e, delta, buf))


class TensorMasker(Masker):
    """A precomputed boolean mask (any shape; flattened)."""

    def __init__(self, mask: "torch.Tensor") -> None:
        self.flat = mask.reshape(-1)

    def mask(self, s: int, e: int, delta: "torch.Tensor", out: "torch.Tensor") -> "torch.Tensor":
        return out.copy_(self.flat[s:e])


class TopKMasker(Masker):
    """Keep the descending-magnitude ranks ``[lo, hi)`` of ``|x - y|`` (computed from the delta chunks)."""

    def trim(self, s: int, e: int, delta: "torch.Tensor", buf: "torch.Tensor") -> "torch.Tensor":
        """In place: zero the entries of ``delta`` (flat indices ``[s, e)``) outside the kept ranks. For a plain
        top-k (TIES) this is ``hardshrink`` at the threshold (``|d| > t``; ``|d| >= t``, i.e. ``> nextafter(t,
        0)``, up to the tie cutoff): one pass instead of abs, compare and multiply; same kept set. A dropped
        entry becomes +0.0 rather than ``d * 0.0`` (-0.0 for a negative ``d``); equal values."""
        import torch

        top = self.hi
        if self.lo is not None or top.t is None or delta.dtype not in (torch.float32, torch.float64):
            return super().trim(s, e, delta, buf)
        hs = torch.ops.aten.hardshrink.out
        t = float(top.t)
        below = float(torch.nextafter(top.t, torch.zeros((), dtype=top.t.dtype)))
        n = e - s
        if e - 1 <= top.cutoff:
            return hs(delta, below, out=delta)
        if s > top.cutoff:
            return hs(delta, t, out=delta)
        j = top.cutoff - s + 1
        hs(delta[:j], below, out=delta[:j])
        hs(delta[j:n], t, out=delta[j:n])
        return delta

    def __init__(self, x: "torch.Tensor", y: "torch.Tensor | None", lo: int, hi: int, chunk: int = CHUNK) -> None:
        src = AbsDelta(x, y)
        self.hi = TopK(src, hi, chunk)
        self.lo = TopK(src, lo, chunk) if lo > 0 else None
        self._abs = None
        self._tmp = None

    def mask(self, s: int, e: int, delta: "torch.Tensor", out: "torch.Tensor") -> "torch.Tensor":
        import torch

        n = delta.numel()
        if self._abs is None or self._abs.numel() < n:
            self._abs = torch.empty(n, dtype=delta.dtype, device=delta.device)
            self._tmp = torch.empty(n, dtype=out.dtype, device=delta.device)
        a = torch.abs(delta, out=self._abs[:n])
        m = self.hi.member(a, s, out)
        if self.lo is not None:
            drop = self.lo.member(a, s, self._tmp[:n])  # top-lo is a subset of top-hi
            if m.dtype == torch.bool:
                m &= ~drop
            else:
                m.sub_(drop)
        return m


def magnitude_k(density: float, n: int) -> int:
    """mergekit's count of kept entries for TIES: ``max(1, int(density * n))`` (0 if density <= 0)."""
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def outlier_ranks(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Breadcrumbs: descending ranks ``[lo, hi)`` kept; ``int(density * n)`` entries after dropping the
    ``int(gamma * n)`` largest, the outlier cut shrinking when needed to keep that many (mergekit)."""
    target = int(density * n) if density > 0 else 0
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    lo = n - n_bot - target
    return lo, lo + target


def magnitude_masker(x: "torch.Tensor", y: "torch.Tensor | None", density: float) -> "Masker | None":
    """Chunked TIES trim of ``x - y``; ``None`` when ``density >= 1`` (no trim, no rescale)."""
    if density >= 1:
        return None
    return TopKMasker(x, y, 0, magnitude_k(density, x.numel()))


def outliers_masker(x: "torch.Tensor", y: "torch.Tensor | None", density: float, gamma: float) -> "Masker | None":
    """Chunked breadcrumbs trim of ``x - y``; ``None`` when ``density >= 1``."""
    if density >= 1:
        return None
    lo, hi = outlier_ranks(density, gamma, x.numel())
    return TopKMasker(x, y, lo, hi)


def sort_magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor | None":
    """TIES trim with mergekit 0.1.5's tie order (``magnitude_tiebreak: sort``): the first
    ``max(1, int(density * n))`` indices of ``torch.argsort(|delta| as float32, descending=True)``.

    Among equal magnitudes this order is whatever torch's (unstable) sort produces: deterministic for a
    given torch build, but not a documented rule. It costs a full sort; use it to reproduce mergekit.
    """
    import torch

    if density >= 1:
        return None
    n = delta.numel()
    k = magnitude_k(density, n)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k > 0:
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
        keep[torch.argsort(w, descending=True)[:k]] = True
    return keep.view(delta.shape)


def sort_outliers_mask(delta: "torch.Tensor", density: float, gamma: float) -> "torch.Tensor | None":
    """Breadcrumbs trim with mergekit 0.1.5's tie order: ascending ``torch.sort`` of ``|delta|`` (float32),
    positions ``[n_bot, n_bot + target)`` kept (see ``outlier_ranks``)."""
    import torch

    if density >= 1:
        return None
    n = delta.numel()
    lo, hi = outlier_ranks(density, gamma, n)
    n_bot = n - hi
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if hi > lo:
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
        keep[torch.sort(w, descending=False).indices[n_bot : n_bot + (hi - lo)]] = True
    return keep.view(delta.shape)


def _materialize(masker: Masker, delta: "torch.Tensor", chunk: int = CHUNK) -> "torch.Tensor":
    import torch

    flat = delta.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.bool, device=delta.device)
    buf = torch.empty(min(chunk, max(1, flat.numel())), dtype=delta.dtype, device=delta.device)
    for s, e in flat_chunks(flat.numel(), chunk):
        out[s:e] = masker.mask(s, e, flat[s:e], buf[: e - s])
    return out.view(delta.shape)


def top_k_mask(a: "torch.Tensor", k: int) -> "torch.Tensor":
    """Boolean mask keeping exactly the ``k`` largest values of the non-negative tensor ``a``; among equal
    values the lowest flat indices are kept."""
    return _materialize(TopKMasker(a, None, 0, k), a)


def magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor | None":
    """TIES trim: keep the ``k = max(1, int(density * numel))`` largest ``|delta|`` (mergekit's count);
    ``None`` when ``density >= 1``."""
    m = magnitude_masker(delta, None, density)
    return None if m is None else _materialize(m, delta)


def magnitude_outliers_mask(delta: "torch.Tensor", density: float, gamma: float) -> "torch.Tensor | None":
    """Model Breadcrumbs trim (see ``outlier_ranks``); ``None`` when ``density >= 1``."""
    m = outliers_masker(delta, None, density, gamma)
    return None if m is None else _materialize(m, delta)


def bernoulli_mask(
    shape: "torch.Size | tuple[int, ...]",
    density: float,
    generator: "torch.Generator",
    device: "torch.device | str" = "cpu",
    chunk: int = CHUNK,
) -> "torch.Tensor | None":
    """DARE drop: keep each element independently with probability ``density``.

    Draws ``torch.rand`` (float32) in fixed-size chunks of the flattened tensor, in index order, from
    ``generator``; element ``j`` is kept iff ``u_j < density``. The mask depends only on the generator's seed,
    the shape and ``density`` (not on the compute dtype or the thread count).
    """
    import torch

    if density >= 1:
        return None
    n = math.prod(shape)
    mask = torch.empty(n, dtype=torch.bool, device=device)
    ubuf = torch.empty(min(chunk, max(1, n)), dtype=torch.float32, device=device)
    for s, e in flat_chunks(n, chunk):
        u = torch.rand(e - s, generator=generator, dtype=torch.float32, out=ubuf[: e - s])
        torch.lt(u, density, out=mask[s:e])
    return mask.view(tuple(shape))


def _della_rows(delta: "torch.Tensor") -> "torch.Tensor":
    if delta.dim() <= 1:
        return delta.reshape(1, -1)
    return delta.reshape(delta.shape[0], -1)


def della_keep_probabilities(delta: "torch.Tensor", density: float, epsilon: float, name: str = "") -> "torch.Tensor":
    """DELLA MagPrune keep probabilities (float32 unless ``delta`` is float64), per row of ``delta``.

    Within each row (a 1-D tensor is one row; an N-D tensor is viewed as ``shape[0]`` rows), elements are
    ranked by ``|delta|`` ascending with ties broken by lower column index first (stable sort); the element of
    rank ``r`` (0-based) among ``m`` gets ``p = density - epsilon + 2 * epsilon * r / (m - 1)``
    (``p = density`` when ``m == 1``).
    """
    import torch

    if not (0 < density - epsilon and density + epsilon < 1):
        where = f"tensor {name!r}: " if name else ""
        raise ConfigError(
            f"{where}della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density}, epsilon={epsilon}"
        )
    rows = _della_rows(delta)
    m = rows.shape[1]
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    probs = torch.empty(rows.shape, dtype=dtype, device=delta.device)
    if m == 1:
        probs.fill_(density)
        return probs.view(delta.shape)
    per = max(1, CHUNK // m)
    ramp = torch.arange(m, dtype=torch.float64, device=delta.device) * (2 * epsilon / (m - 1)) + (density - epsilon)
    ramp = ramp.to(dtype)
    for s in range(0, rows.shape[0], per):
        block = rows[s : s + per].abs()
        order = torch.sort(block, dim=1, stable=True).indices
        # probs[row, order[row, r]] = ramp[r]
        probs[s : s + per].scatter_(1, order, ramp.expand(order.shape[0], m))
    return probs.view(delta.shape)


def della_mask(
    delta: "torch.Tensor",
    density: float,
    epsilon: float,
    generator: "torch.Generator",
    name: str = "",
    chunk: int = CHUNK,
) -> "tuple[torch.Tensor, torch.Tensor] | tuple[None, None]":
    """DELLA drop: ``(mask, keep_probabilities)``; element ``j`` kept iff ``u_j < p_j`` with ``u`` drawn as in
    ``bernoulli_mask``. ``(None, None)`` when ``density >= 1`` (no pruning, no rescale; mergekit)."""
    import torch

    if density >= 1:
        return None, None
    probs = della_keep_probabilities(delta, density, epsilon, name)
    flatp = probs.reshape(-1)
    n = flatp.numel()
    mask = torch.empty(n, dtype=torch.bool, device=delta.device)
    ubuf = torch.empty(min(chunk, max(1, n)), dtype=torch.float32, device=delta.device)
    for s, e in flat_chunks(n, chunk):
        u = torch.rand(e - s, generator=generator, dtype=torch.float32, out=ubuf[: e - s])
        torch.lt(u if flatp.dtype == torch.float32 else u.to(flatp.dtype), flatp[s:e], out=mask[s:e])
    return mask.view(delta.shape), probs
