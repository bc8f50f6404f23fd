"""Checkpoint formats are core knowledge: readers and writers of quantized layouts live here, algorithms
that produce them live in plugins.

:data:`FORMATS` maps a format name (what a ``Quantizer`` declares in ``formats=``) to the module that
implements it. Importing this package imports no torch; format modules import it inside functions.

The format-module API
---------------------
Every module in :data:`FORMATS` provides the same names, so the quantize runner
(:mod:`adaptkit.quantize.runner`) and the dequantizing loader (:mod:`adaptkit.formats.quantized`) never test
a format's name. ``spec`` is an :class:`adaptkit.quantize.api.QuantSpec`; ``options`` the quantizer's
validated ``-o`` options (read them with ``options.get(key, default)``: a format owns the options that
shape its layout, e.g. nf4's ``blocksize``, ``double_quant``, ``compute_dtype``).

Identity

* ``NAME: str`` -- the format name (the key in :data:`FORMATS`).
* ``ITEM: type`` -- the result type ``pack`` takes, i.e. what a quantizer writing this format yields per
  target linear (:class:`~adaptkit.quantize.api.QuantizedLinear` or
  :class:`~adaptkit.quantize.api.BlockwiseQuantized`).
* ``DESCRIPTION: str`` -- one line for help texts and model cards.

Writing (called by the runner, in this order)

* ``spec_problem(spec, options) -> str | None`` -- why ``spec`` cannot be written in this format at all
  (bits, group size, partial groups), or None. The runner turns it into a one-line ``ConfigError``.
* ``shape_problem(out_features, in_features, spec, options) -> str | None`` -- why one ``[out, in]``
  weight cannot be stored (divisibility rules of the layout and its readers), or None. Reads no tensor.
* ``tensor_specs(module, out_features, in_features, spec, options, weight) -> list[(name, dtype, shape)]``
  -- every tensor written for target linear ``module`` (full names, safetensors dtype codes; the bias is
  not included: the runner copies it). ``weight`` is a zero-argument callable returning the input's fp32
  weight, for layouts whose tensor sizes depend on the data (the NF4 quant_state JSON records a
  data-dependent offset); every other format ignores it.
* ``pack(item, spec, options) -> dict[suffix, torch.Tensor]`` -- the stored tensors of one result; the
  tensor name is ``f"{module}.{suffix}"`` and must match ``tensor_specs``. Raises ``ValueError`` when the
  item cannot be represented (the runner reports it as the quantizer's error).
* ``quantization_config(spec, *, method, options, weight_dtype) -> dict`` -- ``config.json``'s
  ``quantization_config`` (what transformers / vLLM read). ``weight_dtype`` is the safetensors dtype code of
  the input's target weights (``"BF16"``).
* ``file_metadata(qconfig, producer) -> dict[str, str]`` -- safetensors ``__metadata__`` of the shards;
  ``producer`` is ``"<distribution> <version>"`` of the quantizer.
* ``extra_files(qconfig) -> dict[str, dict]`` -- further JSON files to write (GPTQ: ``quantize_config.json``
  for AutoGPTQ); ``{}`` for most formats.

Reading (called by the ``quantized`` loader, which dequantizes on load)

* ``detect_config(qconfig: dict) -> bool`` -- the ``quantization_config`` of a ``config.json`` describes
  this format (cheap, never raises).
* ``source_format(qconfig) -> str`` -- the name recorded as ``checkpoint.source_format`` (``"gptq"``,
  ``"awq"``, ``"bnb-nf4"``, ``"bnb-fp4"``, ``"bnb-int8"``).
* ``scan(raw, qconfig, config) -> list[StoredWeight]`` -- the quantized weights of an open raw
  checkpoint (``adaptkit.io.Checkpoint``): one :class:`~adaptkit.formats.quantized.StoredWeight` each
  (``name``, ``shape``, ``dtype``, ``anchor``: the raw tensor whose place it takes, ``hidden``: the raw
  tensors it consumes, ``state``: whatever ``read`` needs); a missing companion tensor is a
  ``CheckpointError`` naming the file and tensor.
* ``read(raw, stored, qconfig) -> torch.Tensor`` -- the fp32 dequantized weight of one
  :class:`~adaptkit.formats.quantized.StoredWeight` (the loader casts it to ``stored.dtype``).
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
