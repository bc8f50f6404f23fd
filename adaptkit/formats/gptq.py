"""GPTQ v1 checkpoint format (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``), see specs/formats.md.

Per quantized linear ``<m>`` with ``W [out, in]``, ``bits`` in {2,3,4,8}, ``G = n_groups``:

* ``<m>.qweight`` int32 ``[in*bits/32, out]``: codes packed along INPUT features (LSB-first bit stream);
* ``<m>.qzeros``  int32 ``[G, out*bits/32]``: ``zero - 1`` packed along OUTPUT features (v1 convention);
* ``<m>.scales``  fp16  ``[G, out]``;
* ``<m>.g_idx``   int32 ``[in]``: group of each input column;
* ``<m>.bias``    copied as is when the linear has one.

``W_hat[o, i] = scales[g_idx[i], o] * (code[o, i] - zero[g_idx[i], o])``. v2 (GPTQModel's internal format)
stores ``zero`` itself; this module never writes v2 and reads v2 only when ``checkpoint_format`` says so.
Implements the format-module API documented in :mod:`adaptkit.formats`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from adaptkit.formats.packing import pack_bitstream, unpack_bitstream
from adaptkit.quantize.api import SUPPORTED_BITS, QuantizedLinear, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "gptq"
ITEM = QuantizedLinear
DESCRIPTION = "GPTQ v1 (AutoGPTQ / GPTQModel / transformers / vLLM): 2/3/4/8-bit integer grid, fp16 scales, g_idx"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
QUANT_METHOD = "gptq"  #: ``quantization_config.quant_method``
V1 = "gptq"  #: ``checkpoint_format`` of v1 (stored zero - 1); GPTQModel's v2 is ``gptq_v2``


# -- writing -----------------------------------------------------------------------------------------------
def spec_problem(spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    if spec.bits not in SUPPORTED_BITS:
        return f"GPTQ packs {', '.join(map(str, SUPPORTED_BITS))} bits, not {spec.bits}"
    return None


def shape_problem(out_features: int, in_features: int, spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    """Why ``[out, in]`` cannot be stored in GPTQ v1 with ``spec`` (None if it can)."""
    why = spec_problem(spec, options)
    if why:
        return why
    if spec.group_size != -1 and in_features % spec.group_size and not spec.partial_groups:
        return (
            f"in_features {in_features} is not a multiple of group size {spec.group_size} (vLLM's GPTQ kernels "
            "need that; --partial-groups writes a shorter last group, which transformers + GPTQModel's "
            "gptq_torch kernel read)"
        )
    # readers (AutoGPTQ, GPTQModel, vLLM) size qweight as in // 32 * bits and qzeros as out // 32 * bits
    if in_features % 32:
        return f"in_features {in_features} is not a multiple of 32 (GPTQ readers size qweight as in/32*bits words)"
    if out_features % 32:
        return f"out_features {out_features} is not a multiple of 32 (GPTQ readers size qzeros as out/32*bits words)"
    return None


def tensor_specs(module: str, out_features: int, in_features: int, spec: QuantSpec,
                 options: dict[str, Any] | None = None, weight: Callable[[], Any] | None = None) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of the tensors written for one linear (bias excluded)."""
    g = spec.n_groups(in_features)
    return [
        (f"{module}.qweight", "I32", (in_features * spec.bits // 32, out_features)),
        (f"{module}.qzeros", "I32", (g, out_features * spec.bits // 32)),
        (f"{module}.scales", "F16", (g, out_features)),
        (f"{module}.g_idx", "I32", (in_features,)),
    ]


def pack(q: QuantizedLinear, spec: QuantSpec | None = None, options: dict[str, Any] | None = None, *,
         weight_dtype: str | None = None) -> dict[str, "torch.Tensor"]:
    """QuantizedLinear -> {"qweight", "qzeros", "scales", "g_idx"} tensors (v1)."""
    import torch

    bits = q.spec.bits
    qweight = pack_bitstream(q.codes.to(torch.int64), bits).T.contiguous()  # [in*bits/32, out]
    zeros = q.zeros.to(torch.int64) - 1
    if zeros.numel() and int(zeros.min()) < 0:
        raise ValueError(
            f"zero points outside 1..{q.spec.maxq} (GPTQ v1 stores zero-1 and cannot represent a zero point of 0)"
        )
    qzeros = pack_bitstream(zeros, bits)
    return {
        "qweight": qweight,
        "qzeros": qzeros.contiguous(),
        "scales": q.scales.to(torch.float16).contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def quantization_config(spec: QuantSpec, *, method: str, options: dict[str, Any] | None = None,
                        weight_dtype: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``quantization_config`` for config.json (what transformers' GPTQConfig / GPTQModel read)."""
    from adaptkit import __version__

    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": bool(spec.act_order),
        "sym": bool(spec.sym),
        "damp_percent": spec.damp,
        "true_sequential": bool(spec.true_sequential),
        "static_groups": bool(spec.static_groups),
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"adaptkit:{__version__}"], "adaptkit_method": method},
    }
    if extra:
        cfg.update(extra)
    return cfg


def file_metadata(qconfig: dict[str, Any], producer: str = "") -> dict[str, str]:
    return {"quantized_by": "adaptkit", "quant_method": str(qconfig["quant_method"])}


def extra_files(qconfig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """AutoGPTQ / older GPTQModel read ``quantize_config.json`` next to the weights."""
    legacy = {k: v for k, v in qconfig.items() if k not in ("quant_method", "pack_dtype")}
    legacy["quant_method"] = "gptq"
    return {"quantize_config.json": legacy}


# -- reading -----------------------------------------------------------------------------------------------
def unpack(
    qweight: "torch.Tensor",
    qzeros: "torch.Tensor",
    scales: "torch.Tensor",
    g_idx: "torch.Tensor | None",
    bits: int,
    *,
    group_size: int,
    sym: bool = True,
    checkpoint_format: str = "gptq",
) -> QuantizedLinear:
    """Tensors of one GPTQ linear -> QuantizedLinear. ``checkpoint_format`` "gptq" (v1: stored zero-1; a
    stored ``2**bits-1`` reads back as ``2**bits``, as v1 kernels do) or "gptq_v2" (zero stored as is)."""
    import torch

    out_features = qweight.shape[1]
    codes = unpack_bitstream(qweight.T.contiguous(), bits)  # [out, in]
    in_features = codes.shape[1]
    zeros = unpack_bitstream(qzeros, bits, n=out_features)
    if checkpoint_format == V1:
        zeros = zeros + 1
    if g_idx is None:
        gs = in_features if group_size == -1 else group_size
        g_idx = torch.arange(in_features, dtype=torch.int32) // gs
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    return QuantizedLinear(
        codes=codes, scales=scales.to(torch.float32), zeros=zeros.to(torch.int32), g_idx=g_idx.to(torch.int32), spec=spec
    )


def static_layout(qweight_shape: tuple[int, ...], bits: int, group_size: int, *, has_g_idx: bool = False
                  ) -> tuple[int, int, dict[str, tuple[tuple[str, ...], tuple[int, ...]]]]:
    """What a ``{m}.qweight`` of this shape needs beside it, for checks that read headers only (``adaptkit
    verify``): ``(in_features, out_features, {suffix: (allowed dtype codes, shape)})``."""
    in_f, out_f = qweight_shape[0] * 32 // bits, qweight_shape[1]
    groups = 1 if group_size == -1 else -(-in_f // group_size)
    want: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {"scales": (("F16", "BF16", "F32"), (groups, out_f))}
    if 32 % bits == 0:
        want["qzeros"] = (("I32",), (groups, out_f // (32 // bits)))
    if has_g_idx:
        want["g_idx"] = (("I32",), (in_f,))
    return in_f, out_f, want


def detect_config(qconfig: dict[str, Any]) -> bool:
    return str(qconfig.get("quant_method", "")).lower() == QUANT_METHOD


def source_format(qconfig: dict[str, Any]) -> str:
    return NAME


def scan(raw: Any, qconfig: dict[str, Any], config: dict[str, Any]) -> list[Any]:
    """Every ``<m>.qweight`` with its ``qzeros``/``scales`` (``g_idx`` optional) -> ``<m>.weight``."""
    from adaptkit.formats.quantized import StoredWeight, config_dtype, require

    bits = int(qconfig.get("bits", 4))
    dtype = config_dtype(config)
    have = set(raw.names())
    out = []
    for n in raw.names():
        if not n.endswith(".qweight"):
            continue
        m = n[: -len(".qweight")]
        require(raw, have, n, (f"{m}.qzeros", f"{m}.scales"))
        qw = raw.info(n)
        shape = (qw.shape[1], qw.shape[0] * 32 // bits)
        hidden = tuple(f"{m}.{s}" for s in SUFFIXES if f"{m}.{s}" in have)
        out.append(StoredWeight(name=m + ".weight", shape=shape, dtype=dtype, anchor=n, hidden=hidden, state=m))
    return out


def quantized_linear(raw: Any, module: str, qconfig: dict[str, Any]) -> QuantizedLinear:
    g = raw.get(f"{module}.g_idx") if f"{module}.g_idx" in raw else None
    return unpack(
        raw.get(f"{module}.qweight"), raw.get(f"{module}.qzeros"), raw.get(f"{module}.scales"), g,
        int(qconfig.get("bits", 4)), group_size=int(qconfig.get("group_size", 128)),
        sym=bool(qconfig.get("sym", True)), checkpoint_format=str(qconfig.get("checkpoint_format", V1)),
    )


def read(raw: Any, stored: Any, qconfig: dict[str, Any]) -> "torch.Tensor":
    return quantized_linear(raw, stored.state, qconfig).dequantize()
