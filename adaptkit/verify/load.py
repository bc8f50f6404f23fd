"""Load a checkpoint into a transformers causal LM, strictly: a missing, unexpected or mis-shaped tensor is an
error, never a silent re-initialisation (transformers only logs it).

Two routes, chosen by :func:`load_causal_lm`:

* **transformers** -- ``AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)`` for a plain
  safetensors folder, and, with ``deployment=True``, for a GPTQ/AWQ/bitsandbytes checkpoint whose
  transformers quantization backend is installed and usable here (``gptqmodel`` + ``optimum`` for GPTQ,
  ``gptqmodel`` for AWQ, ``bitsandbytes`` for NF4/int8): the way a deployment loads it;
* **adaptkit loader** -- every other input that a registered loader reads (quantized checkpoints dequantized
  on load, GGUF files): the tensors come from ``host.open_model(path)`` and go into the transformers class of
  the config's ``model_type`` through ``from_pretrained(None, config=..., state_dict=...)``.

Remote code is never run (``trust_remote_code=False``); nothing is downloaded (``local_files_only=True``).
:class:`LoadedModel` records which route loaded the model and why. torch/transformers are imported inside the
functions.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from adaptkit.errors import CheckpointError

#: quantization_config.quant_method -> (label, python packages transformers needs for it)
BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gptq": ("gptq", ("gptqmodel", "optimum")),
    "awq": ("awq", ("gptqmodel",)),
    "bitsandbytes": ("bitsandbytes", ("bitsandbytes",)),
}

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A model ready for inference plus how it was loaded."""

    model: Any
    tokenizer: Any
    path: Path
    route: str  #: "transformers" | "transformers+<backend>" | "adaptkit:<loader>"
    loader: str = ""  #: adaptkit loader that read the files (qualified name)
    source_format: str | None = None  #: quantized format dequantized on load (adaptkit route), else None
    note: str = ""  #: why this route (e.g. "gptq backend not installed: gptqmodel")
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"route": self.route, "loader": self.loader, "source_format": self.source_format, "note": self.note,
                "missing_keys": list(self.missing), "unexpected_keys": list(self.unexpected),
                "mismatched_keys": list(self.mismatched)}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load report and progress bars off (we report missing/unexpected keys ourselves)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def torch_dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise CheckpointError(f"dtype {name!r}: expected one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _read_config(path: Path) -> dict[str, Any] | None:
    cfg = _folder(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: config.json is not valid JSON ({e})") from None
    return doc if isinstance(doc, dict) else None


def backend_status(quant_method: str) -> tuple[bool, str]:
    """(installed, label) of the transformers backend for ``quant_method``."""
    label, packages = BACKENDS.get(quant_method, (quant_method, ()))
    if not packages:
        return False, f"{label}: adaptkit knows no transformers backend for it"
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        return False, f"{label} backend not installed ({', '.join(missing)})"
    return True, f"{label} backend: {', '.join(packages)}"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _check_keys(lm: LoadedModel, info: dict[str, Any]) -> LoadedModel:
    lm.missing = sorted(info.get("missing_keys") or ())
    lm.unexpected = sorted(info.get("unexpected_keys") or ())
    lm.mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in (info.get("mismatched_keys") or ()))
    errs = info.get("error_msgs") or []
    if errs:
        lm.mismatched.extend(" ".join(str(e).split())[:200] for e in errs)
    return lm


def _tokenizer(folder: Path, where: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - every tokenizer failure is the input's problem
        raise CheckpointError(f"{where}: transformers cannot load the tokenizer ({_first_line(e)})") from None


def load_tokenizer(path: str | Path, *, host: Any) -> Any:
    """The tokenizer of a checkpoint folder (or of a GGUF file, through its loader's ``write_aux``)."""
    p = Path(path)
    folder = _folder(p)
    if p.is_file() and p.suffix == ".gguf":
        ckpt = host.open_model(p)
        try:
            write_aux = getattr(ckpt, "write_aux", None)
            if not callable(write_aux):
                raise CheckpointError(f"{p}: its loader cannot write the tokenizer files")
            with tempfile.TemporaryDirectory(prefix="adaptkit-tok-") as tmp:
                write_aux(Path(tmp), config=False)
                return _tokenizer(Path(tmp), p)
        finally:
            ckpt.close()
    return _tokenizer(folder, p)


def _via_transformers(p: Path, dtype: str, device: str, route: str, note: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    folder = _folder(p)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype(dtype), output_loading_info=True, local_files_only=True,
                trust_remote_code=False)
    except ImportError:
        raise
    except RuntimeError as e:
        if route != "transformers" and re.search(r"\b(gpu|cuda|xpu)\b", str(e), re.I):
            raise  # the quantization backend cannot run on this machine: the caller falls back
        raise CheckpointError(f"{folder}: transformers cannot load the model ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: transformers cannot load the model ({_first_line(e)})") from None
    lm = LoadedModel(model=model, tokenizer=None, path=p, route=route, loader="transformers", note=note)
    _check_keys(lm, info)
    return lm


def _via_adaptkit(p: Path, host: Any, dtype: str, note: str) -> LoadedModel:
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    ckpt = host.open_model(p)
    try:
        cfg = dict(ckpt.config or {})
        if not cfg:
            raise CheckpointError(f"{p}: no config.json beside the weights (transformers needs the architecture)")
        cfg.pop("quantization_config", None)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise CheckpointError(f"{p}: config.json has no model_type")
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{p}: config.json: transformers does not know model_type {model_type!r} "
                                  f"({_first_line(e)})") from None
        cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if cls is None:
            raise CheckpointError(f"{p}: model_type {model_type!r} has no causal-LM class in transformers")
        want = torch_dtype(dtype)
        state = {}
        for name in ckpt.names():
            t = ckpt.get(name)
            state[name] = t.to(want) if t.is_floating_point() else t.clone()
        route = f"adaptkit:{str(getattr(ckpt, 'loader', 'safetensors')).split(':')[-1]}"
        lm = LoadedModel(model=None, tokenizer=None, path=p, route=route,
                         loader=str(getattr(ckpt, "loader", "")), source_format=getattr(ckpt, "source_format", None),
                         note=note)
    finally:
        ckpt.close()
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=want,
                                              output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{p}: transformers cannot build the model from its tensors ({_first_line(e)})") from None
    lm.model = model
    return _check_keys(lm, info)


def load_causal_lm(path: str | Path, *, host: Any, dtype: str = "float32", device: str = "cpu",
                   deployment: bool = False, strict: bool = True, tokenizer: bool = True) -> LoadedModel:
    """Load ``path`` for inference (``model.eval()`` on ``device``) with its tokenizer.

    ``deployment``: load a quantized checkpoint through transformers' quantization backend when it is
    installed and works here (else adaptkit's dequantizing loader; ``note`` says why). ``strict``: raise
    ``CheckpointError`` naming the first missing/unexpected/mismatched tensor (otherwise they are only
    recorded on the result).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    config = _read_config(p) if p.is_dir() or p.suffix == ".safetensors" else None
    qc = (config or {}).get("quantization_config")
    if p.is_dir() and config is not None and not isinstance(qc, dict):
        ckpt = host.open_model(p)  # the loader registry decides what the folder is (and refuses pickle)
        plain = getattr(ckpt, "source_format", None) is None
        ckpt.close()
        lm = (_via_transformers(p, dtype, device, "transformers", "plain safetensors checkpoint")
              if plain else _via_adaptkit(p, host, dtype, "read by an adaptkit loader"))
    elif p.is_dir() and isinstance(qc, dict):
        method = str(qc.get("quant_method", "")).lower()
        installed, label = backend_status(method)
        lm = None
        if deployment and installed:
            try:
                lm = _via_transformers(p, dtype, device, f"transformers+{BACKENDS[method][0]}", label)
            except (ImportError, RuntimeError) as e:  # backend present but unusable here (e.g. needs a GPU)
                label = f"{BACKENDS[method][0]} backend unusable here ({_first_line(e)})"
        if lm is None:
            why = label if deployment else "evaluation reads the dequantized weights"
            lm = _via_adaptkit(p, host, dtype, f"{why}; dequantized by adaptkit's loader")
    else:
        lm = _via_adaptkit(p, host, dtype, "read by an adaptkit loader")
    if strict:
        for kind, names, rule in (("missing", lm.missing, "transformers would initialise it randomly"),
                                  ("unexpected", lm.unexpected, "transformers would ignore it"),
                                  ("mis-shaped", lm.mismatched, "its shape differs from the architecture's")):
            if names:
                more = f" (+{len(names) - 1} more)" if len(names) > 1 else ""
                raise CheckpointError(f"{p}: {kind} tensor {names[0]!r}{more}: {rule} [rule load-strict]")
    model = lm.model.eval()
    if device != "cpu" and getattr(model, "hf_quantizer", None) is None:
        model = model.to(device)
    lm.model = model
    if tokenizer:
        lm.tokenizer = load_tokenizer(p, host=host)
    return lm
