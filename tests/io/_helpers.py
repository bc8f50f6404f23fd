"""Byte-level builders for hand-made safetensors files (the hostile-file tests)."""
from __future__ import annotations

import json
import struct


def st_bytes(header: dict | str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """8-byte little-endian header length + header + data, exactly as given (no validation, no padding)."""
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def entry(dtype, shape, begin, end) -> dict:
    """One header entry (types deliberately unchecked, so tests can pass wrong ones)."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
