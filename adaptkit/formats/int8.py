"""bitsandbytes LLM.int8 pre-quantized layout, as transformers saves a ``load_in_8bit`` model.

Per quantized linear ``<m>`` with ``W [out, in]`` (bitsandbytes ``Linear8bitLt``, row-major "row" format):

* ``<m>.weight``        int8 ``[out, in]``: ``round(W / absmax_row * 127)``, in ``-127 .. 127``;
* ``<m>.SCB``           fp32 ``[out]``: the row absmax ("scale for column-wise B"), so
  ``W_hat[o, i] = weight[o, i] * SCB[o] / 127``;
* ``<m>.weight_format`` uint8 scalar ``[]`` = 0 ("row" in bitsandbytes' ``LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING``;
  kept for backward compatibility: a missing one also reads as "row", any other value is refused);
* ``<m>.bias``          copied as is when the linear has one.

``config.json`` carries ``BitsAndBytesConfig(load_in_8bit=True).to_dict()`` (``quant_method: bitsandbytes``,
``load_in_8bit: true``, ...); transformers then swaps every ``nn.Linear`` except the output head for a
``Linear8bitLt`` and deserializes ``weight`` + ``SCB`` (+ ``weight_format``) into an ``Int8Params``
(``transformers/integrations/bitsandbytes.py``: ``Bnb8bitDeserialize``; ``quantizer_bnb_8bit.py``:
``serialized_names``).

In adaptkit's grid convention (:class:`adaptkit.quantize.api.QuantizedLinear`,
``W_hat = (codes - zeros[g_idx].T) * scales[g_idx].T``) this is 8 bits, one group per row (``group_size``
-1, ``g_idx`` all 0), symmetric zero point 128: ``weight = codes - 128`` and ``SCB = scale * 127``.
Implements the format-module API documented in :mod:`adaptkit.formats`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from adaptkit.quantize.api import QuantizedLinear, QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "bnb-int8"
ITEM = QuantizedLinear
DESCRIPTION = "bitsandbytes LLM.int8 (transformers load_in_8bit): int8 weights, one fp32 absmax scale per output row"
SUFFIXES = ("weight", "SCB", "weight_format")

BITS = 8
ZERO = 128  #: the zero point of the symmetric 8-bit grid: stored int8 value = code - 128
ROW_FORMAT = 0  #: ``weight_format`` of the row-major layout (the only one bitsandbytes still reads)


# -- writing -----------------------------------------------------------------------------------------------
def spec_problem(spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    """Only the bit width is a property of the request: the one-group-per-row, zero-128 grid is checked per
    result by :func:`pack` (a quantizer that does not accept ``group_size`` may get the default one)."""
    if spec.bits != BITS:
        return f"bitsandbytes LLM.int8 stores 8-bit weights only, not {spec.bits}"
    return None


def shape_problem(out_features: int, in_features: int, spec: QuantSpec, options: dict[str, Any] | None = None) -> str | None:
    """Why ``[out, in]`` cannot be stored as LLM.int8 with ``spec`` (None if it can): any non-empty shape."""
    why = spec_problem(spec, options)
    if why:
        return why
    if out_features < 1 or in_features < 1:
        return f"an empty weight [{out_features}, {in_features}] cannot be stored"
    return None


def tensor_specs(module: str, out_features: int, in_features: int, spec: QuantSpec,
                 options: dict[str, Any] | None = None, weight: Callable[[], Any] | None = None) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of the tensors written for one linear (bias excluded)."""
    return [
        (f"{module}.weight", "I8", (out_features, in_features)),
        (f"{module}.SCB", "F32", (out_features,)),
        (f"{module}.weight_format", "U8", ()),
    ]


