"""The math: a pure function over one group of same-named tensors (adaptkit.merge.api.MergeInputs)."""
import torch


def _median(stacked: torch.Tensor) -> torch.Tensor:
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def merge_median(inputs):
    stacked = torch.stack(inputs.tensors)
    if inputs.base is None:
        return _median(stacked)
    return inputs.base + inputs.global_params["scale"] * _median(stacked - inputs.base)
