"""The model family most merge tests start from: a tiny Llama ``base`` and two perturbed copies ``a`` and ``b``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit.testing.tiny import make_tiny_llama, perturbed_copy


def base_and_two(root: Path, seed: int, **base_kwargs: Any) -> Path:
    """``root/base`` (a tiny Llama, ``seed``), ``root/a`` and ``root/b`` (its perturbed copies); returns ``root``."""
    make_tiny_llama(root / "base", seed=seed, **base_kwargs)
    perturbed_copy(root / "base", root / "a", seed=1, scale=0.1)
    perturbed_copy(root / "base", root / "b", seed=2, scale=0.1)
    return root
