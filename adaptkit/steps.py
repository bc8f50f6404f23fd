"""A unit of work that plugins can wrap through ``adaptkit_run_step``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Step:
    """One pipeline step: ``kind`` (merge, quantize, train, eval, verify), ``name`` (method), ``info`` (what
    the step was asked to do: paths, options) and ``metrics`` (filled by the step and by wrappers)."""

    kind: str
    name: str
    run: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
