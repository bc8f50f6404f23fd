"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), implemented from the paper in torch, CPU and CUDA.

For one linear layer ``W [out, in]`` with calibration inputs ``X [in, n]`` GPTQ minimizes
``||W X - Ŵ X||²`` column by column: with ``H = 2 X Xᵀ / n`` and ``U`` the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = Uᵀ U``), column ``j`` is rounded to the grid, and its error ``e = (w_j - q_j) / U[j, j]`` is
spread over the not yet quantized columns: ``W[:, k] -= e · U[j, k]`` for ``k > j``. Updates are applied
lazily in blocks of ``block_size`` columns (mathematically identical to the column-by-column recursion).

Details (defaults in specs/quantization.md):

* ``H`` is accumulated in float64 over calibration batches (each batch's ``XᵀX`` in float32), scaled by
  ``2 / n_tokens`` at the end; inversion runs in float64, the column recursion in ``compute_dtype``
  (float32 by default).
* dead inputs (``H[i, i] == 0``: the input never fires on the calibration set) get ``H[i, i] = 1`` and
  ``W[:, i] = 0``.
* dampening: ``H += damp · mean(diag H) · I``; if the Cholesky factorisation fails (``H`` not positive
  definite numerically), ``damp`` is multiplied by 10 and retried up to ``max_damp`` (reported in the
  stats); a Hessian that is still not factorable, or not finite, raises a one-line ``CheckpointError``.
* groups (``group_size > 0``): the group's scale and zero point are computed from the *current* (already
  error-updated) weights when the recursion enters the group's first column; ``group_size = -1``: one
  group per output row, computed before the recursion.
* act-order (``desc_act``): columns are processed by decreasing ``diag H``; group ``g`` is the ``g``-th run
  of ``group_size`` columns *in processing order*, and ``g_idx[i]`` records the group of original column
  ``i``. With ``static_groups`` the groups are the original contiguous column ranges, their parameters
  computed from the original weights before the recursion.
