#!/usr/bin/env python3
"""Independent float64 reference of adaptkit's merge math (numpy only) and generator of
specs/merge-vectors.json.

Written from the formulas in specs/merge-math.md, deliberately plain (whole-array numpy, no chunking, no
torch, nothing imported from adaptkit). The tests import the ``ref_*`` functions from this file as their
reference; ``python specs/tools/make_merge_vectors.py`` rewrites the JSON vectors.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# reference formulas (float64)
# ----------------------------------------------------------------------------------------------------------


def ref_rank_order(a: np.ndarray) -> np.ndarray:
    """Flat indices of ``a`` by value descending, ties by lower index first."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    idx = np.arange(a.size)
    return np.lexsort((idx, -a))


def ref_topk_mask(delta: np.ndarray, density: float) -> np.ndarray | None:
    """TIES trim: keep max(1, int(density * n)) largest |delta|; None when density >= 1."""
    if density >= 1:
        return None
    n = delta.size
    k = max(1, int(density * n)) if density > 0 else 0
    keep = np.zeros(n, dtype=bool)
    keep[ref_rank_order(np.abs(delta))[:k]] = True
    return keep.reshape(delta.shape)


def ref_outlier_mask(delta: np.ndarray, density: float, gamma: float) -> np.ndarray | None:
    """Breadcrumbs: ascending |delta| ranks [n_bot, n_bot + target) kept (same total order as above)."""
    if density >= 1:
        return None
    n = delta.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    desc = ref_rank_order(np.abs(delta))
    asc = desc[::-1]
    keep = np.zeros(n, dtype=bool)
    keep[asc[n_bot : n_bot + target]] = True
    return keep.reshape(delta.shape)


def ref_della_probs(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = delta.reshape(1, -1) if delta.ndim <= 1 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    p = np.empty(rows.shape)
    for r in range(rows.shape[0]):
        order = np.argsort(np.abs(rows[r]), kind="stable")  # ascending, ties by index
        for rank, j in enumerate(order):
            p[r, j] = density if m == 1 else density - epsilon + 2 * epsilon * rank / (m - 1)
    return p.reshape(delta.shape)


def ref_task_vectors(
    base, xs, weights, *, masks=None, rescale=None, keep_probs=None, consensus=None,
    sign_election="weighted", normalize=False, normalize_by="weight", lam=1.0,
):
    """base + lam * merged task vector; see specs/merge-math.md section 'Task-vector methods'."""
    base = np.asarray(base, dtype=np.float64)
    n = len(xs)
    masks = masks or [None] * n
    keep_probs = keep_probs or [None] * n
    deltas = []
    for i in range(n):
        d = np.asarray(xs[i], dtype=np.float64) - base
        if masks[i] is not None:
            kept = d * masks[i]
            if rescale == "l1":
                before = np.abs(d).sum()
                after = np.abs(kept).sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            elif rescale == "inverse_p":
                kept = kept / keep_probs[i]
            d = kept
        deltas.append(d)
    w = [float(x) for x in weights]
    wd = [w[i] * deltas[i] for i in range(n)]
    if consensus is not None:
        src = wd if sign_election == "weighted" else deltas
        if consensus == "sum":
            score = sum(src)
        else:
            score = sum(np.sign(s) for s in src)
        elected = np.where(score >= 0, 1.0, -1.0)
        agree = [np.sign(s) == elected for s in src]
        mixed = sum(wd[i] * agree[i] for i in range(n))
        if normalize:
            if normalize_by == "count":
                div = sum(a.astype(np.float64) for a in agree)
            else:
                div = sum(w[i] * agree[i] for i in range(n))
            div = np.where(div == 0, 1.0, div)
            mixed = mixed / div
    else:
        mixed = sum(wd)
        if normalize:
            if normalize_by == "count":
                mixed = mixed / n
            elif abs(sum(w)) >= 1e-8:
                mixed = mixed / sum(w)
    return base + lam * mixed


def ref_linear(xs, weights, normalize=True):
    out = sum(float(w) * np.asarray(x, dtype=np.float64) for x, w in zip(xs, weights))
    return out / sum(float(w) for w in weights) if normalize else out


def ref_slerp(t, v0, v1):
    """Returns (result, fell_back)."""
    a = np.asarray(v0, dtype=np.float64)
    b = np.asarray(v1, dtype=np.float64)
    na = np.linalg.norm(a)
    nb = np.linalg.norm(b)
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    cos = float(np.clip(np.sum(a * b) / (na * nb), -1, 1))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b, True
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th), False


