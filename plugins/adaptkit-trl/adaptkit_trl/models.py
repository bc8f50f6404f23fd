"""The base model, its QLoRA quantization and the PEFT config of each adapter kind.

``load_base`` opens the local base (never downloads) on the run's device: float32 on CPU, bfloat16 for a
frozen base on a GPU that supports it when bf16 is on; QLoRA loads it through bitsandbytes' 4-bit layers and
reports what was actually used (quant type, blocksize, double quantization, compute dtype) in the shape
``adaptkit merge-adapter`` reads: ``{"quant_type", "blocksize", "double_quant", "compute_dtype"}``.
"""
from __future__ import annotations

from typing import Any

from adaptkit.errors import ConfigError

PEFT_KINDS = ("lora", "qlora", "dora", "rslora", "adalora", "ia3", "prompt_tuning", "prefix_tuning")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine (use device: cpu or auto)")
    return device


def compute_dtype_name(quant: dict[str, Any], device: str, bf16: bool) -> str:
    name = quant.get("compute_dtype", "auto")
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") and bf16 else "float32"
    return str(name)


def quantization_config(quant: dict[str, Any], device: str, bf16: bool) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if quant.get("blocksize", 64) != 64:
        raise ConfigError(f"adapter.quantization.blocksize {quant['blocksize']}: bitsandbytes' 4-bit layers use 64")
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype_name(quant, device, bf16)))


def observed_quantization(model: Any, quant: dict[str, Any], device: str, bf16: bool) -> dict[str, Any]:
    """What the loaded 4-bit layers actually use (read from their quant state)."""
    qs = None
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            break
    if qs is None:
        raise ConfigError("qlora: the base loaded without any 4-bit layer (nothing was quantized)")
    return {"quant_type": str(getattr(qs, "quant_type", quant.get("quant_type", "nf4"))),
            "blocksize": int(getattr(qs, "blocksize", quant.get("blocksize", 64))),
            "double_quant": bool(getattr(qs, "nested", quant.get("double_quant", True))),
            "compute_dtype": compute_dtype_name(quant, device, bf16)}


def load_base(request: Any, device: str, bf16: bool, *, seq_cls: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """``(model, base quantization or None)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kind = request.adapter.kind
    kwargs: dict[str, Any] = {"local_files_only": True}
    quant = None
    if kind == "qlora":
        quant = dict(request.adapter.base_quantization or {})
        kwargs["quantization_config"] = quantization_config(quant, device, bf16)
        kwargs["dtype"] = getattr(torch, compute_dtype_name(quant, device, bf16))
        if device.startswith("cuda"):
            kwargs["device_map"] = {"": device}
    elif kind != "full" and device.startswith("cuda") and bf16:
        kwargs["dtype"] = torch.bfloat16  # the frozen base; adapters train in float32
    else:
        kwargs["dtype"] = torch.float32
    cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    if seq_cls:
        kwargs["num_labels"] = 1
    try:
        model = cls.from_pretrained(str(request.model), **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base {request.model}: transformers cannot load it for training "
                          f"({' '.join(str(exc).split())[:300]})") from None
    observed = observed_quantization(model, quant, device, bf16) if quant is not None else None
    return model, observed


def peft_config(request: Any, *, task_type: str, total_steps: int) -> Any:
    """The PEFT config of ``request.adapter`` (``None`` for ``full``)."""
    import peft

    a = request.adapter
    kind = a.kind
    if kind == "full":
        return None
    opts = dict(a.options)
    target = a.target_modules if isinstance(a.target_modules, str) else list(a.target_modules)
    common: dict[str, Any] = {"task_type": task_type}
    try:
        if kind in ("lora", "qlora", "dora", "rslora"):
            return peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=target,
                                   use_dora=kind == "dora", use_rslora=kind == "rslora", **common, **opts)
        if kind == "adalora":
            total = max(1, total_steps)
            opts.setdefault("init_r", max(a.r, int(round(a.r * 1.5))))
            opts.setdefault("tinit", int(total * 0.1))
            opts.setdefault("tfinal", int(total * 0.2))
            opts.setdefault("deltaT", max(1, total // 10))
            return peft.AdaLoraConfig(target_r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                      target_modules=target, total_step=total, **common, **opts)
        if kind == "ia3":
            if target == "all-linear":
                target = None  # PEFT's per-architecture default (attention k/v and the MLP down projection)
            return peft.IA3Config(target_modules=target, **common, **opts)
        if kind == "prompt_tuning":
            opts.setdefault("num_virtual_tokens", 8)
            return peft.PromptTuningConfig(**common, **opts)
        if kind == "prefix_tuning":
            opts.setdefault("num_virtual_tokens", 8)
            return peft.PrefixTuningConfig(**common, **opts)
    except TypeError as exc:
        raise ConfigError(f"adapter.options for {kind!r}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"adapter settings for {kind!r}: {' '.join(str(exc).split())}") from None
    raise ConfigError(f"adapter kind {kind!r} is not supported by adaptkit-trl")


def apply_adapter(model: Any, request: Any, *, task_type: str, total_steps: int, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` with the request's adapter (QLoRA: prepared for k-bit training first)."""
    cfg = peft_config(request, task_type=task_type, total_steps=total_steps)
    if cfg is None:
        return model
    import peft

    if request.adapter.kind == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as exc:
        raise ConfigError(f"adapter {request.adapter.kind!r}: {' '.join(str(exc).split())[:300]}") from None
