"""The output's ``config.json``: the template model's config (the base, else the first model) with the
layer count of a frankenmerge (and per-layer lists such as ``layer_types`` following the slices), the output
dtype, the vocabulary size of the merged embedding and the output's embedding tying. Imports no torch."""
from __future__ import annotations

import json
from typing import Any, Optional

from adaptkit.config import SAFETENSORS_TO_TORCH_NAME
from adaptkit.merge.slices import Slice, is_pre_layer

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PER_LAYER_KEYS = ("layer_types",)


def output_config(template: dict[str, Any] | None, *, out_layers: Optional[int], slices: list[Slice],
                  source_configs: list[dict[str, Any] | None], tasks: list[Any],
                  out_tied: Optional[bool]) -> dict[str, Any] | None:
    """``template``: the template model's config; ``source_configs[i]``: model ``i``'s config (for per-layer
    lists); ``out_layers``: the layer count of a slices-form merge (None: unchanged)."""
    if template is None:
        return None
    cfg = json.loads(json.dumps(template))
    nested = isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg
    target = cfg["text_config"] if nested else cfg
    if out_layers is not None:
        for key in LAYER_COUNT_KEYS:
            if key in target:
                target[key] = out_layers
                break
        else:
            target["num_hidden_layers"] = out_layers
        for key, val in list(target.items()):
            if isinstance(val, list) and out_layers and key in PER_LAYER_KEYS:
                new: list[Any] = []
                for sl in slices:
                    s0 = sl.sources[0]
                    sval = (source_configs[s0.model] or {}).get(key)
                    a, b = s0.layer_range or (0, 0)
                    if not isinstance(sval, list) or len(sval) < b:
                        break
                    new.extend(sval[a:b])
                else:
                    target[key] = new
    codes = {t.dtype for t in tasks if t.kind != "identical"}
    if len(codes) == 1:
        name = SAFETENSORS_TO_TORCH_NAME.get(next(iter(codes)))
        if name:
            for k in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
                cfg[k] = name
    for t in tasks:
        if is_pre_layer(t.out_name) and "embed" in t.out_name and len(t.shape) == 2:
            if "vocab_size" in target:
                target["vocab_size"] = t.shape[0]
            break
    if out_tied is not None and "tie_word_embeddings" in target:
        target["tie_word_embeddings"] = out_tied
    return cfg


def config_json(cfg: dict[str, Any]) -> str:
    """The bytes written as the output's ``config.json`` (sorted keys, two-space indent)."""
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