def _nus_vec(t, a, b):
    na = max(np.linalg.norm(a), 1e-7)
    nb = max(np.linalg.norm(b), 1e-7)
    cos = float(np.clip(np.dot(a, b) / (na * nb), -1, 1))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def ref_nuslerp(weights, xs, base=None, flatten=True, row_wise=False):
    w0, w1 = weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0 = np.asarray(xs[0], dtype=np.float64)
    v1 = np.asarray(xs[1], dtype=np.float64)
    if base is not None:
        v0 = v0 - base
        v1 = v1 - base
    if flatten or v0.ndim <= 1:
        out = _nus_vec(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    elif row_wise:  # vectors along dim 0 (columns of a matrix)
        out = np.stack([_nus_vec(t, v0[:, j], v1[:, j]) for j in range(v0.shape[1])], axis=1)
    else:
        out = np.stack([_nus_vec(t, v0[i], v1[i]) for i in range(v0.shape[0])], axis=0)
    return out if base is None else out + base


def ref_model_stock(base, xs, filter_wise=False):
    base = np.asarray(base, dtype=np.float64)
    ws = [np.asarray(x, dtype=np.float64) for x in xs]
    n = len(ws)

    def ratio(b, vs):
        offs = [v - b for v in vs]
        cs = []
        for i in range(n):
            for j in range(i + 1, n):
                den = max(np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]), 1e-6)
                cs.append(float(np.clip(np.dot(offs[i], offs[j]) / den, -1, 1)))
        c = sum(cs) / len(cs)
        den = 1 + (n - 1) * c
        return 0.0 if abs(den) < 1e-6 else n * c / den

    avg = sum(ws) / n
    if filter_wise:
        b2 = base.reshape(1, -1) if base.ndim == 1 else base.reshape(-1, base.shape[-1])
        v2 = [v.reshape(b2.shape) for v in ws]
        a2 = avg.reshape(b2.shape)
        out = np.empty_like(b2)
        for r in range(b2.shape[0]):
            t = ratio(b2[r], [v[r] for v in v2])
            out[r] = t * a2[r] + (1 - t) * b2[r]
        return out.reshape(base.shape)
    t = ratio(base.reshape(-1), [v.reshape(-1) for v in ws])
    return t * avg + (1 - t) * base


def ref_sce(base, xs, select_topk=1.0, guard=1e-6):
    """SCE (FuseChat): variance top-k select, mean-square weights, sign-of-sum erase (specs/merge-math.md)."""
    base = np.asarray(base, dtype=np.float64)
    d = np.stack([np.asarray(x, dtype=np.float64) - base for x in xs])
    n = d.shape[0]
    if select_topk < 1:
        var = d.var(axis=0).reshape(-1)  # population variance
        k = int(np.count_nonzero(var) * select_topk) if select_topk > 0 else 0
        keep = np.zeros(var.size, dtype=bool)
        keep[ref_rank_order(var)[:k]] = True
        d = d * keep.reshape(base.shape)[None]
    ms = np.array([np.mean(x * x) for x in d])
    w = np.full(n, 1.0 / n) if abs(ms.sum()) < guard or ms.sum() == 0 else ms / ms.sum()
    elected = np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
    agree = (np.sign(d) == elected[None]).astype(np.float64)
    num = sum(w[i] * agree[i] * d[i] for i in range(n))
    den = np.maximum(sum(w[i] * agree[i] for i in range(n)), 1e-6)
    return base + num / den


