"""Checkpoint formats are core knowledge: readers and writers of quantized layouts live here, algorithms
that produce them live in plugins.

:data:`FORMATS` maps a format name (what a ``Quantizer`` declares in ``formats=``) to the module that
implements it. Importing this package imports no torch; format modules import it inside functions.
"""
from __future__ import annotations

import importlib
from typing import Any

FORMATS: dict[str, str] = {
    "gptq": "adaptkit.formats.gptq",  #: GPTQ v1 (AutoGPTQ / GPTQModel / transformers), 2/3/4/8 bits
    "awq": "adaptkit.formats.awq",  #: AWQ GEMM (AutoAWQ / transformers), 4 bits
    "bnb-nf4": "adaptkit.formats.nf4",  #: bitsandbytes 4-bit NormalFloat (transformers load_in_4bit)
    "bnb-int8": "adaptkit.formats.int8",  #: bitsandbytes LLM.int8 row-wise absmax (transformers load_in_8bit)
}


def format_module(name: str) -> Any:
    """The module implementing format ``name`` (imported on first use)."""
    from adaptkit.errors import ConfigError

    if name not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {name!r} (known: {', '.join(FORMATS)})")
    return importlib.import_module(FORMATS[name])
