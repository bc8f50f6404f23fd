"""TRANSITION STUB (replaced by the GGUF loader work)."""
from typing import Any


def detect(path: Any) -> bool:
    return False


def open_gguf(path: Any, **options: Any) -> Any:
    raise NotImplementedError
