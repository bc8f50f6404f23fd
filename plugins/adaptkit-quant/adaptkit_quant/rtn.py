"""Round-to-nearest (RTN): the baseline quantizer, and the min/max grid helpers GPTQ reuses.

Grid (GPTQ convention, see specs/formats.md): per output row and group, ``xmin = min(w.min(), 0)``,
``xmax = max(w.max(), 0)``;

* asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``; a zero point of 0 (GPTQ v1
  cannot store it) becomes 1 with ``scale = max(scale, xmax / (maxq - 1))`` so the range stays covered;
* symmetric: ``scale = 2 * max(|xmin|, xmax) / maxq``, ``zero = 2**(bits-1)``;
* an all-zero row uses ``scale`` as if the range were [-1, 1];

the scale is rounded to fp16 (what GPTQ/AWQ files store), then ``code = clamp(round(w / scale) + zero, 0,
maxq)``. Everything is computed in fp32.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from adaptkit.quantize.api import QuantizedLinear, QuantizeRequest, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

FP16_TINY = 2.0**-14  # smallest normal fp16; scales are kept at least this large


def fp16_round(x: "torch.Tensor") -> "torch.Tensor":
    """Round to the nearest fp16 value (kept >= FP16_TINY), returned as fp32."""
    import torch

    return x.clamp(min=FP16_TINY, max=65504.0).to(torch.float16).to(torch.float32)


def find_params(w: "torch.Tensor", bits: int, sym: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Scale (fp32, fp16-representable) and integer zero point (int32) per row of ``w [rows, cols]``."""
    import torch

    w = w.to(torch.float32)
    maxq = 2**bits - 1
    xmin = torch.clamp(w.amin(dim=1), max=0.0)
    xmax = torch.clamp(w.amax(dim=1), min=0.0)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = fp16_round(2 * amax / maxq)
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        return scale, zero
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = fp16_round((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    low = zero < 1
    if bool(low.any()):
        # zero point 0 is not storable in GPTQ v1: shift the grid one step down, keep xmax representable
        wider = fp16_round(xmax / (maxq - 1))
        scale = torch.where(low, torch.maximum(scale, wider), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    zero = torch.clamp(zero, 1, maxq).to(torch.int32)
    return scale, zero


def quantize_codes(w: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor", bits: int) -> "torch.Tensor":
    """``clamp(round(w / scale) + zero, 0, maxq)`` row-wise (``scale``/``zero`` are per row), as int32."""
    import torch

    q = torch.round(w.to(torch.float32) / scale[:, None]) + zero[:, None].to(torch.float32)
    return torch.clamp(q, 0, 2**bits - 1).to(torch.int32)


def quantize_weight(w: "torch.Tensor", spec: QuantSpec) -> QuantizedLinear:
    """RTN-quantize one weight ``[out, in]`` group-wise (contiguous groups, no act-order), vectorised."""
    import torch

    w = w.to(torch.float32)
    out_f, in_f = w.shape
    gs = spec.effective_group_size(in_f)
    n_groups = spec.n_groups(in_f)
    pad = n_groups * gs - in_f
    if pad:
        # a shorter last group: pad it with zeros, which never change the grid (its range includes 0)
        w = torch.nn.functional.pad(w, (0, pad))
    rows = w.reshape(out_f, n_groups, gs).reshape(out_f * n_groups, gs)  # row (o, g)
    s, z = find_params(rows, spec.bits, spec.sym)
    codes = quantize_codes(rows, s, z, spec.bits).reshape(out_f, n_groups * gs)[:, :in_f].contiguous()
    scales = s.reshape(out_f, n_groups).T.contiguous()
    zeros = z.reshape(out_f, n_groups).T.contiguous()
    g_idx = (torch.arange(in_f, dtype=torch.int32, device=w.device) // gs).to(torch.int32)
    return QuantizedLinear(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, spec=spec)


def quantize(request: QuantizeRequest) -> Iterator[tuple[str, QuantizedLinear]]:
    """The ``rtn`` quantizer: every target, independently, no calibration."""
    spec = request.spec
    if spec.act_order:
        # act-order needs activation statistics; RTN has none. Refuse rather than ignore silently.
        from adaptkit.errors import ConfigError

        raise ConfigError("--act-order needs calibration statistics; the rtn method does not support it")
    device = request.device
    total = len(request.targets)
    last_layer = None
    for i, module in enumerate(request.targets):
        w = request.weight(module)
        if device and device != "cpu":
            w = w.to(device)
        q = quantize_weight(w, spec)
        if q.codes.device.type != "cpu":
            q = QuantizedLinear(q.codes.cpu(), q.scales.cpu(), q.zeros.cpu(), q.g_idx.cpu(), spec)
        layer = _layer_of(module)
        if layer != last_layer:
            request.report(f"rtn: {layer} ({i + 1}/{total} linears)")
            last_layer = layer
        del w
        yield module, q


def _layer_of(module: str) -> str:
    parts = module.split(".")
    for k, p in enumerate(parts):
        if p == "layers" and k + 1 < len(parts):
            return ".".join(parts[: k + 2])
    return module
