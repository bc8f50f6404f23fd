"""The built-in merge methods in a registry of their own (for tests that call the math directly)."""
from __future__ import annotations

from adaptkit.registry import MergerRegistry


def builtin_registry() -> MergerRegistry:
    from adaptkit.builtins import mergers

    reg = MergerRegistry()
    mergers.adaptkit_register_mergers(reg)
    return reg
