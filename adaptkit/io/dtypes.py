"""Safetensors dtype codes: their item sizes (no torch needed) and the torch dtypes they map to.

The codes are the ones the safetensors format defines (``"F32"``, ``"BF16"``, ...). ``ITEMSIZE`` is usable
without importing torch; :func:`torch_dtype` and :func:`dtype_code` import torch lazily.
"""
from __future__ import annotations

from typing import Any

#: Item size in bytes of every dtype code adaptkit reads and writes.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# code -> name of the torch dtype attribute (looked up lazily; a torch without it does not support the code)
_TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def shape_numel(shape: tuple[int, ...]) -> int:
    """Number of elements of ``shape`` (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


def known_codes() -> list[str]:
    """The dtype codes accepted in headers, in a stable order (for error messages)."""
    return list(ITEMSIZE)


def torch_dtype(code: str) -> Any:
    """The torch dtype of a safetensors dtype code; ``ValueError`` if torch lacks it or the code is unknown."""
    import torch

    name = _TORCH_NAMES.get(code)
    dt = getattr(torch, name, None) if name else None
    if dt is None:
        raise ValueError(f"dtype {code!r} is not supported by this torch ({torch.__version__})")
    return dt


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a torch dtype; ``ValueError`` for dtypes safetensors cannot hold here."""
    import torch

    for code, name in _TORCH_NAMES.items():
        if getattr(torch, name, None) == dtype:
            return code
    raise ValueError(f"torch dtype {dtype} has no safetensors dtype code supported by adaptkit")