def ref_ram(base, xs, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    """RAM / RAM+ (tensor-local): unique contributions kept (RAM+: scaled per model), shared ones averaged."""
    base = np.asarray(base, dtype=np.float64)
    d = [np.asarray(x, dtype=np.float64) - base for x in xs]
    c = [np.abs(x) > epsilon for x in d]
    count = sum(ci.astype(int) for ci in c)
    out = np.zeros_like(base)
    for x, ci in zip(d, c):
        lam = 1.0
        if plus:
            shared = int(np.sum(ci & (count > 1)))
            unique = int(np.sum(ci & (count == 1)))
            lam = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
        for idx in np.ndindex(base.shape):
            if not ci[idx]:
                continue
            out[idx] += x[idx] * lam if count[idx] == 1 else x[idx] / count[idx]
    return base + out


def ref_multislerp(xs, weights, base=None, normalize=True, eps=1e-8):
    """The full tangent-space recipe (project to the tangent space at the weighted mean, combine, map back
    with the exponential map), not the closed form adaptkit uses: the two must agree."""
    x = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in xs])
    if base is not None:
        x = x - np.asarray(base, dtype=np.float64).reshape(-1)[None]
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1)
    u = x / (norms[:, None] + eps)
    mean = (w[:, None] * u).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangents = u - (u @ mean)[:, None] * mean[None]
    t = (w[:, None] * tangents).sum(0)
    tn = np.linalg.norm(t) + eps
    res = (mean * np.cos(tn) + t * np.sin(tn) / tn) * float((norms * w).sum())
    shape = np.asarray(xs[0]).shape
    res = res.reshape(shape)
    return res if base is None else res + np.asarray(base, dtype=np.float64)


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """Karcher mean on the unit sphere (equal weights), scaled by the mean norm."""
    x = [np.asarray(v, dtype=np.float64).reshape(-1) for v in xs]
    n = len(x)
    norms = [float(np.linalg.norm(v)) for v in x]
    valid = [i for i in range(n) if norms[i] > tol]
    u = [x[i] / norms[i] for i in valid]
    a = 1.0 / len(u)
    m = sum(a * ui for ui in u)
    m = u[0].copy() if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        t = np.zeros_like(m)
        for ui in u:
            c = float(np.clip(m @ ui, -1, 1))
            th = math.acos(c)
            if th < tol:
                continue
            t += a * th / math.sin(th) * (ui - c * m)
        tn = float(np.linalg.norm(t))
        if tn < tol:
            break
        m = math.cos(tn) * m + math.sin(tn) * t / tn
        m = m / np.linalg.norm(m)
    return (m * sum(norms) / n).reshape(np.asarray(xs[0]).shape)


