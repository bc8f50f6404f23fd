"""Built-in checkpoint loaders: safetensors, quantized checkpoints (dequantized on load) and GGUF files.

Checkpoint formats are core knowledge (``adaptkit.formats``), so their readers are built-ins registered
through ``adaptkit_register_loaders`` exactly like a plugin's loaders.
"""
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


LOADERS = (
    Loader(
        name="safetensors",
        impl="adaptkit.io:open_checkpoint",
        detect=detect_safetensors,
        priority=0,
        description="safetensors checkpoints: one file, a folder, or shards with model.safetensors.index.json",
    ),
    Loader(
        name="quantized",
        impl="adaptkit.formats.quantized:open_quantized",
        detect="adaptkit.formats.quantized:detect",
        priority=50,
        dequantizes=True,
        description="GPTQ v1/v2, AWQ GEMM and bitsandbytes NF4/FP4/int8 safetensors checkpoints, dequantized on load",
    ),
    Loader(
        name="peft-adapter",
        impl="adaptkit.adapters.loader:open_peft_adapter",
        detect="adaptkit.formats.peft:detect",
        priority=60,
        description="PEFT adapter folders (adapter_config.json + adapter_model.safetensors): the adapter's own "
                    "tensors, for inspect; merge them with merge-adapter",
    ),
    Loader(
        name="gguf",
        impl="adaptkit.formats.gguf:open_gguf",
        detect="adaptkit.formats.gguf:detect",
        priority=40,
        dequantizes=True,
        description="GGUF files (llama.cpp) of Llama-architecture models; Q-types dequantized on load",
    ),
)


@hookimpl
def adaptkit_register_loaders(registry: Any) -> None:
    for loader in LOADERS:
        registry.register(loader)
