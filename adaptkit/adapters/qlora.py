"""The QLoRA policy: which base weights an adapter was trained against, and reproducing them.

A QLoRA adapter is trained on top of a *quantized* base (bitsandbytes NF4/FP4, or LLM.int8): the frozen
weights it saw are ``dequantize(quantize(W))``, not ``W``. Merging it into the original ``W`` gives a model
that differs from the adapter model by the quantization error of every linear. The policy here finds out how
the base was quantized and round-trips the base's linear weights through the same bitsandbytes functions
before the adapter is merged, so the merged model reproduces the adapter-on-quantized-base model.

Where the quantization is read from, first match wins (:func:`resolve_policy`):

1. the command line (``--base-quantization nf4|fp4|int8|none``, ``--blocksize``, ``--double-quant``);
2. ``adaptkit.json`` in the adapter folder, key ``base_quantization`` (what ``adaptkit train`` records):
   ``{"quant_type": "nf4", "blocksize": 64, "double_quant": true, "compute_dtype": "bfloat16"}``;
3. a ``config.json`` in the adapter folder with a bitsandbytes ``quantization_config`` (transformers);
4. the adapter's ``README.md`` as PEFT <= 0.6 wrote it ("The following `bitsandbytes` quantization config was
   used during training: - load_in_4bit: True - bnb_4bit_quant_type: nf4 ...");
5. ``base_model_name_or_path`` of ``adapter_config.json`` when it is a local folder whose ``config.json`` has a
   bitsandbytes ``quantization_config``.

Which tensors are round-tripped: what transformers' bitsandbytes integration quantizes -- the 2-D ``.weight``
of every linear layer except the output embedding (``lm_head``), tied weights and ``skip_modules``
(``llm_int8_skip_modules``); embeddings are not linears and are never quantized (:func:`quantized_by_bnb`).
The weight is first cast to the dtype the base was loaded in (``dtype`` in the policy, default: its stored
dtype), quantized and dequantized with ``bitsandbytes.functional`` on the merge device (CPU and CUDA kernels
of bitsandbytes may round rare ties differently: merge on the device the adapter was trained on when exactness
matters), then upcast to fp32 for the merge. Int8 (LLM.int8) round-trips the row-wise absmax int8 weight;
LLM.int8 also quantizes activations at run time, which no weight merge reproduces.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

QUANT_TYPES = ("nf4", "fp4", "int8")
#: last name component of modules that are embeddings (never quantized by transformers' bnb integration)
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_positions", "tok_embeddings", "shared", "embeddings", "embedding", "embed_in")
#: output embeddings kept in full precision by transformers (``get_keys_to_not_convert``)
OUTPUT_NAMES = ("lm_head", "embed_out", "output", "score", "classifier")


@dataclass(frozen=True)
class BaseQuantization:
    """How the base was quantized while the adapter was trained (``quant_type`` ``none``: not at all)."""

    quant_type: str = "none"
    blocksize: int = 64
    double_quant: bool = False
    dtype: str | None = None  #: dtype the weights were loaded in before quantizing (None: as stored)
    compute_dtype: str | None = None  #: informative (the matmul dtype while training)
    skip_modules: tuple[str, ...] = ()
    source: str = "default"  #: where this came from (cli, adaptkit.json, config.json, README.md, ...)

    @property
    def active(self) -> bool:
        return self.quant_type != "none"

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        if not self.active:
            return {"quant_type": "none", "source": self.source}
        if self.quant_type == "int8":
            d.pop("blocksize")
            d.pop("double_quant")
        return d

    def key(self) -> tuple[Any, ...]:
        """What must agree between adapters merged together (the source does not matter)."""
        if not self.active:
            return ("none",)
        return (self.quant_type, self.blocksize if self.quant_type != "int8" else None,
                self.double_quant if self.quant_type != "int8" else None, self.dtype, tuple(self.skip_modules))


NONE = BaseQuantization()

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _dtype_name(v: Any, where: str) -> str | None:
    if v in (None, "", "auto"):
        return None
    name = str(v).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ConfigError(f"{where}: dtype {v!r} is not one of float32, bfloat16, float16")
    return _DTYPES[name]


def from_dict(doc: Any, *, source: str) -> BaseQuantization:
    """A policy from an ``adaptkit.json``-style dict (``quant_type``, ``blocksize``, ``double_quant``,
    ``compute_dtype``, ``dtype``, ``skip_modules``); ``None`` or ``{"quant_type": "none"}``: no quantization."""
    if doc is None:
        return BaseQuantization(source=source)
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: base_quantization must be an object, got {type(doc).__name__}")
    qt = str(doc.get("quant_type", "nf4")).lower()
    if qt in ("none", "", "null"):
        return BaseQuantization(source=source)
    if qt not in QUANT_TYPES:
        raise ConfigError(f"{source}: base_quantization quant_type {qt!r} is not one of {', '.join(QUANT_TYPES)}, none")
    bs = doc.get("blocksize", 64)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ConfigError(f"{source}: base_quantization blocksize must be a power of two from 32 to 4096, got {bs!r}")
    dq = doc.get("double_quant", doc.get("use_double_quant", False))
    if not isinstance(dq, bool):
        raise ConfigError(f"{source}: base_quantization double_quant must be true or false, got {dq!r}")
    skip = doc.get("skip_modules") or ()
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"{source}: base_quantization skip_modules must be a list of module names")
    return BaseQuantization(quant_type=qt, blocksize=bs, double_quant=dq,
                            dtype=_dtype_name(doc.get("dtype", doc.get("weight_dtype")), source),
                            compute_dtype=_dtype_name(doc.get("compute_dtype"), source),
                            skip_modules=tuple(skip), source=source)


def from_bnb_config(qc: Any, *, source: str) -> BaseQuantization | None:
    """A policy from a transformers ``BitsAndBytesConfig`` dict; None when it is not bitsandbytes."""
    if not isinstance(qc, dict):
        return None
    if str(qc.get("quant_method", "bitsandbytes")).lower() != "bitsandbytes":
        return None
    skip = tuple(qc.get("llm_int8_skip_modules") or ())
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return BaseQuantization(
            quant_type=str(qc.get("bnb_4bit_quant_type", "fp4")).lower(), blocksize=64,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=_dtype_name(qc.get("bnb_4bit_compute_dtype"), source), skip_modules=skip, source=source)
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return BaseQuantization(quant_type="int8", skip_modules=skip, source=source)
    return None


_README_KEY = re.compile(r"^\s*-\s*(load_in_4bit|load_in_8bit|bnb_4bit_quant_type|bnb_4bit_use_double_quant|"
                         r"bnb_4bit_compute_dtype|quant_method)\s*:\s*(\S+)\s*$")


def _from_readme(path: Path) -> BaseQuantization | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if "bitsandbytes" not in text:
        return None
    qc: dict[str, Any] = {}
    for line in text.splitlines():
        m = _README_KEY.match(line)
        if m:
            k, v = m.group(1), m.group(2)
            qc.setdefault(k, {"True": True, "False": False}.get(v, v))
    return from_bnb_config(qc, source=f"{path} (PEFT model card)") if qc else None


def _config_qc(path: Path) -> Any:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("quantization_config") if isinstance(cfg, dict) else None


def from_adapter(adapter: Any) -> BaseQuantization:
    """The policy an adapter folder records or hints at (sources 2-5 of the module doc); NONE otherwise."""
    folder = Path(adapter.path)
    prov = adapter.provenance or {}
    if "base_quantization" in prov:
        return from_dict(prov.get("base_quantization"), source=str(folder / "adaptkit.json"))
    hint = from_bnb_config(_config_qc(folder / "config.json"), source=str(folder / "config.json"))
    if hint:
        return hint
    hint = _from_readme(folder / "README.md")
    if hint:
        return hint
    base = adapter.base_name
    if base:
        p = Path(base)
        if p.is_dir() and (p / "config.json").is_file():
            hint = from_bnb_config(_config_qc(p / "config.json"),
                                   source=f"{p / 'config.json'} (base_model_name_or_path)")
            if hint:
                return hint
    return BaseQuantization(source="no record")


def resolve_policy(adapters: list[Any], cli: BaseQuantization | None) -> BaseQuantization:
    """One policy for the merge: the command line's, else the adapters' (which must agree)."""
    if cli is not None:
        return cli
    found = [(a, from_adapter(a)) for a in adapters]
    keys = {p.key() for _, p in found}
    if len(keys) > 1:
        desc = "; ".join(f"{a.path}: {p.quant_type} ({p.source})" for a, p in found)
        raise ConfigError(f"the adapters were trained on differently quantized bases ({desc}); one merge can "
                          "reproduce only one: merge them separately or pass --base-quantization")
    return found[0][1] if found else NONE


def already_quantized(source_format: str | None, policy: BaseQuantization) -> bool:
    """True when the base checkpoint itself is stored in the policy's bitsandbytes format (its dequantized
    weights already are what the adapter saw: no second round trip)."""
    if not source_format or not policy.active:
        return False
    s = source_format.lower()
    if policy.quant_type == "int8":
        return "int8" in s
    return policy.quant_type in s or ("bitsandbytes" in s or "bnb" in s) and "int8" not in s


def quantized_by_bnb(name: str, shape: tuple[int, ...], policy: BaseQuantization, tied: set[str]) -> bool:
    """Whether transformers' bitsandbytes integration would have quantized the base tensor ``name``."""
    if not policy.active or len(shape) != 2 or not name.endswith(".weight") or name in tied:
        return False
    module = name[: -len(".weight")]
    last = module.rsplit(".", 1)[-1]
    if last in EMBEDDING_NAMES or last in OUTPUT_NAMES:
        return False
    return not any(module == s or module.endswith("." + s) or f".{s}." in f".{module}." for s in policy.skip_modules)


