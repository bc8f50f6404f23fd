"""Built-in checkpoint loader: safetensors (single file, folder, or sharded with an index)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptkit import hookimpl
from adaptkit.registry import Loader


def detect_safetensors(path: Any) -> bool:
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors"
    if p.is_dir():
        return (p / "model.safetensors.index.json").is_file() or any(p.glob("*.safetensors"))
    return False


@hookimpl
def adaptkit_register_loaders(registry: Any) -> None:
    registry.register(
        Loader(
            name="safetensors",
            impl="adaptkit.io:open_checkpoint",
            detect=detect_safetensors,
            priority=0,
            description="safetensors checkpoints: one file, a folder, or shards with model.safetensors.index.json",
        )
    )
