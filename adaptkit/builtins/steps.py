"""The default step runner: the innermost implementation of ``adaptkit_run_step``."""
from __future__ import annotations

from typing import Any

from adaptkit import hookimpl


@hookimpl(trylast=True)
def adaptkit_run_step(step: Any) -> Any:
    return step.run()
