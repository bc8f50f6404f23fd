"""Open GPTQ (v1/v2), AWQ (GEMM) and bitsandbytes 4-bit checkpoints as floating-point checkpoints.

``open_quantized(path)`` returns an object with the ``adaptkit.io.Checkpoint`` interface (``names()``,
``info(name)``, ``get(name)``, ``config``, ``close()``): quantized linears appear as ``<module>.weight``
(dequantized on ``get``), their packing tensors are hidden, every other tensor passes through. ``config`` is
the model config without ``quantization_config``. Registered as the ``quantized`` loader (priority 50).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from adaptkit.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _config_of(path: Path) -> dict | None:
    p = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        with p.open("r", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def quant_method(path: str | Path) -> str | None:
    """``gptq``, ``awq``, ``bitsandbytes`` (4-bit) or None when ``path`` is not such a checkpoint."""
    cfg = _config_of(Path(path))
    qc = (cfg or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    m = str(qc.get("quant_method", "")).lower()
    if m == "gptq":
        return "gptq"
    if m == "awq" and str(qc.get("version", "gemm")).lower() == "gemm":
        return "awq"
    if m == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        return "bitsandbytes"
    return None


def detect(path: Any) -> bool:
    """Cheap: a folder whose config.json records a GPTQ, AWQ-GEMM or bitsandbytes-4bit quantization_config."""
    try:
        p = Path(path)
        return p.exists() and quant_method(p) is not None
    except Exception:  # noqa: BLE001 - detect never raises
        return False


class QuantizedCheckpoint:
    """A quantized checkpoint seen as a floating-point one (see module doc)."""

    def __init__(self, path: str | Path, *, dtype: str | None = None) -> None:
        from adaptkit.io import TensorInfo, open_checkpoint

        self.path = Path(path)
        method = quant_method(self.path)
        if method is None:
            raise CheckpointError(f"{self.path}: config.json has no GPTQ/AWQ/bitsandbytes-4bit quantization_config")
        self.method = method
        self.raw = open_checkpoint(self.path)
        cfg = dict(self.raw.config or {})
        self.qconfig: dict = dict(cfg.pop("quantization_config"))
        self._config = cfg
        raw_names = self.raw.names()
        have = set(raw_names)
        self._names: list[str] = []
        self._infos: dict[str, Any] = {}
        self._modules: dict[str, str] = {}  # output weight name -> module prefix
        self._bnb_states: dict[str, dict] = {}
        hidden: set[str] = set()
        try:
            if method in ("gptq", "awq"):
                out_dtype = dtype or _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), "F16")
                suffixes = ("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales")
                self.bits = int(self.qconfig.get("bits", 4))
                self.group_size = int(self.qconfig.get("group_size", 128))
                for n in raw_names:
                    if n.endswith(".qweight"):
                        m = n[: -len(".qweight")]
                        for s in suffixes[1:3]:
                            if f"{m}.{s}" not in have:
                                raise CheckpointError(f"{self.path}: {m}.qweight has no {m}.{s}")
                        hidden.update(f"{m}.{s}" for s in suffixes)
                        qw = self.raw.info(n)
                        if method == "gptq":
                            shape = (qw.shape[1], qw.shape[0] * 32 // self.bits)
                        else:
                            shape = (qw.shape[1] * 8, qw.shape[0])
                        self._modules[m + ".weight"] = m
                        self._infos[m + ".weight"] = TensorInfo(m + ".weight", out_dtype, shape, qw.file, -1,
                                                                shape[0] * shape[1] * (4 if out_dtype == "F32" else 2))
            else:
                for n in raw_names:
                    suffix = ".quant_state.bitsandbytes__nf4"
                    alt = ".quant_state.bitsandbytes__fp4"
                    if n.endswith(suffix) or n.endswith(alt):
                        w = n[: -len(suffix)] if n.endswith(suffix) else n[: -len(alt)]
                        state = json.loads(bytes(self.raw.get(n).tolist()).decode("utf-8"))
                        hidden.add(n)
                        hidden.update(f"{w}.{s}" for s in _BNB_SUFFIXES if f"{w}.{s}" in have)
                        if w not in have or f"{w}.absmax" not in have or f"{w}.quant_map" not in have:
                            raise CheckpointError(f"{self.path}: {n} without {w}, {w}.absmax or {w}.quant_map")
                        d = dtype or _DTYPES.get(str(state.get("dtype")), "F16")
                        shape = tuple(int(x) for x in state["shape"])
                        numel = 1
                        for x in shape:
                            numel *= x
                        self._modules[w] = w
                        self._infos[w] = TensorInfo(w, d, shape, self.raw.info(w).file, -1,
                                                    numel * (4 if d == "F32" else 2))
                        self._bnb_states[w] = state
            for n in raw_names:
                if n.endswith(".qweight") and n[: -len(".qweight")] + ".weight" in self._modules:
                    self._names.append(n[: -len(".qweight")] + ".weight")
                elif n in self._modules:
                    self._names.append(n)
                elif n not in hidden:
                    self._names.append(n)
                    self._infos[n] = self.raw.info(n)
        except BaseException:
            self.raw.close()
            raise

    # -- Checkpoint interface ----------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return dict(self._config)

    @property
    def files(self) -> list[Path]:
        return self.raw.files

    @property
    def total_bytes(self) -> int:
        return self.raw.total_bytes

    @property
    def dequantized_names(self) -> list[str]:
        return [n for n in self._names if n in self._modules]

    @property
    def dequantized_modules(self) -> list[str]:
        return [n[: -len(".weight")] for n in self.dequantized_names]

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def info(self, name: str) -> Any:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def quantized(self, name: str) -> Any:
        """The ``QuantizedLinear`` behind ``<module>.weight`` (GPTQ/AWQ only)."""
        from adaptkit_quant.formats import awq, gptq

        m = self._modules[name]
        r = self.raw
        if self.method == "gptq":
            g = r.get(f"{m}.g_idx") if f"{m}.g_idx" in r else None
            return gptq.unpack(
                r.get(f"{m}.qweight"), r.get(f"{m}.qzeros"), r.get(f"{m}.scales"), g, self.bits,
                group_size=self.group_size, sym=bool(self.qconfig.get("sym", True)),
                checkpoint_format=str(self.qconfig.get("checkpoint_format", "gptq")),
            )
        return awq.unpack(r.get(f"{m}.qweight"), r.get(f"{m}.qzeros"), r.get(f"{m}.scales"), group_size=self.group_size)

    def get(self, name: str, *, copy: bool = False) -> "torch.Tensor":
        from adaptkit.io import torch_dtype

        if name not in self._modules:
            if name not in self._infos:
                raise CheckpointError(f"{self.path}: no tensor named {name!r}")
            return self.raw.get(name, copy=copy)
        info = self._infos[name]
        if self.method in ("gptq", "awq"):
            w = self.quantized(name).dequantize()
        else:
            from adaptkit_quant.nf4 import dequantize_nf4

            st = self._bnb_states[name]
            r = self.raw
            nested = "nested_blocksize" in st
            w = dequantize_nf4(
                r.get(name), r.get(f"{name}.absmax"), r.get(f"{name}.quant_map"), tuple(info.shape),
                blocksize=int(st["blocksize"]),
                nested_absmax=r.get(f"{name}.nested_absmax") if nested else None,
                nested_quant_map=r.get(f"{name}.nested_quant_map") if nested else None,
                offset=float(st["nested_offset"]) if nested else None,
                nested_blocksize=int(st.get("nested_blocksize", 256)),
            )
        return w.to(torch_dtype(info.dtype))

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "QuantizedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QuantizedCheckpoint({str(self.path)!r}, {self.method}, {len(self._modules)} dequantized linears)"


def open_quantized(path: str | Path, **options: Any) -> QuantizedCheckpoint:
    """Loader impl: ``open_quantized(path, dtype=None)``; ``dtype`` ("F16"/"BF16"/"F32") overrides the output dtype."""
    dtype = options.pop("dtype", None)
    options.pop("allow_pickle", None)
    return QuantizedCheckpoint(path, dtype=dtype)
