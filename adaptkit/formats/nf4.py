"""bitsandbytes 4-bit (NF4) serialized layout, as transformers saves a ``load_in_4bit`` model.

Per quantized linear weight ``<m>.weight`` (``W [out, in]``, ``n = out*in``, blocksize ``B`` = 64 default):

* ``<m>.weight``                uint8 ``[ceil(n/2), 1]``: NF4 codes of the flattened weight, two per byte, the
  EVEN element in the HIGH nibble (an odd tail is padded with the code of 0.0);
* ``<m>.weight.absmax``         per-block absmax: fp32 ``[ceil(n/B)]``, or with double quantization uint8
  codes of ``absmax - offset`` in the 8-bit dynamic map, blockwise over 256 absmax values;
* ``<m>.weight.quant_map``      fp32 ``[16]``: the NF4 code table;
* ``<m>.weight.nested_absmax``  fp32 ``[ceil(n/B/256)]`` (double quant only);
* ``<m>.weight.nested_quant_map`` fp32 ``[256]``: the dynamic map (double quant only);
* ``<m>.weight.quant_state.bitsandbytes__nf4`` uint8: UTF-8 of ``json.dumps({"quant_type": "nf4",
  "blocksize": B, "dtype": "bfloat16", "shape": [out, in]`` (+ ``"nested_blocksize": 256, "nested_dtype":
  "float32", "nested_offset": offset`` with double quant) ``})``.

``W_hat = quant_map[code] * absmax_block`` (absmax = ``nested_quant_map[q] * nested_absmax + offset`` when
double-quantized), cast to ``dtype``.

The format takes :class:`adaptkit.quantize.api.BlockwiseQuantized` results (codes + fp32 absmax per block)
and owns the storage choices, set with the quantizer's options: ``blocksize`` (also the layout's), and
``double_quant``, ``absmax_rounding`` (how ``absmax`` is double-quantized: ``"bnb-cpu"`` reproduces
bitsandbytes' CPU kernel, ``"nearest"`` is the exact nearest code), ``compute_dtype`` (recorded in
``config.json``; ``"auto"``: the weights' dtype). It also reads FP4 checkpoints (``__fp4`` quant states:
the stored ``quant_map`` is the code table). Implements the format-module API of :mod:`adaptkit.formats`.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from adaptkit.quantize.api import BlockwiseQuantized, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "bnb-nf4"
ITEM = BlockwiseQuantized
DESCRIPTION = "bitsandbytes 4-bit NormalFloat (transformers load_in_4bit): blockwise absmax, optional double quantization"

QS_SUFFIX = "quant_state.bitsandbytes__nf4"
QS_SUFFIXES = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4",)  #: what this writer stores (the reader also reads fp4: its quant_map is stored)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
ABSMAX_ROUNDINGS = ("bnb-cpu", "nearest")
_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

#: The NF4 data type (QLoRA, Dettmers et al. 2023, appendix E), as fp32 values.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}


# -- code tables and blockwise math (shared by the writer, the reader and NF4 quantizers) ---------------------
_DYNAMIC: "torch.Tensor | None" = None
_LUT_SIZE = 65536
_LUTS: dict[tuple[float, ...], "torch.Tensor"] = {}


def nf4_code() -> "torch.Tensor":
    import torch

    return torch.tensor(NF4_CODE, dtype=torch.float32)


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


def block_absmax(x: "torch.Tensor", blocksize: int) -> "torch.Tensor":
    """fp32 ``[ceil(n/blocksize)]``: max |x| of each block of the flat tensor (the last block zero-padded)."""
    import torch

    x = x.reshape(-1).to(torch.float32)
    n = x.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return xp.reshape(nb, blocksize).abs().amax(dim=1)


def blockwise(x: "torch.Tensor", code: "torch.Tensor", blocksize: int, lut: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Nearest-code blockwise absmax quantization of flat fp32 ``x``: (int64 codes incl. the padding of the last
    block, fp32 absmax). Ties go to the lower code (``x <= midpoint``); ``lut``: bitsandbytes' CPU kernel,
    which snaps ``x`` to a 65536-point grid on [-1, 1] first and writes code 0 for an all-zero block."""
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
        t = (scaled + 1.0) * 0.5
        idx = torch.floor((t.double() * (_LUT_SIZE - 1) + 0.5).float().double()).long().clamp(0, _LUT_SIZE - 1)
        q = _lut(code, mid)[idx]
        q = torch.where((absmax == 0).repeat_interleave(blocksize), torch.zeros_like(q), q)  # kernel writes 0
    else:
        q = torch.bucketize(scaled, mid)  # x <= mid[i] -> i (ties to the lower code)
    return q, absmax


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


