"""Computing one output tensor: read the inputs, check them, call the merge method, round once.

For a task of kind ``merge`` the executor

1. reads the participating tensors through their checkpoints (memory-mapped views for safetensors; loaders
   that dequantize return fresh tensors) and upcasts them to the compute dtype (fp32, fp64 when an input is
   fp64) on the compute device, in one copy per tensor;
2. checks them for NaN/Inf (a ``CheckpointError`` naming model and tensor). A method that declares
   ``propagates_nonfinite`` (its result is non-finite wherever an input is) gets one check of its result
   instead, and only a non-finite result checks the inputs;
3. calls the method with :class:`~adaptkit.merge.api.MergeInputs`. A method that declares ``in_place`` gets
   ``inputs.owned = True``: the upcast tensors are this call's own copies and it may overwrite them;
4. rounds the result ONCE to the output dtype.

A method that declares ``row_separable`` sees a large tensor (above :data:`budget.ROW_CHUNK_NUMEL` elements)
in blocks of whole rows, which bounds memory; inputs whose loader computes tensors on read (dequantizing
loaders) are fed whole (slicing them would compute the whole tensor once per block). The reader thread of the engine calls :meth:`load` for
the next task (small groups are upcast ahead; large ones only get a read-ahead hint).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional

from adaptkit.errors import CheckpointError
from adaptkit.merge import budget
from adaptkit.merge.api import MergeInputs
from adaptkit.merge.runtime import trim_heap

if TYPE_CHECKING:  # pragma: no cover
    from adaptkit.merge.plan import MergePlan
    from adaptkit.merge.tasks import TensorTask

Loaded = dict[tuple[int, str], Any]


class Fadvisor:
    """Asks the kernel to read tensor bytes ahead (cheap, no memory of ours)."""

    def __init__(self) -> None:
        self._fds: dict[Any, int] = {}

    def hint(self, info: Any) -> None:
        file, offset = getattr(info, "file", None), getattr(info, "offset", -1)
        nbytes = getattr(info, "stored_nbytes", None) or getattr(info, "nbytes", 0)  # bytes on disk
        if not hasattr(os, "posix_fadvise") or file is None or offset is None or offset < 0 or not nbytes:
            return  # not a stored range (e.g. a tensor dequantized on read)
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                return
            self._fds[file] = fd
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


class TensorExecutor:
    """Computes the tasks of one plan on one device (see the module docstring)."""

    def __init__(self, plan: "MergePlan", device: str) -> None:
        import torch

        from adaptkit.io.dtypes import torch_dtype

        self.torch = torch
        self.plan = plan
        self.method = plan.method
        self.device = torch.device(device)
        self.fn = plan.method.load()
        #: the method may overwrite the engine's upcast copies
        self.owned = bool(plan.method.in_place)
        #: check the result instead of every input; never for in-place methods (their inputs are gone by then)
        self.defer_checks = bool(plan.method.propagates_nonfinite) and not self.owned
        #: inputs whose rows can be read cheaply (stored tensors, not computed on read by their loader)
        self.sliceable = [not m.decoded_on_read for m in plan.models]
        self.stats: Counter = Counter()
        self.fadvise = Fadvisor()
        self._torch_dtype = torch_dtype

    # -- capabilities ------------------------------------------------------------------------------
    def _defer_check(self, task: "TensorTask") -> bool:
        return task.kind == "merge" and self.defer_checks

    def uses_row_blocks(self, task: "TensorTask") -> bool:
        """Whether ``task`` is computed in row blocks (declared ``row_separable`` method, large 2-D+ tensor)."""
        return (task.kind == "merge" and task.numel > budget.ROW_CHUNK_NUMEL and len(task.shape) >= 2
                and task.shape[0] > 1 and all(self.sliceable[mi] for mi, _ in task.all_inputs())
                and self.method.is_row_separable(task.params, task.global_params))

    # -- reading -----------------------------------------------------------------------------------
    def _raw(self, mi: int, name: str) -> Any:
        ckpt = self.plan.models[mi].ckpt
        # a view that computes tensors (a base with adapters merged in) hands over its fp32 result, so the
        # merge rounds once, at the end
        get_fp32 = getattr(ckpt, "get_fp32", None)
        return get_fp32(name) if callable(get_fp32) else ckpt.get(name)

    def _check_finite(self, t: Any, mi: int, name: str) -> None:
        torch = self.torch
        if t.numel() == 0:
            return
        # one vectorised reduction; a non-finite sum means NaN/Inf (or an overflow: check exactly then)
        s = float(t.sum(dtype=torch.float64) if t.dtype == torch.float64 else t.sum())
        if math.isfinite(s):
            return
        bad = ~torch.isfinite(t)
        n = int(bad.sum())
        if n:
            kinds = []
            if bool(torch.isnan(t).any()):
                kinds.append("NaN")
            if bool(torch.isinf(t).any()):
                kinds.append("Inf")
            raise CheckpointError(
                f"model {self.plan.models[mi].ref!r}: tensor {name!r} contains {'/'.join(kinds)} "
                f"({n} of {t.numel()} values)"
            )

    def _upcast(self, task: "TensorTask", mi: int, name: str, rows: Optional[tuple[int, int]] = None) -> Any:
        torch = self.torch
        raw = self._raw(mi, name)
        if rows is not None:
            raw = raw[rows[0]:rows[1]]
        dtype = torch.float64 if task.compute_float64 else torch.float32
        if self.device.type == "cpu":
            out = torch.empty(raw.shape, dtype=dtype)
            out.copy_(raw)
        else:
            out = raw.to(self.device, non_blocking=False).to(dtype)
            if out.data_ptr() == raw.data_ptr():  # pragma: no cover - defensive
                out = out.clone()
        if not self._defer_check(task):
            self._check_finite(out, mi, name)
        return out

    def _hint(self, task: "TensorTask") -> None:
        for mi, name in task.all_inputs():
            self.fadvise.hint(self.plan.models[mi].ckpt.info(name))

    def load(self, task: "TensorTask") -> Optional[Loaded]:
        """Reader-thread work: the upcast inputs of a small group, or just a read-ahead hint."""
        if task.kind != "merge" or not budget.prefetchable(task):
            self._hint(task)
            return None
        return {(mi, name): self._upcast(task, mi, name) for mi, name in task.all_inputs()}

    # -- computing ---------------------------------------------------------------------------------
    def compute(self, task: "TensorTask", loaded: Optional[Loaded]) -> Any:
        torch = self.torch
        out_dtype = self._torch_dtype(task.dtype)
        if task.kind == "identical":
            ref = None
            for mi, name in task.inputs:
                t = self._raw(mi, name)
                if ref is None:
                    ref = (mi, t)
                elif not torch.equal(ref[1], t):
                    raise CheckpointError(
                        f"non-float tensor {name!r} differs between models {self.plan.models[ref[0]].ref!r} and "
                        f"{self.plan.models[mi].ref!r}; it cannot be merged (add it to 'exclude' or make them equal)"
                    )
            assert ref is not None
            return ref[1]
        if task.kind == "copy":
            mi, name = task.all_inputs()[0]
            raw = self._raw(mi, name)
            if raw.is_floating_point():
                self._check_finite(raw, mi, name)
            return raw if raw.dtype == out_dtype else raw.to(out_dtype)
        if loaded is None and self.uses_row_blocks(task):
            return self._compute_rows(task, out_dtype)
        if loaded is None:
            if task.numel * task.compute_itemsize > budget.TRIM_HEAP_BYTES:
                trim_heap()  # blocks kept for reuse by small groups are not needed by this large one
            loaded = {(mi, name): self._upcast(task, mi, name) for mi, name in task.all_inputs()}
        return self._call(task, loaded, out_dtype)

    def _compute_rows(self, task: "TensorTask", out_dtype: Any) -> Any:
        torch = self.torch
        per_row = task.numel // task.shape[0]
        step = max(1, budget.ROW_CHUNK_NUMEL // max(1, per_row))
        out = torch.empty(task.shape, dtype=out_dtype)
        for r0 in range(0, task.shape[0], step):
            r1 = min(task.shape[0], r0 + step)
            loaded = {(mi, name): self._upcast(task, mi, name, rows=(r0, r1)) for mi, name in task.all_inputs()}
            part = self._call(task, loaded, out_dtype, shape=(r1 - r0, *task.shape[1:]))
            out[r0:r1].copy_(part)
            del loaded, part
        return out

    def _call(self, task: "TensorTask", loaded: Loaded, out_dtype: Any, shape: Optional[tuple] = None) -> Any:
        torch = self.torch
        inputs = MergeInputs(
            name=task.out_name,
            tensors=[loaded[k] for k in task.inputs],
            base=loaded[task.base] if task.base is not None else None,
            params=task.params,
            global_params=task.global_params,
            models=[self.plan.models[mi].ref for mi, _ in task.inputs],
            seed=self.plan.seed,
            layer_index=task.layer_index,
            owned=self.owned,
        )
        result = self.fn(inputs)
        if not isinstance(result, torch.Tensor):
            raise CheckpointError(
                f"merge method {self.plan.method_name!r} returned {type(result).__name__} for tensor "
                f"{task.out_name!r}, not a tensor"
            )
        expected = shape if shape is not None else task.shape
        if tuple(result.shape) != tuple(expected):
            raise CheckpointError(
                f"merge method {self.plan.method_name!r} returned shape {list(result.shape)} for tensor "
                f"{task.out_name!r}, expected {list(expected)}"
            )
        if self._defer_check(task) and result.numel():
            total = float(result.sum(dtype=torch.float64) if result.dtype == torch.float64 else result.sum())
            if not math.isfinite(total):
                for (mi, name), t in loaded.items():
                    self._check_finite(t, mi, name)  # raises for a non-finite input; else an overflow
        self.stats.update(inputs.stats)
        # free the upcast inputs (every frame shares this dict) before the rounded copy is allocated
        loaded.clear()
        del inputs, loaded
        out = result.to(out_dtype)  # the one rounding
        del result
        if out.device.type != "cpu":
            out = out.to("cpu")
        return out.contiguous()
