"""bitsandbytes 4-bit (NF4) serialized layout, as transformers saves a ``load_in_4bit`` model.

Per quantized linear weight ``<m>.weight`` (``W [out, in]``, ``n = out*in``, blocksize ``B`` = 64 default):

* ``<m>.weight``                uint8 ``[ceil(n/2), 1]``: NF4 codes of the flattened weight, two per byte, the
  EVEN element in the HIGH nibble;
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
"""
from __future__ import annotations

import json
from typing import Any

QS_SUFFIX = "quant_state.bitsandbytes__nf4"
NESTED_BLOCKSIZE = 256

#: The NF4 data type (QLoRA, Dettmers et al. 2023, appendix E), as fp32 values.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def quant_state_json(*, blocksize: int, dtype: str, shape: tuple[int, ...], offset: float | None) -> bytes:
    d: dict[str, Any] = {"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if offset is not None:
        d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset})
    return json.dumps(d).encode("utf-8")


def tensor_specs(name: str, numel: int, *, blocksize: int, double_quant: bool, qs_len: int) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) for weight ``name`` (ending in ``.weight``)."""
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
    out += [(f"{name}.quant_map", "F32", (16,)), (f"{name}.{QS_SUFFIX}", "U8", (qs_len,))]
    return out


def quantization_config(*, compute_dtype: str, double_quant: bool, storage: str = "uint8") -> dict[str, Any]:
    """What transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` writes."""
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
