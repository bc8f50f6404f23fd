"""The ``peft-adapter`` loader: a PEFT adapter folder opened as a checkpoint of its own tensors.

``adaptkit inspect ADAPTER`` then validates and summarises it (tensors, parameters, dtypes); the opened
checkpoint's ``adapter_summary()`` gives the PEFT view (type, ranks, alpha, targets, modules_to_save, recorded
QLoRA base). Prompt-learning adapters open too (they are inspectable, only not mergeable); pickle weights
(``adapter_model.bin``) are refused. To use an adapter *with* its base, open an
:class:`adaptkit.adapters.view.AdaptedCheckpoint`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError
from adaptkit.io.checkpoint import Checkpoint


class PeftAdapterCheckpoint(Checkpoint):
    """The tensors of ``adapter_model.safetensors``; ``config`` is None (an adapter has no model config)."""

    kind = "peft-adapter"

    def __init__(self, path: Path, file: Any, adapter_config: dict[str, Any], summary: dict[str, Any]) -> None:
        super().__init__(path, [file], config_path=None)
        self.adapter_config = adapter_config
        self._summary = summary

    def adapter_summary(self) -> dict[str, Any]:
        return dict(self._summary)


def open_peft_adapter(path: str | Path, **options: Any) -> PeftAdapterCheckpoint:
    """Open the adapter folder ``path`` (``options`` such as ``allow_pickle`` are ignored: pickle is refused)."""
    from adaptkit.formats import peft as fmt
    from adaptkit.io import SafetensorsFile

    folder = Path(path)
    cfg = fmt.read_config(folder)
    pt = str(cfg["peft_type"]).upper()
    if pt in fmt.MERGEABLE_TYPES:
        ad = fmt.read_adapter(folder)  # full validation
        return PeftAdapterCheckpoint(folder, ad.file, cfg, {**ad.summary(), "mergeable": True})
    wpath = folder / fmt.WEIGHTS_NAME
    if not wpath.is_file():
        fmt.read_adapter(folder)  # raises the precise error (pickle refused, missing weights)
        raise CheckpointError(f"{folder}: no {fmt.WEIGHTS_NAME}")  # pragma: no cover
    summary = {"path": str(folder), "peft_type": pt, "kind": pt.lower(),
               "base_model_name_or_path": cfg.get("base_model_name_or_path"), "mergeable": False,
               "num_virtual_tokens": cfg.get("num_virtual_tokens")}
    return PeftAdapterCheckpoint(folder, SafetensorsFile(wpath), cfg, summary)