def pack(q: QuantizedLinear, spec: QuantSpec | None = None, options: dict[str, Any] | None = None, *,
         weight_dtype: str | None = None) -> dict[str, "torch.Tensor"]:
    """QuantizedLinear -> {"weight", "SCB", "weight_format"}. Raises ``ValueError`` unless ``q`` is 8 bits with
    one group per row and zero point 128 (the only grid LLM.int8 can express) and non-negative scales.
    ``weight_dtype`` (the input weight's dtype code) is not recorded by this layout."""
    import torch

    if q.spec.bits != BITS:
        raise ValueError(f"bitsandbytes LLM.int8 stores 8-bit codes, got a {q.spec.bits}-bit result")
    if q.codes.dtype.is_floating_point or q.codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D integer tensor, got {q.codes.dtype} {tuple(q.codes.shape)}")
    out_features, in_features = q.codes.shape
    if tuple(q.scales.shape) != (1, out_features) or tuple(q.zeros.shape) != (1, out_features):
        raise ValueError(
            f"bitsandbytes LLM.int8 has one scale per output row: scales and zeros must be [1, {out_features}] "
            f"(group_size -1), got {tuple(q.scales.shape)} and {tuple(q.zeros.shape)}"
        )
    if tuple(q.g_idx.shape) != (in_features,) or (in_features and bool((q.g_idx != 0).any())):
        raise ValueError("bitsandbytes LLM.int8 has one group per row: g_idx must be all 0")
    if bool((q.zeros != ZERO).any()):
        raise ValueError(f"bitsandbytes LLM.int8 is symmetric: every zero point must be {ZERO}")
    codes = q.codes.to(torch.int16)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2 * ZERO - 1):
        raise ValueError(f"codes outside 0..{2 * ZERO - 1}")
    scales = q.scales[0].to(torch.float64)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError("bitsandbytes LLM.int8 needs finite, non-negative scales")
    return {
        "weight": (codes - ZERO).to(torch.int8).contiguous(),
        # scale * 127 in float64, rounded once: SCB is the row absmax to fp32 precision
        "SCB": (scales * 127).to(torch.float32).contiguous(),
        "weight_format": torch.tensor(ROW_FORMAT, dtype=torch.uint8),
    }