* the grid is the shared GPTQ convention of ``adaptkit.quantize.api`` (scales rounded to fp16 first, range
  includes 0, sym zero = 2^(bits-1), asym zero >= 1 so that GPTQ v1 can store zero-1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from adaptkit.errors import CheckpointError, ConfigError

from adaptkit.quantize.api import QuantizedLinear, QuantSpec
from adaptkit_quant.layerwise import HessianAccumulator  # noqa: F401 - re-exported (GPTQ's H = 2/n X Xᵀ)

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_BLOCK_SIZE = 128
DEFAULT_GROUP_ORDER = "gar"  #: without act-order: group-aware reordering (see group_aware_order)
MAX_DAMP = 10.0


# ---------------------------------------------------------------------------------------------------------
# the quantization grid (GPTQ convention, see api.py)
# ---------------------------------------------------------------------------------------------------------
def find_params(w: "torch.Tensor", bits: int, sym: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-row (scale, zero) of ``w [rows, cols]`` on the shared grid (``rtn.find_params``), in w's dtype."""
    from adaptkit_quant import rtn

    s, z = rtn.find_params(w, bits, sym)
    return s.to(w.dtype), z.to(w.dtype)


def quantize_codes(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor", maxq: int) -> "torch.Tensor":
    """Integer codes (as floats) ``clamp(round(w / scale) + zero, 0, maxq)``; scale/zero broadcast per row."""
    import torch

    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
        zero = zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


# ---------------------------------------------------------------------------------------------------------
# the GPTQ recursion for one weight matrix
# ---------------------------------------------------------------------------------------------------------
@dataclass
class GPTQStats:
    damp: float  #: the dampening finally used (fraction of mean diag H)
    retries: int  #: how many times damp was multiplied by 10
    dead: int  #: dead input columns (diag H == 0)
    loss: float  #: GPTQ's objective: sum over columns of (w - q)² / U[j,j]² / 2
    rel_err: float = float("nan")  #: ||(W - Ŵ) X||_F / ||W X||_F over the calibration tokens (from H)
    notes: list[str] = field(default_factory=list)


def inverse_hessian_upper(H: "torch.Tensor", damp: float, *, name: str = "", max_damp: float = MAX_DAMP) -> tuple["torch.Tensor", float, int]:
    """Upper Cholesky factor ``U`` of ``(H + d·mean(diag H)·I)⁻¹`` (float64) with the damping fix-up.

    Returns ``(U, damp_used, retries)``. Raises ``CheckpointError`` when ``H`` is not finite or cannot be
    made positive definite with ``damp <= max_damp``.
    """
    import torch

    where = f"{name}: " if name else ""
    if not bool(torch.isfinite(H).all()):
        raise CheckpointError(
            f"{where}GPTQ Hessian has NaN/inf entries: the calibration activations reaching this layer are not "
            "finite (check the input checkpoint for NaN/inf weights)"
        )
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    d = float(damp)
    retries = 0
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    while True:
        Hd = H + (d * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return U, d, retries
        if d * 10 > max_damp * (1 + 1e-9) or d == 0 and retries > 0:
            raise CheckpointError(
                f"{where}GPTQ Hessian is not positive definite even with damp={d:g} (tried {retries + 1} "
                f"dampening values from {damp:g}, limit {max_damp:g}); the calibration set may be too small "
                "or degenerate for this layer (use more --nsamples or a larger --damp)"
            )
        d = d * 10 if d > 0 else 1e-6
        retries += 1


class _few_threads:
    """Run the column recursion single-threaded on CPU: its ops are tiny, and OpenMP synchronisation
    dominates (16x slower with 2 threads on a busy 2-core machine). Restores the thread count."""

    def __init__(self, device: Any) -> None:
        self.cpu = getattr(device, "type", str(device)) == "cpu"

    def __enter__(self) -> None:
        import torch

        if self.cpu:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cpu:
            torch.set_num_threads(self.saved)


def _block_size(block_size: int, group_size: int, columns: int) -> int:
    """A block size such that no group straddles two blocks (a multiple of the group size)."""
    if group_size <= 0 or group_size >= columns:
        return block_size
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    return group_size


def group_aware_order(diag: "torch.Tensor", group_size: int) -> "torch.Tensor":
    """Group-aware reordering (GAR): a processing order that keeps every contiguous group together.

    Inside each group of ``group_size`` original columns, columns go by decreasing Hessian diagonal; groups
    go by decreasing maximum diagonal of their columns (ties: original order). Like act-order it quantizes
    the most salient columns first, but each group stays a contiguous range of original columns, so
    ``g_idx`` is the plain ``i // group_size`` and the file needs no ``desc_act``.
    """
    import torch

    cols = int(diag.numel())
    groups = [torch.arange(g0, min(g0 + group_size, cols), device=diag.device) for g0 in range(0, cols, group_size)]
    inner = [g[torch.argsort(diag[g], descending=True, stable=True)] for g in groups]
    score = torch.stack([diag[g].max() for g in groups])
    order = torch.argsort(score, descending=True, stable=True)
    return torch.cat([inner[int(k)] for k in order])


def _plan(cols: int, gs: int, perm: "torch.Tensor | None", gar: bool, block_size: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """(groups, blocks) in processing order.

    ``groups``: ``(start, size, slot)`` -- the run of processing positions ``start .. start+size`` forms one
    group whose scale/zero go to row ``slot`` of ``scales``. ``blocks``: lazy-update blocks ``(i1, i2)``,
    unions of whole groups (no group straddles two blocks) of about ``block_size`` columns.
    """
    if gs == -1:
        groups = [(0, cols, 0)]
        return groups, [(i, min(i + block_size, cols)) for i in range(0, cols, block_size)]
    if gar:
        assert perm is not None
        groups = []
        pos = 0
        while pos < cols:
            slot = int(perm[pos]) // gs
            size = min(gs, cols - slot * gs)
            groups.append((pos, size, slot))
            pos += size
    else:
        groups = [(g0, min(gs, cols - g0), k) for k, g0 in enumerate(range(0, cols, gs))]
    blocks: list[tuple[int, int]] = []
    cur = None
    for start, size, _ in groups:
        if cur is not None and start + size - cur <= max(block_size, gs):
            continue
        if cur is not None:
            blocks.append((cur, start))
        cur = start
    if cur is not None:
        blocks.append((cur, cols))
    return groups, blocks


def gptq_quantize(
    W: "torch.Tensor",
    H: "torch.Tensor",
    spec: QuantSpec,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compute_dtype: Any = None,
    name: str = "",
    max_damp: float = MAX_DAMP,
    group_aware: bool = False,
    phases: dict[str, float] | None = None,
) -> tuple[QuantizedLinear, GPTQStats]:
    """Quantize ``W [out, in]`` given the Hessian ``H [in, in]`` (``2/n Σ x xᵀ``); see the module doc.

    ``group_aware``: process columns in :func:`group_aware_order` (ignored with act-order, static groups or
    per-channel groups). Returns the :class:`QuantizedLinear` (codes in the original column order,
    ``g_idx``) and stats. ``phases``: seconds of the ordering, the Cholesky factorisations and the column
    solve are added to it.
    """
    with _few_threads(W.device):  # every step is small or latency-bound: no OpenMP team (see _few_threads)
        return _gptq_quantize(W, H, spec, block_size=block_size, compute_dtype=compute_dtype, name=name,
                              max_damp=max_damp, group_aware=group_aware, phases=phases)


def _gptq_quantize(W: "torch.Tensor", H: "torch.Tensor", spec: QuantSpec, *, block_size: int, compute_dtype: Any,
                   name: str, max_damp: float, group_aware: bool,
                   phases: dict[str, float] | None) -> tuple[QuantizedLinear, GPTQStats]:
    import time

    import torch

    clock = time.perf_counter
    t_start = clock()

    compute_dtype = compute_dtype or torch.float32
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    gs = spec.group_size
    if gs != -1 and (gs <= 0):
        raise ConfigError(f"group size must be -1 or positive, got {gs}")
    maxq = spec.maxq
    dev = W.device
    W = W.detach().to(compute_dtype).clone()
    H = H.detach().to(device=dev, dtype=torch.float64).clone()

    diag = torch.diagonal(H)
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0

    static_params = None
    if gs != -1 and spec.static_groups:
        # parameters of the original contiguous groups, from the original weights
        static_params = [find_params(W[:, g0:g0 + gs], spec.bits, spec.sym) for g0 in range(0, cols, gs)]

    gar = bool(group_aware) and gs != -1 and not spec.act_order and static_params is None
    if spec.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    elif gar:
        perm = group_aware_order(torch.diagonal(H).clone(), gs)
    else:
        perm = None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    else:
        invperm = None

    t_order = clock()
    U, damp_used, retries = inverse_hessian_upper(H, spec.damp, name=name, max_damp=max_damp)
    t_chol = clock()
    Hinv = U.to(compute_dtype)
    del H, U

    n_groups = 1 if gs == -1 else -(-cols // gs)  # a shorter last group when gs does not divide cols
    scales = torch.zeros(n_groups, rows, dtype=compute_dtype, device=dev)
    zeros = torch.zeros(n_groups, rows, dtype=compute_dtype, device=dev)
    codes = torch.zeros(rows, cols, dtype=compute_dtype, device=dev)
    losses = torch.zeros(rows, dtype=compute_dtype, device=dev)

    groups, blocks = _plan(cols, gs, perm, gar, _block_size(block_size, gs, cols))
    starts = {start: (size, slot) for start, size, slot in groups}
    scale = zero = None
    if gs == -1:
        scale, zero = find_params(W, spec.bits, spec.sym)
        scales[0], zeros[0] = scale, zero

    # Elementwise steps read the column once into a contiguous vector and write codes and errors as rows of
    # transposed block buffers (strided column ops cost 2-3x more); the rank-1 update and the block update
    # keep the exact calls and memory layouts of the reference recursion (the BLAS kernels round differently
    # on other layouts), so the codes are bit-for-bit those of the plain column loop.
    for i1, i2 in blocks:
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        QT = torch.empty(count, rows, dtype=compute_dtype, device=dev)
        ET = torch.empty(count, rows, dtype=compute_dtype, device=dev)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1 = torch.diagonal(Hinv1).tolist()
        for i in range(count):
            j = i1 + i  # column in processing order
            if gs != -1:
                if static_params is not None:
                    g = int(perm[j]) // gs if perm is not None else j // gs
                    scale, zero = static_params[g]
                elif j in starts:
                    size, slot = starts[j]
                    scale, zero = find_params(W1[:, i:i + size], spec.bits, spec.sym)
                    scales[slot], zeros[slot] = scale, zero
            w = W1[:, i].contiguous()
            q = torch.round(w / scale).add_(zero).clamp_(0, maxq)
            QT[i] = q
            err = (w - (q - zero).mul_(scale)).div_(diag1[i])
            ET[i] = err
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        codes[:, i1:i2] = QT.T
        Err1 = ET.T.contiguous()
        losses += Err1.pow(2).sum(dim=1) / 2
        if i2 < cols:
            W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])

    t_solve = clock()
    if static_params is not None:
        for g, (s, z) in enumerate(static_params):
            scales[g], zeros[g] = s, z
        g_idx = torch.arange(cols, device=dev) // gs
    elif gs == -1:
        g_idx = torch.zeros(cols, dtype=torch.long, device=dev)
    else:
        g_idx = torch.arange(cols, device=dev) // gs
        if invperm is not None and not gar:  # act-order: groups are runs in processing order
            g_idx = g_idx[invperm]
    if invperm is not None:
        codes = codes[:, invperm]

    ql = QuantizedLinear(
        codes=codes.to(torch.uint8 if spec.bits <= 8 else torch.int32).cpu(),
        scales=scales.to(torch.float32).cpu(),
        zeros=zeros.round().to(torch.int32).cpu(),
        g_idx=g_idx.to(torch.int32).cpu(),
        spec=spec,
    )
    stats = GPTQStats(damp=damp_used, retries=retries, dead=n_dead, loss=float(losses.sum()))
    if phases is not None:
        t_end = clock()
        for key, sec in (("order", t_order - t_start), ("cholesky", t_chol - t_order), ("solve", t_solve - t_chol),
                         ("codes", t_end - t_solve)):
            phases[key] = phases.get(key, 0.0) + sec
    if retries:
        stats.notes.append(f"Hessian not positive definite at damp={spec.damp:g}; used damp={damp_used:g}")
    return ql, stats


REL_ERR_ROWS = 128  #: output_rel_error estimates on at most this many evenly spaced rows


def output_rel_error(W: "torch.Tensor", W_hat: "torch.Tensor", H: "torch.Tensor", *,
                     max_rows: int | None = REL_ERR_ROWS) -> float:
    """``||(W - Ŵ) X||_F / ||W X||_F`` computed from ``H = 2/n X Xᵀ`` (no need to keep X).

    A progress figure only (nothing written depends on it): one float32 product ``[W - Ŵ; W] · H`` with the
    row-wise dot products summed in float64, over every ``k``-th row when ``W`` has more than ``max_rows``
    rows (an estimate; ``max_rows=None``: all rows). The product costs ``rows · in²``, as much as a
    forward over ``in`` tokens, so the estimate keeps it small next to the layer's real work."""
    import torch

    if max_rows is not None and W.shape[0] > max_rows:
        step = -(-W.shape[0] // max_rows)
        W, W_hat = W[::step], W_hat[::step]
    W32 = W.to(torch.float32)
    D = W32 - W_hat.to(device=W.device, dtype=torch.float32)
    rows = W32.shape[0]
    P = torch.cat([D, W32]) @ H.to(device=W.device, dtype=torch.float32)  # a no-op for a float32 H
    num = float((P[:rows] * D).sum(dtype=torch.float64))
    den = float((P[rows:] * W32).sum(dtype=torch.float64))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------
# the quantizer entry point (called by the driver): streaming, layer by layer
# ---------------------------------------------------------------------------------------------------------
def quantize(request: Any) -> Iterator[tuple[str, Any]]:
    """The ``gptq`` quantizer: yields ``(module_name, QuantizedLinear)`` one decoder layer at a time.

    Calibration hidden states enter decoder layer 0; for each layer, its weights are read from the
    checkpoint, the target linears are quantized in true-sequential groups (modules that share an input,
    in execution order: q/k/v, then o, then gate/up, then down), each group's Hessian collected from the
    layer *with the previous groups already quantized*; then the quantized layer's outputs become the next
    layer's inputs. Peak memory: one layer (fp32) plus the calibration activations.
    """
    from adaptkit_quant.layerwise import LayerwiseModel

    spec: QuantSpec = request.spec
    options = request.options or {}
    block_size = int(options.get("block_size", DEFAULT_BLOCK_SIZE))
    group_order = str(options.get("group_order", DEFAULT_GROUP_ORDER))
    if group_order not in ("natural", "gar"):
        raise ConfigError(f"gptq option group_order={group_order!r}: expected natural or gar")
    lw = LayerwiseModel.from_request(request)
    targets = set(request.targets)
    done: set[str] = set()
    try:
        yield from _stream_layers(request, lw, spec, block_size, targets, done, group_aware=group_order == "gar")
    finally:
        lw.close()
    missing = [t for t in request.targets if t not in done]
    if missing:
        raise ConfigError(
            f"gptq can only quantize linear layers inside the decoder layers; {missing[0]!r} is outside them"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def _stream_layers(request: Any, lw: Any, spec: QuantSpec, block_size: int, targets: set[str], done: set[str],
                   *, group_aware: bool = False) -> Iterator[tuple[str, Any]]:
    import torch

    from adaptkit_quant.layerwise import run_sequential_groups

    for idx in range(lw.num_layers):
        layer = lw.load_layer(idx)
        layer_targets = [n for n in lw.linear_names(idx) if n in targets]

        def quantize_group(names: list[str], H: "torch.Tensor", modules: dict[str, Any]) -> dict[str, Any]:
            # modules sharing an input share H: their rows are quantized in one recursion (rows are
            # independent given H, so this equals quantizing them one by one, with one factorisation)
            Ws = [modules[full].weight.detach().float() for full in names]
            W = torch.cat(Ws, dim=0)
            label = "+".join(full.rsplit(".", 1)[-1] for full in names)
            ql, st = gptq_quantize(W, H, spec, block_size=block_size, name=label if len(names) > 1 else names[0],
                                   group_aware=group_aware, phases=lw.phases)
            out = {}
            r0 = 0
            errs = []
            with _few_threads(W.device):
                _split(names, Ws, ql, H.to(torch.float32), out, errs)  # H in float32 once for rel_err
            msg = f"layer {idx + 1}/{lw.num_layers} gptq rel_err " + " ".join(errs)
            if st.retries:
                msg += f" ({st.notes[0]})"
            if st.dead:
                msg += f" dead_inputs={st.dead}"
            request.report(msg)
            return out

        def _split(names: list[str], Ws: list[Any], ql: Any, H: "torch.Tensor", out: dict[str, Any],
                   errs: list[str]) -> None:
            r0 = 0
            for full, Wm in zip(names, Ws):
                r1 = r0 + Wm.shape[0]
                part = QuantizedLinear(
                    codes=ql.codes[r0:r1].contiguous(), scales=ql.scales[:, r0:r1].contiguous(),
                    zeros=ql.zeros[:, r0:r1].contiguous(), g_idx=ql.g_idx.clone(), spec=spec,
                )
                with lw.timed("dequantize"):
                    W_hat = part.dequantize().to(Wm.device)
                with lw.timed("rel_err"):
                    errs.append(f"{full.rsplit('.', 1)[-1]}={output_rel_error(Wm, W_hat, H):.4f}")
                out[full] = (part, W_hat)
                r0 = r1

        results = run_sequential_groups(lw, idx, layer, layer_targets, quantize_group,
                                        true_sequential=spec.true_sequential, advance=True)
        for full, ql in results:
            done.add(full)
            yield full, ql
        lw.unload_layer(idx)