def pack_codes(codes: "torch.Tensor", code: "torch.Tensor") -> "torch.Tensor":
    """4-bit codes ``[n]`` -> uint8 ``[ceil(n/2), 1]``, even element in the high nibble; an odd tail is padded
    with the code of 0.0 (what bitsandbytes' kernel quantizes the zero padding of its last block to)."""
    import torch

    q = codes.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        zero = int(torch.argmin(code.abs()))
        q = torch.cat([q, torch.tensor([zero], dtype=torch.uint8)])
    return ((q[0::2] << 4) | q[1::2]).reshape(-1, 1)


def double_quantize(absmax: "torch.Tensor", rounding: str = "bnb-cpu") -> tuple["torch.Tensor", "torch.Tensor", float]:
    """fp32 absmax -> (uint8 codes in the dynamic map, fp32 nested absmax per 256, offset = mean(absmax))."""
    import torch

    absmax = absmax.to(torch.float32)
    offset = absmax.mean()
    qa, nested = blockwise(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE, lut=rounding == "bnb-cpu")
    return qa[: absmax.numel()].to(torch.uint8), nested, float(offset.item())


def quant_state_json(*, blocksize: int, dtype: str, shape: tuple[int, ...], offset: float | None,
                     quant_type: str = "nf4") -> bytes:
    d: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if offset is not None:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset})
    return json.dumps(d).encode("utf-8")


