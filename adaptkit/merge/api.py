"""The contract between the merge engine and a merge method (built-in or third-party).

A merge method is registered as ``adaptkit.registry.MergeMethod(name=..., impl="pkg.mod:func", params=...)``
and called as ``func(inputs: MergeInputs) -> torch.Tensor`` once per output tensor.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A 63-bit seed derived from (seed, tensor name, model index): independent of execution order."""
    h = hashlib.blake2b(f"{seed}\x00{tensor_name}\x00{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class MergeInputs:
    """Everything a merge method sees for one output tensor.

    ``tensors`` holds one tensor per *non-base* model, in config order, already upcast to the compute
    dtype (fp32, or fp64 when inputs are fp64) and on the compute device; ``base`` is the base model's
    tensor or ``None``. ``params[i]`` are the resolved per-model parameters of ``tensors[i]`` (scope
    ``model``/``both``, gradients already interpolated for this tensor's layer); ``global_params`` the
    resolved global ones. Every declared parameter is present (defaults filled in).

    ``owned`` is true when the tensors (and ``base``) are the engine's own upcast copies, read by nobody after
    the call: set only for methods that declare ``in_place`` (:class:`~adaptkit.registry.MergeMethod`), which
    may then overwrite them (compute task vectors in place, write the result into ``base``).
    """

    name: str
    tensors: list["torch.Tensor"]
    base: "torch.Tensor | None"
    params: list[dict[str, Any]]
    global_params: dict[str, Any]
    models: list[str] = field(default_factory=list)
    seed: int = 0
    layer_index: int | None = None
    stats: Counter = field(default_factory=Counter)
    owned: bool = False

    def generator(self, model_index: int, device: Any = "cpu") -> "torch.Generator":
        """A torch.Generator seeded from (seed, tensor name, model index) on ``device``."""
        import torch

        g = torch.Generator(device=device)
        g.manual_seed(tensor_seed(self.seed, self.name, model_index))
        return g

    def count(self, key: str, n: int = 1) -> None:
        """Report an event (e.g. ``"slerp_lerp_fallback"``); the engine sums and reports these."""
        self.stats[key] += n
