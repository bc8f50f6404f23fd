"""One output tensor of a merge plan (:class:`TensorTask`): which input tensors make it and how.

Kinds: ``"merge"`` (call the merge method), ``"copy"`` (a single input taken as is: the method declares
``identity_params`` and the tensor's parameters equal them), ``"identical"`` (non-float tensors, which must
be equal in every input). Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclass
class TensorTask:
    """One output tensor: which input tensors make it and how."""

    out_name: str
    dtype: str  #: output safetensors dtype code
    shape: tuple[int, ...]
    inputs: list[tuple[int, str]]  #: (model index, input tensor name) of the non-base participants
    base: Optional[tuple[int, str]]  #: (model index, name) of the base tensor, if the method uses it
    params: list[dict[str, Any]]
    global_params: dict[str, Any]
    layer_index: Optional[int]
    kind: str = "merge"  #: "merge" (call the method), "copy" (single input, no math), "identical" (non-float)
    in_bytes: int = 0
    compute_float64: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def out_bytes(self) -> int:
        from adaptkit.io.dtypes import ITEMSIZE

        return self.numel * ITEMSIZE[self.dtype]

    @property
    def compute_itemsize(self) -> int:
        return 8 if self.compute_float64 else 4

    def all_inputs(self) -> list[tuple[int, str]]:
        return ([self.base] if self.base else []) + list(self.inputs)
