"""PEFT adapters: merge them into a base (streaming, exact PEFT semantics, QLoRA-exact), merge several LoRA
adapters into one, and extract a LoRA from a fine-tune. Semantics and references: specs/adapters.md.

Modules:

* :mod:`adaptkit.formats.peft` -- the PEFT folder format (``read_adapter``, ``write_adapter``, key names);
* :mod:`adaptkit.adapters.view` -- :class:`AdaptedCheckpoint`, a base with adapters merged, as a lazy
  checkpoint view; :func:`open_reference` opens ``"BASE+ADAPTER"`` references (for ``adaptkit merge`` configs);
* :mod:`adaptkit.adapters.qlora` -- the QLoRA policy (which quantization the base saw; bitsandbytes round trip);
* :mod:`adaptkit.adapters.math` -- the tensor formulas (LoRA/DoRA/IA3 deltas, truncated and randomized SVD);
* :mod:`adaptkit.adapters.merge` -- ``merge-adapter`` into weights and ``--into-adapter`` (adapter merging);
* :mod:`adaptkit.adapters.extract` -- ``extract-lora``.

Importing this package does not import torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AdaptedCheckpoint", "open_reference", "read_adapter", "split_reference", "tune_blas", "tune_openmp"]


def tune_openmp() -> None:
    """Idle OpenMP workers sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` unless the user set it): the
    SVDs and small matmuls here are many short parallel regions, and on a shared machine spinning workers make
    them 10-50x slower. Effective only before torch is first imported."""
    import os
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def tune_blas() -> None:
    """One OpenBLAS thread per numpy matmul (``OPENBLAS_NUM_THREADS=1`` unless set): merge-adapter's numpy path
    multiplies thin row blocks (``[rows, r] @ [r, in]``) where OpenBLAS's thread start-up and spinning cost
    10-20x the work; the parallelism is a pipeline of threads instead. Effective only before numpy is imported."""
    import os
    import sys

    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def __getattr__(name: str) -> Any:
    if name in ("AdaptedCheckpoint", "open_reference", "split_reference"):
        from adaptkit.adapters import view

        return getattr(view, name)
    if name == "read_adapter":
        from adaptkit.formats.peft import read_adapter

        return read_adapter
    raise AttributeError(name)
