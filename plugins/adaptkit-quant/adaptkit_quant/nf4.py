"""NF4 quantization (bitsandbytes' 4-bit NormalFloat, blockwise absmax, optional double quantization),
implemented in torch and written in the layout transformers + bitsandbytes load (``formats/nf4.py``).

Algorithm (QLoRA): flatten ``W``; per block of ``blocksize`` values ``absmax = max|w|``; ``x = w * (1/absmax)``
clamped to [-1, 1]; code = index of the nearest NF4 value (ties to the lower code: thresholds are the
midpoints between neighbouring code values, ``x <= midpoint`` picks the lower one). Double quantization:
``offset = mean(absmax)``; ``absmax - offset`` is quantized blockwise (256) with the signed 8-bit dynamic
map in the same way.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from adaptkit_quant.api import QuantizeRequest, QuantizeResult, QuantSpec
from adaptkit_quant.formats import nf4 as fmt

if TYPE_CHECKING:  # pragma: no cover
    import torch

_DYNAMIC: "torch.Tensor | None" = None


def nf4_code() -> "torch.Tensor":
    import torch

    return torch.tensor(fmt.NF4_CODE, dtype=torch.float32)


def dynamic_map() -> "torch.Tensor":
    """The signed 8-bit dynamic-exponent map (Dettmers 2016, "8-bit approximations"): for exponent
    ``e = 0..6``, ``2**e`` fraction values -- the midpoints of ``linspace(0.1, 1, 2**e + 1)`` -- scaled by
    ``10**(e-6)``, both signs; plus 0 and 1; sorted. 256 fp32 values."""
    import torch

    global _DYNAMIC
    if _DYNAMIC is None:
        vals: list[float] = []
        for e in range(7):
            edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
            mids = (edges[:-1] + edges[1:]) / 2.0
            scaled = mids * (10.0 ** (e - 6))
            vals += scaled.tolist() + (-scaled).tolist()
        vals += [0.0, 1.0]
        assert len(vals) == 256
        _DYNAMIC = torch.tensor(sorted(vals), dtype=torch.float32)
    return _DYNAMIC


def _blockwise(x: "torch.Tensor", code: "torch.Tensor", blocksize: int, lut: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Nearest-code blockwise absmax quantization of flat fp32 ``x``: (int64 codes, fp32 absmax)."""
    import torch

    n = x.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    blocks = xp.reshape(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = torch.clamp(blocks * inv[:, None], -1.0, 1.0).reshape(-1)
    mid = (code[:-1] + code[1:]) / 2
    if lut:
        # bitsandbytes' CPU kernel: snap x to a 65536-point grid on [-1, 1], then nearest code of the grid point
        t = (scaled + 1.0) * 0.5
        idx = torch.floor((t.double() * (_LUT_SIZE - 1) + 0.5).float().double()).long().clamp(0, _LUT_SIZE - 1)
        q = _lut(code, mid)[idx]
        q = torch.where((absmax == 0).repeat_interleave(blocksize), torch.zeros_like(q), q)  # kernel writes 0
    else:
        q = torch.bucketize(scaled, mid)  # x <= mid[i] -> i (ties to the lower code)
    return q, absmax


_LUT_SIZE = 65536


_LUTS: dict[tuple[float, ...], "torch.Tensor"] = {}


def _lut(code: "torch.Tensor", mid: "torch.Tensor") -> "torch.Tensor":
    """code index of each of the 65536 grid points (cached per code table)."""
    key = tuple(code.tolist())
    cached = _LUTS.get(key)
    if cached is not None:
        return cached.to(code.device)
    _LUTS[key] = table = _build_lut(mid)
    return table.to(code.device)


def _build_lut(mid: "torch.Tensor") -> "torch.Tensor":
    import torch

    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    grid = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mid.contiguous().cpu(), grid, side="left")


