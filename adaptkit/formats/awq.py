"""AWQ GEMM checkpoint format (AutoAWQ ``version: gemm``), see specs/formats.md.

Per quantized linear ``<m>`` with ``W [out, in]``, 4 bits, ``G = in / group_size``:

* ``<m>.qweight`` int32 ``[in, out/8]``: codes packed along OUTPUT features, nibble ``i`` of word ``c`` holds
  output column ``8c + [0,2,4,6,1,3,5,7][i]``;
* ``<m>.qzeros``  int32 ``[G, out/8]``: zero points (NOT minus one), same packing;
* ``<m>.scales``  fp16  ``[G, out]``.

``W_hat[o, i] = scales[i // group_size, o] * (code[o, i] - zero[i // group_size, o])``; no ``g_idx``.
Implements the format-module API documented in :mod:`adaptkit.formats`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from adaptkit.formats.packing import pack_awq, unpack_awq
from adaptkit.quantize.api import QuantizedLinear, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "awq"
ITEM = QuantizedLinear
DESCRIPTION = "AWQ GEMM (AutoAWQ / transformers / vLLM): 4-bit integer grid with zero points, fp16 scales"
SUFFIXES = ("qweight", "qzeros", "scales")
QUANT_METHOD = "awq"  #: ``quantization_config.quant_method``
VERSION = "gemm"  #: the only AWQ kernel layout adaptkit writes and reads
SUPPORTED_BITS = (4,)


# -- writing -----------------------------------------------------------------------------------------------
def spec_problem(spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    if spec.bits not in SUPPORTED_BITS:
        return f"the AWQ GEMM format stores 4-bit weights only, not {spec.bits}"
    if spec.group_size == -1:
        return "the AWQ GEMM format needs a group size (per-channel -1 is not supported)"
    if spec.partial_groups:
        return "the AWQ GEMM format cannot store a shorter last group (--partial-groups is GPTQ only)"
    return None


def shape_problem(out_features: int, in_features: int, spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    why = spec_problem(spec, options)
    if why:
        return why
    if in_features % spec.group_size:
        return (
            f"in_features {in_features} is not a multiple of group size {spec.group_size} (the AWQ GEMM "
            "format has no partial groups)"
        )
    if out_features % 8:
        return f"out_features {out_features} is not a multiple of 8 (AWQ packs 8 output columns per int32)"
    return None


def tensor_specs(module: str, out_features: int, in_features: int, spec: QuantSpec,
                 options: dict[str, Any] | None = None, weight: Callable[[], Any] | None = None) -> list[tuple[str, str, tuple]]:
    g = spec.n_groups(in_features)
    return [
        (f"{module}.qweight", "I32", (in_features, out_features // 8)),
        (f"{module}.qzeros", "I32", (g, out_features // 8)),
        (f"{module}.scales", "F16", (g, out_features)),
    ]


def pack(q: QuantizedLinear, spec: QuantSpec | None = None, options: dict[str, Any] | None = None, *,
         weight_dtype: str | None = None) -> dict[str, "torch.Tensor"]:
    import torch

    gs = q.spec.effective_group_size(q.in_features)
    expect = torch.arange(q.in_features, dtype=torch.int64) // gs
    if not torch.equal(q.g_idx.to(torch.int64), expect):
        raise ValueError("the AWQ GEMM format has no g_idx: groups must be contiguous (no act-order)")
    return {
        "qweight": pack_awq(q.codes.to(torch.int64).T.contiguous()),  # [in, out/8]
        "qzeros": pack_awq(q.zeros.to(torch.int64)),  # [G, out/8]
        "scales": q.scales.to(torch.float16).contiguous(),
    }


def quantization_config(spec: QuantSpec, *, method: str, options: dict[str, Any] | None = None,
                        weight_dtype: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
        "bits": 4,
        "group_size": spec.group_size,
        "modules_to_not_convert": None,
    }
    if extra:
        cfg.update(extra)
    return cfg


def file_metadata(qconfig: dict[str, Any], producer: str = "") -> dict[str, str]:
    return {"quantized_by": "adaptkit", "quant_method": str(qconfig["quant_method"])}


def extra_files(qconfig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {}


# -- reading -----------------------------------------------------------------------------------------------
def unpack(qweight: "torch.Tensor", qzeros: "torch.Tensor", scales: "torch.Tensor", *, group_size: int) -> QuantizedLinear:
    import torch

    codes = unpack_awq(qweight).T.contiguous()  # [out, in]
    zeros = unpack_awq(qzeros)
    in_features = codes.shape[1]
    g_idx = (torch.arange(in_features, dtype=torch.int32) // group_size).to(torch.int32)
    return QuantizedLinear(
        codes=codes, scales=scales.to(torch.float32), zeros=zeros.to(torch.int32), g_idx=g_idx,
        spec=QuantSpec(bits=4, group_size=group_size, sym=False),
    )


def static_layout(qweight_shape: tuple[int, ...], bits: int, group_size: int, *, has_g_idx: bool = False
                  ) -> tuple[int, int, dict[str, tuple[tuple[str, ...], tuple[int, ...]]]]:
    """What a ``{m}.qweight`` of this shape needs beside it, for checks that read headers only (``adaptkit
    verify``): ``(in_features, out_features, {suffix: (allowed dtype codes, shape)})``."""
    pack = 32 // bits
    in_f, out_f = qweight_shape[0], qweight_shape[1] * pack
    groups = 1 if group_size == -1 else -(-in_f // group_size)
    return in_f, out_f, {"scales": (("F16", "BF16", "F32"), (groups, out_f)), "qzeros": (("I32",), (groups, out_f // pack))}


def detect_config(qconfig: dict[str, Any]) -> bool:
    return (str(qconfig.get("quant_method", "")).lower() == QUANT_METHOD
            and str(qconfig.get("version", VERSION)).lower() == VERSION)


def source_format(qconfig: dict[str, Any]) -> str:
    return NAME


def scan(raw: Any, qconfig: dict[str, Any], config: dict[str, Any]) -> list[Any]:
    from adaptkit.formats.quantized import StoredWeight, config_dtype, require

    dtype = config_dtype(config)
    have = set(raw.names())
    out = []
    for n in raw.names():
        if not n.endswith(".qweight"):
            continue
        m = n[: -len(".qweight")]
        require(raw, have, n, (f"{m}.qzeros", f"{m}.scales"))
        qw = raw.info(n)
        shape = (qw.shape[1] * 8, qw.shape[0])
        out.append(StoredWeight(name=m + ".weight", shape=shape, dtype=dtype, anchor=n,
                                hidden=tuple(f"{m}.{s}" for s in SUFFIXES), state=m))
    return out


def quantized_linear(raw: Any, module: str, qconfig: dict[str, Any]) -> QuantizedLinear:
    return unpack(raw.get(f"{module}.qweight"), raw.get(f"{module}.qzeros"), raw.get(f"{module}.scales"),
                  group_size=int(qconfig.get("group_size", 128)))


def read(raw: Any, stored: Any, qconfig: dict[str, Any]) -> "torch.Tensor":
    return quantized_linear(raw, stored.state, qconfig).dequantize()