def dequantize_nf4(
    packed: "torch.Tensor", absmax: "torch.Tensor", quant_map: "torch.Tensor", shape: tuple[int, ...], *,
    blocksize: int, nested_absmax: "torch.Tensor | None" = None, nested_quant_map: "torch.Tensor | None" = None,
    offset: float | None = None, nested_blocksize: int = NESTED_BLOCKSIZE,
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


# -- writing (format-module API) --------------------------------------------------------------------------------
def _opts(options: dict[str, Any] | None) -> tuple[int, bool, str, str]:
    o = options or {}
    return (int(o.get("blocksize", 64)), bool(o.get("double_quant", True)), str(o.get("compute_dtype", "auto")),
            str(o.get("absmax_rounding", "bnb-cpu")))


def spec_problem(spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    blocksize, _, compute_dtype, rounding = _opts(options)
    if spec.bits != 4:
        return f"bitsandbytes NF4 stores 4-bit weights only, not {spec.bits}"
    if blocksize not in BLOCKSIZES:
        return f"blocksize {blocksize} is out of range: use a power of two from 32 to 4096 (default 64)"
    if compute_dtype not in COMPUTE_DTYPES:
        return f"compute_dtype {compute_dtype!r}: use {', '.join(COMPUTE_DTYPES)}"
    if rounding not in ABSMAX_ROUNDINGS:
        return f"absmax_rounding {rounding!r}: use {' or '.join(ABSMAX_ROUNDINGS)}"
    return None


def shape_problem(out_features: int, in_features: int, spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    return spec_problem(spec, options)  # any shape: the weight is flattened into blocks


def _state(weight_dtype: str, shape: tuple[int, ...], absmax: "torch.Tensor", blocksize: int, double_quant: bool) -> bytes:
    if weight_dtype not in DTYPE_NAMES:
        raise ValueError(f"bitsandbytes NF4 records the weight dtype as float32/float16/bfloat16, not {weight_dtype}")
    offset = float(absmax.mean().item()) if double_quant else None
    return quant_state_json(blocksize=blocksize, dtype=DTYPE_NAMES[weight_dtype], shape=tuple(shape), offset=offset)


def tensor_specs(module: str, out_features: int, in_features: int, spec: QuantSpec,
                 options: dict[str, Any] | None = None, weight: Callable[[], Any] | None = None) -> list[tuple[str, str, tuple]]:
    """The quant_state JSON records the double-quant offset (the mean block absmax), so its length depends on
    the data: ``weight()`` (the stored input weight) is read once here to plan it."""
    blocksize, double_quant, _, _ = _opts(options)
    name = f"{module}.weight"
    numel = out_features * in_features
    if weight is None:
        raise ValueError("bnb-nf4 plans its quant_state from the weight: pass weight=")
    w = weight()
    qs = _state(_dtype_code(w.dtype), (out_features, in_features), block_absmax(w, blocksize), blocksize, double_quant)
    nblocks = -(-numel // blocksize)
    out = [(name, "U8", ((numel + 1) // 2, 1))]
    if double_quant:
        out += [
            (f"{name}.absmax", "U8", (nblocks,)),
            (f"{name}.nested_absmax", "F32", (-(-nblocks // NESTED_BLOCKSIZE),)),
            (f"{name}.nested_quant_map", "F32", (256,)),
        ]
    else:
        out += [(f"{name}.absmax", "F32", (nblocks,))]
    out += [(f"{name}.quant_map", "F32", (16,)), (f"{name}.{QS_SUFFIX}", "U8", (len(qs),))]
    return out


def _dtype_code(dtype: Any) -> str:
    from adaptkit.io.dtypes import dtype_code

    return dtype_code(dtype)


def pack(item: BlockwiseQuantized, spec: QuantSpec | None = None, options: dict[str, Any] | None = None, *,
         weight_dtype: str = "F32") -> dict[str, "torch.Tensor"]:
    """BlockwiseQuantized -> the tensors of one weight (suffixes relative to the module)."""
    import torch

    blocksize, double_quant, _, rounding = _opts(options)
    if item.blocksize != blocksize:
        raise ValueError(f"blocksize {item.blocksize} differs from the format's blocksize {blocksize}")
    if item.quant_type not in QUANT_TYPES or item.code.numel() != 16:
        raise ValueError(f"bnb-nf4 stores 16-value NF4 codes, got quant_type {item.quant_type!r}")
    absmax = item.absmax.to(torch.float32)
    out: dict[str, torch.Tensor] = {"weight": pack_codes(item.codes, item.code)}
    qs = _state(weight_dtype, tuple(item.shape), absmax, blocksize, double_quant)
    if double_quant:
        qa, nested, _ = double_quantize(absmax, rounding)
        out["weight.absmax"] = qa
        out["weight.nested_absmax"] = nested
        out["weight.nested_quant_map"] = dynamic_map()
    else:
        out["weight.absmax"] = absmax.contiguous()
    out["weight.quant_map"] = item.code.to(torch.float32).contiguous()
    out[f"weight.{QS_SUFFIX}"] = torch.frombuffer(bytearray(qs), dtype=torch.uint8)
    return out


def quantization_config(spec: QuantSpec, *, method: str = "", options: dict[str, Any] | None = None,
                        weight_dtype: str | None = None, storage: str = "uint8") -> dict[str, Any]:
    """What transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` writes."""
    _, double_quant, compute_dtype, _ = _opts(options)
    if compute_dtype == "auto":  # what the model computes in: the dtype of its linear weights
        compute_dtype = DTYPE_NAMES.get(str(weight_dtype), "float32")
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": storage,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def file_metadata(qconfig: dict[str, Any], producer: str = "") -> dict[str, str]:
    return {"quantized_by": producer or "adaptkit"}


def extra_files(qconfig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {}


# -- reading (format-module API) --------------------------------------------------------------------------------
def detect_config(qconfig: dict[str, Any]) -> bool:
    return str(qconfig.get("quant_method", "")).lower() == "bitsandbytes" and bool(
        qconfig.get("load_in_4bit") or qconfig.get("_load_in_4bit"))


def source_format(qconfig: dict[str, Any]) -> str:
    return "bnb-" + str(qconfig.get("bnb_4bit_quant_type") or "nf4").lower()


def scan(raw: Any, qconfig: dict[str, Any], config: dict[str, Any]) -> list[Any]:
    """Every ``<w>.quant_state.bitsandbytes__nf4`` (or ``__fp4``) with ``<w>``, ``<w>.absmax``, ``<w>.quant_map``."""
    from adaptkit.formats.quantized import StoredWeight, require

    have = set(raw.names())
    out = []
    for n in raw.names():
        suffix = next((s for s in QS_SUFFIXES if n.endswith("." + s)), None)
        if suffix is None:
            continue
        w = n[: -len(suffix) - 1]
        require(raw, have, n, (w, f"{w}.absmax", f"{w}.quant_map"))
        state = json.loads(bytes(raw.get(n).tolist()).decode("utf-8"))
        shape = tuple(int(x) for x in state["shape"])
        hidden = (n, *[f"{w}.{s}" for s in _AUX if f"{w}.{s}" in have])
        out.append(StoredWeight(name=w, shape=shape, dtype=_DTYPE_CODES.get(str(state.get("dtype")), "F16"),
                                anchor=w, hidden=hidden, state=state))
    return out


def read(raw: Any, stored: Any, qconfig: dict[str, Any]) -> "torch.Tensor":
    st = stored.state
    w = stored.name
    nested = "nested_blocksize" in st
    return dequantize_nf4(
        raw.get(w), raw.get(f"{w}.absmax"), raw.get(f"{w}.quant_map"), tuple(stored.shape),
        blocksize=int(st["blocksize"]),
        nested_absmax=raw.get(f"{w}.nested_absmax") if nested else None,
        nested_quant_map=raw.get(f"{w}.nested_quant_map") if nested else None,
        offset=float(st["nested_offset"]) if nested else None,
        nested_blocksize=int(st.get("nested_blocksize", 256)),
    )