def quantize_nf4(
    w: "torch.Tensor", *, blocksize: int = 64, double_quant: bool = True, absmax_rounding: str = "bnb-cpu"
) -> dict[str, Any]:
    """Quantize one weight. Returns ``packed`` uint8 ``[ceil(n/2), 1]``, ``absmax`` (fp32, or uint8 with
    double quant), ``nested_absmax``, ``offset`` (float), ``code``, ``nested_code``."""
    import torch

    x = w.reshape(-1).to(torch.float32)
    n = x.numel()
    q, absmax = _blockwise(x, nf4_code(), blocksize)
    # padding inside the last block quantizes 0.0 (the NF4 code 7), as bitsandbytes pads its odd tail
    q = q[: n + (n % 2)]
    q8 = q.to(torch.uint8)
    packed = ((q8[0::2] << 4) | q8[1::2]).reshape(-1, 1)
    out: dict[str, Any] = {"packed": packed, "code": nf4_code()}
    if double_quant:
        offset = absmax.mean()
        qa, nested = _blockwise(absmax - offset, dynamic_map(), fmt.NESTED_BLOCKSIZE, lut=absmax_rounding == "bnb-cpu")
        qa = qa[: absmax.numel()]
        out.update(absmax=qa.to(torch.uint8), nested_absmax=nested, offset=float(offset.item()), nested_code=dynamic_map())
    else:
        out.update(absmax=absmax, nested_absmax=None, offset=None, nested_code=None)
    return out


def dequantize_nf4(
    packed: "torch.Tensor", absmax: "torch.Tensor", quant_map: "torch.Tensor", shape: tuple[int, ...], *,
    blocksize: int, nested_absmax: "torch.Tensor | None" = None, nested_quant_map: "torch.Tensor | None" = None,
    offset: float | None = None, nested_blocksize: int = fmt.NESTED_BLOCKSIZE,
) -> "torch.Tensor":
    """fp32 ``W_hat`` of ``shape`` from the serialized tensors."""
    import torch

    n = 1
    for d in shape:
        n *= d
    b = packed.reshape(-1).to(torch.uint8)
    idx = torch.empty(b.numel() * 2, dtype=torch.int64)
    idx[0::2] = (b >> 4).to(torch.int64)
    idx[1::2] = (b & 0xF).to(torch.int64)
    vals = quant_map.to(torch.float32)[idx[:n]]
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or nested_quant_map is None or offset is None:
            raise ValueError("uint8 absmax needs nested_absmax, nested_quant_map and nested_offset")
        a = nested_quant_map.to(torch.float32)[absmax.to(torch.int64)]
        m = a.numel()
        rep = torch.repeat_interleave(nested_absmax.to(torch.float32), nested_blocksize)[:m]
        absmax_f = a * rep + float(offset)
    else:
        absmax_f = absmax.to(torch.float32)
    scale = torch.repeat_interleave(absmax_f, blocksize)[:n]
    return (vals * scale).reshape(shape)