def ref_nearswap(base, x, t):
    base = np.asarray(base, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.clip(t / np.maximum(np.abs(base - x), 1e-6), 0, 1)
    return w * x + (1 - w) * base


def ref_arcee_fusion(base, x):
    base = np.asarray(base, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)

    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(x) + 1e-8
    q = softmax(base) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    s = np.abs(x - base) * kl
    srt = np.sort(s.reshape(-1))
    q1, med, q3 = (srt[int(qq * (srt.size - 1))] for qq in (0.25, 0.5, 0.75))
    return np.where(s >= med + 1.5 * (q3 - q1), x, base)


# ----------------------------------------------------------------------------------------------------------
# vectors
# ----------------------------------------------------------------------------------------------------------


def _arr(x):
    return np.asarray(x, dtype=np.float64).tolist()


def build_vectors() -> dict:
    rng = np.random.default_rng(20261128)
    shape = (4, 6)
    base = rng.normal(size=shape)
    xs = [base + 0.3 * rng.normal(size=shape) for _ in range(3)]
    base1 = rng.normal(size=(7,))
    xs1 = [base1 + 0.3 * rng.normal(size=(7,)) for _ in range(3)]
    # a tensor with exact magnitude ties, to pin the tie rule (lower flat index wins)
    tie_base = np.zeros((2, 5))
    tie_x = np.array([[0.5, -0.5, 0.25, 0.5, -0.25], [0.5, 0.125, -0.5, 0.25, 0.5]])
    W = [0.7, 0.4, -0.2]
    D = [0.5, 0.34, 0.8]
    cases = []

    def add(method, *, tensors, base=None, params, global_params, expected, note="", events=None):
        case = {
            "method": method,
            "note": note,
            "base": None if base is None else _arr(base),
            "tensors": [_arr(x) for x in tensors],
            "params": params,
            "global_params": global_params,
            "expected": _arr(expected),
        }
        if events is not None:
            case["events"] = events
        cases.append(case)

    def pm(**kw):
        n = len(next(iter(kw.values())))
        return [{k: v[i] for k, v in kw.items()} for i in range(n)]

    add("linear", tensors=xs, params=pm(weight=W), global_params={"normalize": True},
        expected=ref_linear(xs, W, True), note="weighted average")
    add("linear", tensors=xs1, params=pm(weight=W), global_params={"normalize": False},
        expected=ref_linear(xs1, W, False), note="weighted sum")
    add("passthrough", tensors=[xs[0]], params=[{"scale": 0.5}], global_params={},
        expected=0.5 * xs[0])
    add("task_arithmetic", tensors=xs, base=base, params=pm(weight=W), global_params={"lambda": 0.8},
        expected=ref_task_vectors(base, xs, W, lam=0.8))
    add("task_arithmetic", tensors=xs, base=base, params=pm(weight=W),
        global_params={"normalize": True}, expected=ref_task_vectors(base, xs, W, normalize=True),
        note="normalize by the weight sum")
    ties_masks = [ref_topk_mask(x - base, d) for x, d in zip(xs, D)]
    add("ties", tensors=xs, base=base, params=pm(weight=W, density=D), global_params={},
        expected=ref_task_vectors(base, xs, W, masks=ties_masks, consensus="sum", normalize=True),
        note="mergekit defaults: weighted sum election, normalize by agreeing weights")
    add("ties", tensors=xs, base=base, params=pm(weight=W, density=D),
        global_params={"normalize": False, "lambda": 1.5},
        expected=ref_task_vectors(base, xs, W, masks=ties_masks, consensus="sum", lam=1.5))
    add("ties", tensors=xs, base=base, params=pm(weight=W, density=D),
        global_params={"consensus_method": "count", "sign_election": "unweighted", "normalize_by": "count"},
        expected=ref_task_vectors(base, xs, W, masks=ties_masks, consensus="count",
                                  sign_election="unweighted", normalize=True, normalize_by="count"),
        note="paper variants: count election on unweighted deltas, disjoint mean by count")
    add("ties", tensors=xs, base=base, params=pm(weight=W, density=D),
        global_params={"rescale": True},
        expected=ref_task_vectors(base, xs, W, masks=ties_masks, rescale="l1", consensus="sum", normalize=True),
        note="L1 rescale of the trimmed task vectors")
    tmask = [ref_topk_mask(tie_x - tie_base, 0.3)]
    add("ties", tensors=[tie_x], base=tie_base, params=[{"weight": 1.0, "density": 0.3}], global_params={},
        expected=ref_task_vectors(tie_base, [tie_x], [1.0], masks=tmask, consensus="sum", normalize=True),
        note="tie rule: k=3 of five entries with |delta|=0.5; the three lowest flat indices are kept")
    G = [0.1, 0.2, 0.05]
    bc_masks = [ref_outlier_mask(x - base, d, g) for x, d, g in zip(xs, D, G)]
    add("breadcrumbs", tensors=xs, base=base, params=pm(weight=W, density=D, gamma=G), global_params={},
        expected=ref_task_vectors(base, xs, W, masks=bc_masks))
    add("breadcrumbs_ties", tensors=xs, base=base, params=pm(weight=W, density=D, gamma=G),
        global_params={"normalize": True},
        expected=ref_task_vectors(base, xs, W, masks=bc_masks, consensus="sum", normalize=True))
    for t in (0.0, 0.3, 1.0):
        out, fb = ref_slerp(t, base, xs[0])
        add("slerp", tensors=[xs[0]], base=base, params=[{}], global_params={"t": t}, expected=out,
            events={"slerp_lerp_fallback": int(fb)})
    near = base + 1e-3 * rng.normal(size=shape)
    out, fb = ref_slerp(0.4, base, near)
    assert fb
    add("slerp", tensors=[near], base=base, params=[{}], global_params={"t": 0.4}, expected=out,
        events={"slerp_lerp_fallback": 1}, note="near-colinear: lerp fallback, counted")
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        g = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        add("nuslerp", tensors=xs[:2], base=base, params=pm(weight=[0.3, 0.9]), global_params=g,
            expected=ref_nuslerp([0.3, 0.9], xs[:2], base, flatten, row_wise))
        add("nuslerp", tensors=xs[:2], base=None, params=pm(weight=[0.5, 0.5]), global_params=g,
            expected=ref_nuslerp([0.5, 0.5], xs[:2], None, flatten, row_wise))
    for fw in (False, True):
        add("model_stock", tensors=xs, base=base, params=[{}] * 3, global_params={"filter_wise": fw},
            expected=ref_model_stock(base, xs, fw))
        add("model_stock", tensors=xs1[:2], base=base1, params=[{}] * 2, global_params={"filter_wise": fw},
            expected=ref_model_stock(base1, xs1[:2], fw))

    # issue 12: the methods mergekit 0.1.5 has beyond the original thirteen
    far = [rng.normal(size=shape) for _ in range(3)]
    add("sce", tensors=xs, base=base, params=[{}] * 3, global_params={}, expected=ref_sce(base, xs),
        note="all positions, mean-square weights")
    add("sce", tensors=xs, base=base, params=[{}] * 3, global_params={"select_topk": 0.5},
        expected=ref_sce(base, xs, 0.5), note="variance select of half the positions")
    small = [base + 1e-4 * (x - base) for x in xs]
    add("sce", tensors=small, base=base, params=[{}] * 3, global_params={}, expected=ref_sce(base, small),
        note="mean squares below mergekit's 1e-6 guard: equal weights")
    add("sce", tensors=small, base=base, params=[{}] * 3, global_params={"sce_weight_guard": 0.0},
        expected=ref_sce(base, small, guard=0.0), note="guard off: the paper's weights at any scale")
    sparse = [base + np.where(np.abs(x - base) > 0.25, x - base, 0.0) for x in xs]
    add("ram", tensors=sparse, base=base, params=[{}] * 3, global_params={}, expected=ref_ram(base, sparse))
    add("ram", tensors=xs, base=base, params=[{}] * 3, global_params={"epsilon": 0.3},
        expected=ref_ram(base, xs, 0.3), note="epsilon decides which entries contribute")
    add("ramplus_tl", tensors=sparse, base=base, params=[{}] * 3, global_params={},
        expected=ref_ram(base, sparse, plus=True))
    add("ramplus_tl", tensors=xs, base=base, params=[{}] * 3,
        global_params={"epsilon": 0.3, "r": 0.5, "alpha": 0.9},
        expected=ref_ram(base, xs, 0.3, plus=True, r=0.5, alpha=0.9))
    add("multislerp", tensors=far, params=pm(weight=[0.5, 0.3, 0.2]), global_params={},
        expected=ref_multislerp(far, [0.5, 0.3, 0.2]))
    add("multislerp", tensors=xs, base=base, params=pm(weight=[2.0, 1.0, 1.0]),
        global_params={"normalize_weights": False}, expected=ref_multislerp(xs, [2.0, 1.0, 1.0], base, False),
        note="task vectors, weights not normalized")
    add("karcher", tensors=far, params=[{}] * 3, global_params={}, expected=ref_karcher(far))
    add("karcher", tensors=far[:2] + [np.zeros(shape)], params=[{}] * 3,
        global_params={"max_iter": 100, "tol": 1e-9}, expected=ref_karcher(far[:2] + [np.zeros(shape)], 100, 1e-9),
        note="a zero tensor counts in the scale, not the direction")
    near_x = base + np.where(rng.random(shape) < 0.5, 1e-3, 0.5) * rng.normal(size=shape)
    for t in (0.0, 0.01, 0.2):
        add("nearswap", tensors=[near_x], base=base, params=[{}], global_params={"t": t},
            expected=ref_nearswap(base, near_x, t))
    fx = base + np.where(rng.random(shape) < 0.2, 1.5, 0.05) * rng.normal(size=shape)
    add("arcee_fusion", tensors=[fx], base=base, params=[{}], global_params={}, expected=ref_arcee_fusion(base, fx))
    add("arcee_fusion", tensors=[xs1[0]], base=base1, params=[{}], global_params={},
        expected=ref_arcee_fusion(base1, xs1[0]), note="1-D: one KL over the whole vector")

    # fixed-mask cases for the randomized methods: combine_task_vectors(masks=...)
    fixed = []
    mrng = np.random.default_rng(7)
    dmasks = [mrng.random(shape) < d for d in D]
    for consensus, rescale, normalize in (("sum", "l1", False), ("sum", "inverse_p", True),
                                          (None, "l1", False), (None, "inverse_p", False)):
        fixed.append({
            "note": f"DARE with a fixed mask: consensus={consensus}, rescale={rescale}",
            "base": _arr(base), "tensors": [_arr(x) for x in xs], "weights": W,
            "masks": [m.astype(int).tolist() for m in dmasks], "keep_probs": D,
            "options": {"consensus": consensus, "rescale": rescale, "normalize": normalize},
            "expected": _arr(ref_task_vectors(base, xs, W, masks=dmasks, rescale=rescale, keep_probs=D,
                                              consensus=consensus, normalize=normalize)),
        })
    probs = [ref_della_probs(x - base, d, 0.1) for x, d in zip(xs, [0.5, 0.4, 0.6])]
    fixed.append({
        "note": "DELLA with a fixed mask: per-element inverse keep probability",
        "base": _arr(base), "tensors": [_arr(x) for x in xs], "weights": W,
        "masks": [m.astype(int).tolist() for m in dmasks], "keep_probs": [_arr(p) for p in probs],
        "options": {"consensus": "sum", "rescale": "inverse_p", "normalize": True},
        "expected": _arr(ref_task_vectors(base, xs, W, masks=dmasks, rescale="inverse_p", keep_probs=probs,
                                          consensus="sum", normalize=True)),
    })
    della_probs = [{
        "delta": _arr(xs[i] - base), "density": dd, "epsilon": 0.1, "expected": _arr(probs[i]),
    } for i, dd in enumerate([0.5, 0.4, 0.6])]
    return {
        "description": "adaptkit merge-math test vectors (float64 inputs and expected outputs from the "
        "independent numpy reference in specs/tools/make_merge_vectors.py); see specs/merge-math.md",
        "methods": cases,
        "combine_fixed_mask": fixed,
        "della_probabilities": della_probs,
    }


def main() -> int:
    out = Path(__file__).resolve().parents[1] / "merge-vectors.json"
    vectors = build_vectors()
    lines = ["{", f' "description": {json.dumps(vectors["description"])},']
    keys = [k for k in vectors if k != "description"]
    for ki, key in enumerate(keys):
        lines.append(f' "{key}": [')
        items = vectors[key]
        for i, item in enumerate(items):
            lines.append("  " + json.dumps(item) + ("," if i < len(items) - 1 else ""))
        lines.append(" ]" + ("," if ki < len(keys) - 1 else ""))
    lines.append("}")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