def roundtrip(w: "torch.Tensor", policy: BaseQuantization, *, device: Any = "cpu") -> "torch.Tensor":
    """``dequantize(quantize(w.to(load dtype)))`` with bitsandbytes on ``device``, returned as fp32."""
    import torch

    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ConfigError(f"reproducing a {policy.quant_type} base needs bitsandbytes (pip install bitsandbytes), "
                          "or pass --base-quantization none") from None
    dt = getattr(torch, policy.dtype) if policy.dtype else w.dtype
    x = w.to(device=device, dtype=dt).contiguous()
    if policy.quant_type == "int8":
        # bitsandbytes' Int8Params quantizes the fp16 copy of the weight, row-wise absmax
        cb, scb, _ = bnbf.int8_vectorwise_quant(x.to(torch.float16))
        return bnbf.int8_vectorwise_dequant(cb, scb).to(torch.float32)
    q, state = bnbf.quantize_4bit(x, blocksize=policy.blocksize, compress_statistics=policy.double_quant,
                                  quant_type=policy.quant_type)
    deq = bnbf.dequantize_4bit(q, state, quant_type=policy.quant_type)
    return deq.reshape(w.shape).to(torch.float32)


def default_tied(config: dict[str, Any] | None, names: set[str]) -> set[str]:
    """Tensor names shared by tied embeddings (never quantized)."""
    if config and config.get("tie_word_embeddings", True) and "lm_head.weight" not in names:
        return {n for n in names if n.endswith("embed_tokens.weight")}
    return set()


__all__ = ["BaseQuantization", "NONE", "QUANT_TYPES", "already_quantized", "default_tied", "from_adapter",
           "from_bnb_config", "from_dict", "quantized_by_bnb", "resolve_policy", "roundtrip"]
