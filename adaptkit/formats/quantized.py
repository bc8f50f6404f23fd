"""The ``quantized`` loader: open a quantized safetensors checkpoint as a floating-point one.

``open_quantized(path)`` returns an object with the ``adaptkit.io.Checkpoint`` interface (``names()``,
``info(name)``, ``get(name)``, ``config``, ``files``, ``total_bytes``, ``path``, ``close()``): quantized
weights appear as ``<module>.weight`` (dequantized on ``get``), their packing tensors are hidden, every other
tensor passes through; ``config`` is the model config without ``quantization_config``; ``source_format``
names the stored format (``"gptq"``, ``"awq"``, ``"bnb-nf4"``, ``"bnb-fp4"``, ``"bnb-int8"``).

The loader knows no format itself: it asks every module of :data:`adaptkit.formats.FORMATS` whose reading
API is present (``detect_config``, ``source_format``, ``scan``, ``read``; see :mod:`adaptkit.formats`)
whether the ``quantization_config`` of ``config.json`` is its own, so a new format module plugs in without a
change here. Registered by core as the ``quantized`` loader (priority 50, ``dequantizes=True``).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import CheckpointError
from adaptkit.io.checkpoint import TensorIndex

if TYPE_CHECKING:  # pragma: no cover
    import torch

_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_READ_API = ("detect_config", "source_format", "scan", "read")


@dataclass
class StoredWeight:
    """One quantized weight found by a format's ``scan``.

    ``name``: the floating-point tensor it stands for (``"<module>.weight"``); ``shape``: its shape;
    ``dtype``: the safetensors dtype code it is given in (the checkpoint's ``torch_dtype`` or what the layout
    records); ``anchor``: the raw tensor whose position the weight takes in ``names()``; ``hidden``: the raw
    tensors it consumes (not listed); ``state``: anything the format's ``read`` needs.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    anchor: str
    hidden: tuple[str, ...] = ()
    state: Any = field(default=None)


# -- helpers for format modules ------------------------------------------------------------------------------
def config_dtype(config: dict[str, Any] | None) -> str:
    """The safetensors dtype code of the model's ``torch_dtype`` (``dtype``), F16 when it records none."""
    cfg = config or {}
    return _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or ""), "F16")


def require(raw: Any, have: set[str], name: str, needed: tuple[str, ...]) -> None:
    """A ``CheckpointError`` naming the checkpoint, ``name`` and the first companion tensor it lacks."""
    for n in needed:
        if n not in have:
            where = getattr(raw, "path", "") or "checkpoint"
            raise CheckpointError(f"{where}: {name} has no {n} (an incomplete quantized checkpoint)")


# -- detection -------------------------------------------------------------------------------------------------
def reader_modules() -> list[Any]:
    """Format modules that can read (those of ``FORMATS`` present and exposing the reading API)."""
    from adaptkit.formats import FORMATS

    mods = []
    for modname in FORMATS.values():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:  # a format module that is not installed (yet)
            if exc.name == modname:
                continue
            raise
        if all(callable(getattr(mod, a, None)) for a in _READ_API):
            mods.append(mod)
    return mods


def _config_of(path: Path) -> dict | None:
    p = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        with p.open("r", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def format_of(qconfig: Any) -> Any:
    """The format module whose ``detect_config`` accepts ``qconfig`` (a ``quantization_config``), or None."""
    if not isinstance(qconfig, dict):
        return None
    for mod in reader_modules():
        try:
            if mod.detect_config(qconfig):
                return mod
        except Exception:  # noqa: BLE001 - detect_config must not raise; treat as "not mine"
            continue
    return None


def source_format_of(path: str | Path) -> str | None:
    """``"gptq"``, ``"awq"``, ``"bnb-nf4"``, ... for a folder this loader reads, else None."""
    cfg = _config_of(Path(path))
    qc = (cfg or {}).get("quantization_config")
    mod = format_of(qc)
    return None if mod is None else str(mod.source_format(qc))


def detect(path: Any) -> bool:
    """Cheap: a folder whose config.json records a quantization_config a format module can read."""
    try:
        p = Path(path)
        return p.exists() and source_format_of(p) is not None
    except Exception:  # noqa: BLE001 - detect never raises
        return False


# -- the checkpoint ----------------------------------------------------------------------------------------------
class QuantizedCheckpoint(TensorIndex):
    """A quantized checkpoint seen as a floating-point one (see module doc)."""

    def __init__(self, path: str | Path, *, dtype: str | None = None) -> None:
        from adaptkit.io import TensorInfo, open_checkpoint

        self.path = Path(path)
        cfg0 = _config_of(self.path) or {}
        self.format = format_of(cfg0.get("quantization_config"))
        if self.format is None:
            raise CheckpointError(
                f"{self.path}: config.json has no quantization_config adaptkit can read (GPTQ, AWQ GEMM, "
                "bitsandbytes 4-bit or 8-bit)"
            )
        self.raw = open_checkpoint(self.path)
        cfg = dict(self.raw.config or {})
        self.qconfig: dict = dict(cfg.pop("quantization_config"))
        self._config = cfg
        self.source_format: str | None = str(self.format.source_format(self.qconfig))
        self._names: list[str] = []
        self._infos: dict[str, Any] = {}
        self._stored: dict[str, StoredWeight] = {}
        try:
            stored = list(self.format.scan(self.raw, self.qconfig, cfg))
            hidden: set[str] = set()
            by_anchor: dict[str, StoredWeight] = {}
            for s in stored:
                d = dtype or s.dtype
                numel = 1
                for x in s.shape:
                    numel *= int(x)
                self._stored[s.name] = s
                by_anchor[s.anchor] = s
                hidden.update(s.hidden)
                self._infos[s.name] = TensorInfo(s.name, d, tuple(s.shape), self.raw.info(s.anchor).file, -1,
                                                 numel * (4 if d == "F32" else 2))
            for n in self.raw.names():
                if n in by_anchor:
                    self._names.append(by_anchor[n].name)
                elif n not in hidden and n not in self._stored:
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
        return [n for n in self._names if n in self._stored]

    @property
    def dequantized_modules(self) -> list[str]:
        return [n[: -len(".weight")] if n.endswith(".weight") else n for n in self.dequantized_names]

    def _order(self) -> Any:
        return self._names

    def quantized(self, name: str) -> Any:
        """The stored quantized form of ``name`` when the format exposes one (``quantized_linear``)."""
        fn = getattr(self.format, "quantized_linear", None)
        if fn is None:
            raise CheckpointError(f"{self.path}: {self.source_format} weights have no QuantizedLinear form")
        return fn(self.raw, self._stored[name].state, self.qconfig)

    def get(self, name: str, *, copy: bool = False) -> "torch.Tensor":
        from adaptkit.io import torch_dtype

        s = self._stored.get(name)
        if s is None:
            if name not in self._infos:
                raise CheckpointError(f"{self.path}: no tensor named {name!r}")
            return self.raw.get(name, copy=copy)
        return self.format.read(self.raw, s, self.qconfig).to(torch_dtype(self._infos[name].dtype))

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "QuantizedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QuantizedCheckpoint({str(self.path)!r}, {self.source_format}, {len(self._stored)} dequantized weights)"


def open_quantized(path: str | Path, **options: Any) -> QuantizedCheckpoint:
    """Loader impl: ``open_quantized(path, dtype=None)``; ``dtype`` ("F16"/"BF16"/"F32") overrides the output dtype."""
    dtype = options.pop("dtype", None)
    options.pop("allow_pickle", None)
    return QuantizedCheckpoint(path, dtype=dtype)