def quantization_config(spec: QuantSpec, *, method: str = "", options: dict[str, Any] | None = None,
                        weight_dtype: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What transformers' ``BitsAndBytesConfig(load_in_8bit=True).to_dict()`` writes when it saves a model it
    quantized at load time (``method`` is not recorded: transformers would log it as an unused kwarg; the
    shards' metadata names the producer). ``extra`` updates it, e.g. ``{"llm_int8_skip_modules": [...]}``."""
    cfg: dict[str, Any] = {
        "_load_in_4bit": False,
        "_load_in_8bit": True,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": False,
        "load_in_8bit": True,
        "quant_method": "bitsandbytes",
    }
    if extra:
        cfg.update(extra)
    return cfg


def file_metadata(qconfig: dict[str, Any], producer: str = "") -> dict[str, str]:
    return {"quantized_by": producer or "adaptkit"}


def extra_files(qconfig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {}


# -- reading -----------------------------------------------------------------------------------------------
def _format_value(weight_format: Any) -> int | None:
    if weight_format is None:
        return None
    if hasattr(weight_format, "item"):
        return int(weight_format.item())
    if isinstance(weight_format, str):  # bitsandbytes' names
        return {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}.get(weight_format, -1)
    return int(weight_format)


def unpack(weight: "torch.Tensor", SCB: "torch.Tensor", weight_format: Any = None) -> QuantizedLinear:  # noqa: N803
    """Tensors of one LLM.int8 linear -> QuantizedLinear (uint8 codes, ``scales = SCB / 127`` in fp32).
    Raises ``ValueError`` for a non-row ``weight_format`` or inconsistent shapes/dtypes."""
    import torch

    fmt = _format_value(weight_format)
    if fmt is not None and fmt != ROW_FORMAT:
        raise ValueError(
            f"bitsandbytes LLM.int8 weight_format {weight_format!r}: only the row-major layout (0) can be read"
        )
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"LLM.int8 weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if tuple(SCB.shape) != (out_features,):
        raise ValueError(f"LLM.int8 SCB must have shape [{out_features}], got {tuple(SCB.shape)}")
    return QuantizedLinear(
        codes=(weight.to(torch.int16) + ZERO).to(torch.uint8),
        scales=(SCB.to(torch.float64) / 127).to(torch.float32)[None, :],
        zeros=torch.full((1, out_features), ZERO, dtype=torch.int32),
        g_idx=torch.zeros(in_features, dtype=torch.int32),
        spec=QuantSpec(bits=BITS, group_size=-1, sym=True),
    )


def dequantize(weight: "torch.Tensor", SCB: "torch.Tensor", weight_format: Any = None) -> "torch.Tensor":  # noqa: N803
    """fp32 ``W_hat [out, in] = weight * SCB / 127``, computed in float64 and rounded once (bitsandbytes'
    ``int8_vectorwise_dequant`` multiplies by fp32 ``1/127`` instead: equal up to fp32 rounding)."""
    import torch

    unpack(weight, SCB, weight_format)  # dtype / shape / layout checks
    return (weight.to(torch.float64) * (SCB.to(torch.float64) / 127)[:, None]).to(torch.float32)


def detect_config(qconfig: dict[str, Any]) -> bool:
    if not isinstance(qconfig, dict):
        return False
    return (str(qconfig.get("quant_method", "")).lower() == "bitsandbytes"
            and bool(qconfig.get("load_in_8bit") or qconfig.get("_load_in_8bit"))
            and not (qconfig.get("load_in_4bit") or qconfig.get("_load_in_4bit")))


def source_format(qconfig: dict[str, Any]) -> str:
    return NAME


def scan(raw: Any, qconfig: dict[str, Any], config: dict[str, Any]) -> list[Any]:
    """Every ``<m>.SCB`` with its int8 ``<m>.weight`` (``<m>.weight_format`` optional) -> ``<m>.weight``; an
    int8 ``.weight`` without ``SCB``, or a non-row ``weight_format``, is a ``CheckpointError``."""
    from adaptkit.errors import CheckpointError
    from adaptkit.formats.quantized import StoredWeight, config_dtype, require

    dtype = config_dtype(config)
    have = set(raw.names())
    where = getattr(raw, "path", "") or "checkpoint"
    out = []
    for n in raw.names():
        if n.endswith(".weight") and raw.info(n).dtype == "I8" and n[: -len(".weight")] + ".SCB" not in have:
            raise CheckpointError(f"{where}: {n} is int8 but has no {n[: -len('.weight')]}.SCB (an incomplete "
                                  "bitsandbytes 8-bit checkpoint)")
        if not n.endswith(".SCB"):
            continue
        m = n[: -len(".SCB")]
        require(raw, have, n, (f"{m}.weight",))
        w = raw.info(f"{m}.weight")
        if w.dtype != "I8" or len(w.shape) != 2 or tuple(raw.info(n).shape) != (w.shape[0],):
            raise CheckpointError(f"{where}: {m}.weight {w.dtype} {list(w.shape)} with SCB "
                                  f"{list(raw.info(n).shape)} is not a bitsandbytes 8-bit linear")
        hidden = [n]
        if f"{m}.weight_format" in have:
            fmt = _format_value(raw.get(f"{m}.weight_format"))
            if fmt != ROW_FORMAT:
                raise CheckpointError(f"{where}: {m}.weight_format is {fmt}; only the row-major layout (0) can be read")
            hidden.append(f"{m}.weight_format")
        out.append(StoredWeight(name=f"{m}.weight", shape=tuple(w.shape), dtype=dtype, anchor=f"{m}.weight",
                                hidden=tuple(hidden), state=m))
    return out


def quantized_linear(raw: Any, module: str, qconfig: dict[str, Any]) -> QuantizedLinear:
    fmt = raw.get(f"{module}.weight_format") if f"{module}.weight_format" in raw else None
    return unpack(raw.get(f"{module}.weight"), raw.get(f"{module}.SCB"), fmt)


def read(raw: Any, stored: Any, qconfig: dict[str, Any]) -> "torch.Tensor":
    m = stored.state
    return dequantize(raw.get(f"{m}.weight"), raw.get(f"{m}.SCB"))  # weight_format was checked by scan
