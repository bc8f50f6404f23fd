"""Helpers for the pipeline tests: pipelines written next to tiny models, run in-process through the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


def write_pipeline(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def one_error(result: Any) -> str:
    """The single ``error:`` line of a failed CLI run (and nothing like a traceback)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders/files a run left in ``folder`` (the state file's own temp included)."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def family(tiny_llama):
    """A tiny base and two fine-tune-like variants of it: ``(base, ft1, ft2)``."""
    base, (ft1, ft2) = tiny_llama.family(2, scale=0.02)
    return base, ft1, ft2
