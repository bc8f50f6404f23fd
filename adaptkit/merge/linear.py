"""Linear (weighted average, "model soups") and passthrough. Pure tensor functions.

``linear``: ``out = sum_i w_i * x_i`` over ``inputs.tensors`` (``inputs.base`` is not used: mergekit treats the
base model of a linear merge as one more input with its own weight, so the engine passes it in ``tensors``),
divided by ``sum_i w_i`` when ``normalize`` (default true). A zero weight sum with ``normalize`` is an error.

``passthrough``: the single input, multiplied by ``scale`` when ``scale != 1``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs


def linear_combination(tensors, weights, normalize: bool = True, name: str = "") -> "torch.Tensor":
    """``sum_i w_i x_i`` (``/ sum_i w_i`` if ``normalize``) in the tensors' dtype, accumulated in input order."""
    import torch

    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        out.add_(x, alpha=float(w))
    if normalize:
        total = float(sum(float(w) for w in weights))
        if abs(total) < 1e-8:
            raise ConfigError(
                f"tensor {name!r}: linear merge with normalize: the weights sum to {total}; "
                "give weights with a non-zero sum or set normalize: false"
            )
        out.div_(total)
    return out


def linear(inputs: "MergeInputs") -> "torch.Tensor":
    if not inputs.tensors:
        raise ValueError(f"tensor {inputs.name!r}: linear needs at least one model")
    return linear_combination(
        inputs.tensors,
        [p["weight"] for p in inputs.params],
        normalize=bool(inputs.global_params.get("normalize", True)),
        name=inputs.name,
    )


def passthrough(inputs: "MergeInputs") -> "torch.Tensor":
    tensors = list(inputs.tensors)
    if len(tensors) != 1:
        raise ValueError(f"tensor {inputs.name!r}: passthrough takes exactly one model, got {len(tensors)}")
    scale = float(inputs.params[0].get("scale", 1.0))
    x = tensors[0]
    return x if scale == 1.0 else x * scale