def write_nf4(
    request: QuantizeRequest, *, force: bool, t0: float, max_shard_size: int | None = None,
    blocksize: int = 64, double_quant: bool = True, compute_dtype: str | None = None,
    absmax_rounding: str = "bnb-cpu", **_: Any,
) -> QuantizeResult:
    """The ``nf4`` quantizer end to end (no calibration): plan, quantize each target, stream, publish."""
    import json

    from adaptkit.errors import ConfigError
    from adaptkit.io import ShardedWriter, TensorSpec, atomic_output_dir, copy_aux_files

    from adaptkit_quant import __version__

    ckpt = request.checkpoint
    assert ckpt is not None
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ConfigError(f"nf4 blocksize {blocksize} is out of range: use a power of two from 32 to 4096 (default 64)")
    weight_names = [t + ".weight" for t in request.targets]
    wset = set(weight_names)
    dtypes = {ckpt.info(n).dtype for n in weight_names}
    bad = dtypes - set(fmt.DTYPE_NAMES)
    if bad:
        raise ConfigError(f"nf4 quantizes fp32/fp16/bf16 weights, found {', '.join(sorted(bad))}")
    if compute_dtype in (None, "auto"):
        # what the model computes in: the dtype of its linear weights (bf16 models -> bfloat16)
        compute_dtype = fmt.DTYPE_NAMES[ckpt.info(weight_names[0]).dtype]
    if compute_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"nf4 compute_dtype {compute_dtype!r}: use float32, float16 or bfloat16")

    # planning pass: the quant_state JSON records the double-quant offset, so its length depends on the data
    request.report(f"nf4: planning {len(weight_names)} linears")
    plans: dict[str, bytes] = {}
    for n in weight_names:
        plans[n] = _state_json(ckpt.get(n), ckpt.info(n), blocksize, double_quant)
    specs: list[TensorSpec] = []
    for n in ckpt.names():
        if n in wset:
            info = ckpt.info(n)
            numel = info.numel
            specs.extend(TensorSpec(a, b, tuple(c)) for a, b, c in fmt.tensor_specs(
                n, numel, blocksize=blocksize, double_quant=double_quant, qs_len=len(plans[n])))
        else:
            info = ckpt.info(n)
            specs.append(TensorSpec(n, info.dtype, tuple(info.shape)))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    qconfig = fmt.quantization_config(compute_dtype=compute_dtype, double_quant=double_quant)
    total = len(weight_names)
    with atomic_output_dir(request.out_dir, force=force) as tmp:
        with ShardedWriter(tmp, specs, metadata={"quantized_by": f"adaptkit-quant {__version__}"}, **kw) as writer:
            last = None
            for k, n in enumerate(ckpt.names()):
                if n not in wset:
                    writer.write(n, ckpt.get(n))
                    continue
                info = ckpt.info(n)
                r = quantize_nf4(ckpt.get(n), blocksize=blocksize, double_quant=double_quant, absmax_rounding=absmax_rounding)
                qs = fmt.quant_state_json(
                    blocksize=blocksize, dtype=fmt.DTYPE_NAMES[info.dtype], shape=tuple(info.shape), offset=r["offset"]
                )
                if qs != plans[n]:  # pragma: no cover - the planning pass computed the same offset
                    raise RuntimeError(f"{n}: nf4 quant_state changed between planning and writing")
                writer.write(n, r["packed"])
                writer.write(f"{n}.absmax", r["absmax"])
                writer.write(f"{n}.quant_map", r["code"])
                if double_quant:
                    writer.write(f"{n}.nested_absmax", r["nested_absmax"])
                    writer.write(f"{n}.nested_quant_map", r["nested_code"])
                writer.write_bytes(f"{n}.{fmt.QS_SUFFIX}", qs)
                layer = n.split(".layers.")[1].split(".")[0] if ".layers." in n else n
                if layer != last:
                    request.report(f"nf4: layer {layer} ({k + 1}/{len(specs)} tensors, {total} linears)")
                    last = layer
        copy_aux_files(request.model_dir, tmp, config=False)
        cfg = dict(request.config or {})
        cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        bytes_out = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")
    import time as _t

    return QuantizeResult(
        out_dir=request.out_dir, method="nf4", format="bnb-nf4", spec=QuantSpec(bits=4, group_size=blocksize, sym=True),
        quantized=list(request.targets), passthrough=len(ckpt.names()) - total, bytes_in=ckpt.total_bytes,
        bytes_out=bytes_out, seconds=_t.perf_counter() - t0, quantization_config=qconfig,
    )


def _state_json(w: "torch.Tensor", info: Any, blocksize: int, double_quant: bool) -> bytes:
    import torch

    offset = None
    if double_quant:
        x = w.reshape(-1).to(torch.float32)
        n = x.numel()
        nb = -(-n // blocksize)
        pad = nb * blocksize - n
        xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
        offset = float(xp.reshape(nb, blocksize).abs().amax(dim=1).mean().item())
    return fmt.quant_state_json(blocksize=blocksize, dtype=fmt.DTYPE_NAMES[info.dtype], shape=tuple(info.shape), offset=offset)


def quantize(request: QuantizeRequest):  # pragma: no cover - the driver special-cases nf4 (own layout)
    """Registered impl of ``nf4``; the driver writes nf4 through :func:`write_nf4` directly."""
    raise NotImplementedError("nf4 is written by adaptkit_quant.driver via nf4.write_nf4")
