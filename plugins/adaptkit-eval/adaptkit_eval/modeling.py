"""Models for the evaluators: loaded once per process (the two most recent are kept, so a suite that runs
several evaluators on a model and its baseline loads each once).

Loading is :func:`adaptkit.verify.load.load_causal_lm` (strict: a missing or unexpected tensor is an error;
quantized and GGUF checkpoints through adaptkit's loaders, dequantized on load). A model is cached under its
resolved path, the size and mtime of its files, device and dtype, so an edited checkpoint is reloaded.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_KEEP = 2


def _stamp(path: Path) -> tuple:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        out.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load(path: str | Path, *, host: Any, device: str = "cpu", dtype: str = "float32") -> Any:
    """A :class:`adaptkit.verify.load.LoadedModel` (cached; see the module docstring)."""
    from adaptkit.verify.load import load_causal_lm

    p = Path(path).resolve()
    key = (str(p), _stamp(p), device, dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    for k in [k for k in _CACHE if k[0] == str(p)]:  # a stale version of the same path
        del _CACHE[k]
    while len(_CACHE) >= _KEEP:
        _CACHE.popitem(last=False)
    lm = load_causal_lm(p, host=host, device=device, dtype=dtype)
    _CACHE[key] = lm
    return lm


def detail_path(request: Any, stem: str) -> Path:
    """Where an evaluator writes per-sample details for ``request.model``: ``<output>/<stem>.<model tag>.jsonl``.
    The tag (folder name + a hash of the resolved path) keeps the model's and the baseline's files apart when
    the runner evaluates both with the same request."""
    import hashlib

    p = Path(request.model).resolve()
    tag = f"{p.name or 'model'}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
    request.output.mkdir(parents=True, exist_ok=True)
    return request.output / f"{stem}.{tag}.jsonl"


def clear() -> None:
    _CACHE.clear()


def max_length(model: Any, requested: int) -> int:
    """``requested`` capped by the model's context (``max_position_embeddings`` and friends)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return min(requested, v)
    return requested


def prefix_token_id(tokenizer: Any) -> int:
    """The token every document is scored after: BOS when the tokenizer has one, else EOS (lm-eval's rule)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    from adaptkit.errors import CheckpointError

    raise CheckpointError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
