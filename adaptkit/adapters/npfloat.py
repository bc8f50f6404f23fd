"""float32 <-> safetensors float codes (F32, BF16, F16) in numpy, bit-exact with torch's conversions.

bfloat16 has no numpy dtype: it is handled as uint16 bits. Widening is exact (``bits << 16``); narrowing
rounds to nearest, ties to even, like ``torch.Tensor.to(torch.bfloat16)``; NaN stays a (quiet) NaN.
"""
from __future__ import annotations

from typing import Any

CODES = ("F32", "BF16", "F16")


def decode(raw: Any, code: str) -> Any:
    """Little-endian bytes (a numpy uint8 array) of ``code`` -> a fresh float32 array (flat)."""
    import numpy as np

    if code == "F32":
        return raw.view("<f4").astype(np.float32, copy=True)
    if code == "F16":
        return raw.view("<f2").astype(np.float32)
    if code == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    raise ValueError(code)


def encode(x: Any, code: str) -> Any:
    """A float32 array -> little-endian bytes of ``code`` (a flat numpy uint8 array), rounded once."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if code == "F32":
        return x.reshape(-1).view(np.uint8)
    if code == "F16":
        return x.astype("<f2").reshape(-1).view(np.uint8)
    if code == "BF16":
        u = x.reshape(-1).view(np.uint32)
        r = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype("<u2")
        nan = np.isnan(x.reshape(-1))
        if nan.any():
            r[nan] = ((u[nan] >> 16) | 0x40).astype("<u2")
        return r.view(np.uint8)
    raise ValueError(code)
