"""Fixtures for the checkpoint I/O tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.io._helpers import st_bytes


@pytest.fixture
def craft(tmp_path: Path):
    """``craft(name, header, data, length=None) -> Path``: write a hand-made safetensors file."""

    def make(name: str, header: dict | str | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(st_bytes(header, data, length=length))
        return p

    return make
