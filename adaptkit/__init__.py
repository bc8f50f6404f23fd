"""adaptkit: train, merge, quantize and verify language-model checkpoints.

Only light, public names live here; nothing in this module imports torch.
"""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "adaptkit"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@adaptkit.hookimpl``."""

from adaptkit.errors import (  # noqa: E402
    AdaptkitError,
    CheckpointError,
    ConfigError,
    ExitCode,
    OutputError,
    PluginError,
)

__all__ = [
    "__version__",
    "hookimpl",
    "AdaptkitError",
    "CheckpointError",
    "ConfigError",
    "ExitCode",
    "OutputError",
    "PluginError",
]
