"""The PEFT adapter folder format (Hugging Face ``peft``): reading, validating and writing it.

A PEFT adapter folder holds

* ``adapter_config.json`` -- the ``PeftConfig`` as JSON: ``peft_type`` (``LORA``, ``IA3``, ``PREFIX_TUNING``,
  ...), and for LoRA ``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``, ``rank_pattern``,
  ``alpha_pattern``, ``target_modules``, ``modules_to_save``, ``bias``, ``use_dora``, ``lora_bias``; for IA3
  ``target_modules`` and ``feedforward_modules``; ``base_model_name_or_path`` names the base;
* ``adapter_model.safetensors`` -- the adapter's tensors, named ``base_model.model.<module>.<part>`` with the
  adapter name removed (``save_pretrained``):

  ================================================  ===============================================
  ``<m>.lora_A.weight`` ``[r, in]``                 LoRA down projection of a linear ``<m>``
  ``<m>.lora_B.weight`` ``[out, r]``                LoRA up projection (``<m>.lora_B.bias``: ``lora_bias``)
  ``<m>.lora_embedding_A`` ``[r, num_embeddings]``  LoRA of an embedding ``<m>``
  ``<m>.lora_embedding_B`` ``[dim, r]``
  ``<m>.lora_magnitude_vector`` ``[out]``           DoRA magnitude (``use_dora``)
  ``<m>.ia3_l`` ``[out, 1]`` / ``[1, in]``           IA3 scaling vector (``[1, in]`` for feedforward modules)
  ``<m>.<param>``                                   a full trained copy: ``modules_to_save`` modules and,
                                                    with ``bias`` ``all``/``lora_only``, trained biases
  ================================================  ===============================================

* optionally ``adaptkit.json`` (adaptkit's provenance; ``base_quantization`` records a QLoRA base) and a
  ``README.md`` model card.

``adapter_model.bin`` (pickle) is refused: adaptkit reads safetensors only. Prompt-learning adapters
(prompt/prefix/p-tuning, adaption prompt) add virtual tokens or key/values at run time: they have no weight
delta and cannot be merged into weights. Semantics of each field: specs/adapters.md.
Importing this module does not import torch.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.errors import CheckpointError, UnsafeFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PROVENANCE_NAME = "adaptkit.json"
KEY_PREFIX = "base_model.model."

#: PEFT types whose weights adaptkit merges
MERGEABLE_TYPES = ("LORA", "IA3")
#: prompt-learning PEFT types: virtual tokens / key-values, nothing to merge into weights
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "ADAPTION_PROMPT", "MULTITASK_PROMPT_TUNING",
                "CPT", "CARTRIDGE")
#: ``init_lora_weights`` values that change the base weights at initialisation (the adapter then belongs to a
#: residual base unless it was saved with ``path_initial_model_for_weight_conversion``, which resets this to true)
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")
#: LoRA config fields that select a variant whose merge differs from W + s*B*A (refused when set)
UNSUPPORTED_LORA_FIELDS = (
    "layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
    "arrow_config", "use_bdlora", "velora_config", "monteclora_config", "mica", "kasa_config", "use_qalora",
)

_LORA_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMB_RE = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")
_MAG_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?$")
_IA3_RE = re.compile(r"^(?P<mod>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?$")
_MTS_RE = re.compile(r"\.modules_to_save\.[^.]+\.")
_ADAPTERISH = ("lora_", "ia3_", "hada_", "lokr_", "vera_", "oft_", "boft_", "fourierft_", "token_adapter")


def detect(path: Any) -> bool:
    """A folder with ``adapter_config.json`` and adapter weights (safetensors, or a pickle file to refuse)."""
    try:
        p = Path(path)
        return p.is_dir() and (p / CONFIG_NAME).is_file() and (
            (p / WEIGHTS_NAME).is_file() or any((p / n).is_file() for n in PICKLE_NAMES))
    except Exception:  # noqa: BLE001 - detect never raises
        return False


def pattern_key(patterns: Any, module: str) -> str | None:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` (in order) such that the module
    name matches the regular expression ``(.*\\.)?(k)$``; None when none does."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def matches_modules(spec: Any, module: str) -> bool:
    """PEFT's ``target_modules``/``feedforward_modules`` rule: a string is a regular expression the whole
    module name must match; a list matches a name equal to an entry or ending in ``"." + entry``."""
    if spec is None:
        return False
    if isinstance(spec, str):
        try:
            return re.fullmatch(spec, module) is not None
        except re.error:
            return False
    return any(module == t or module.endswith("." + t) for t in spec)


@dataclass
class LoraModule:
    """The LoRA of one module: ``delta = scaling * B @ A`` (``[out, in]``; transposed for an embedding or with
    ``fan_in_fan_out``), optionally DoRA (``magnitude``) and a ``lora_B`` bias."""

    name: str
    kind: str  #: "linear" or "embedding"
    a_key: str
    b_key: str
    r: int
    alpha: float
    scaling: float
    magnitude_key: str | None = None
    bias_key: str | None = None

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass
class IA3Module:
    """The IA3 vector of one module: rows (output features) scaled, or columns for a feedforward module."""

    name: str
    key: str
    feedforward: bool

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass
class PeftAdapter:
    """A parsed and validated PEFT adapter folder (tensors are read lazily through ``get``)."""

    path: Path
    config: dict[str, Any]
    peft_type: str
    file: Any  #: adaptkit.io.SafetensorsFile over adapter_model.safetensors
    modules: dict[str, Any] = field(default_factory=dict)  #: module name -> LoraModule | IA3Module
    replacements: dict[str, str] = field(default_factory=dict)  #: base tensor name -> adapter key
    provenance: dict[str, Any] | None = None  #: adaptkit.json, when present

    # -- properties ----------------------------------------------------------------------------------
    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    @property
    def kind(self) -> str:
        """``lora``, ``rslora``, ``dora`` or ``ia3``."""
        if self.peft_type == "IA3":
            return "ia3"
        if self.use_dora:
            return "dora"
        return "rslora" if self.config.get("use_rslora") else "lora"

    @property
    def ranks(self) -> list[int]:
        return sorted({m.r for m in self.modules.values() if isinstance(m, LoraModule)})

    @property
    def base_name(self) -> str | None:
        v = self.config.get("base_model_name_or_path")
        return v if isinstance(v, str) and v else None

    @property
    def base_sha256(self) -> dict[str, str] | None:
        base = (self.provenance or {}).get("base")
        sha = base.get("sha256") if isinstance(base, dict) else None
        return sha if isinstance(sha, dict) and sha else None

    def get(self, key: str) -> Any:
        """The adapter tensor ``key`` (a read-only view; copy before writing into it)."""
        return self.file.get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.file.infos[key].shape)

    def targets(self) -> list[str]:
        """Base tensor names this adapter changes, in a stable order."""
        out: dict[str, None] = {}
        for m in self.modules.values():
            out[m.weight_name] = None
            if isinstance(m, LoraModule) and m.bias_key:
                out[f"{m.name}.bias"] = None
            if isinstance(m, IA3Module) and not m.feedforward:
                out[f"{m.name}.bias"] = None  # scaled when the base has a bias
        for name in self.replacements:
            out[name] = None
        return list(out)

    def summary(self) -> dict[str, Any]:
        """What ``adaptkit inspect`` and the merge reports say about the adapter."""
        lora = [m for m in self.modules.values() if isinstance(m, LoraModule)]
        doc: dict[str, Any] = {
            "path": str(self.path),
            "peft_type": self.peft_type,
            "kind": self.kind,
            "base_model_name_or_path": self.base_name,
            "modules": len(self.modules),
            "embedding_modules": sum(1 for m in lora if m.kind == "embedding"),
            "ranks": self.ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "use_dora": self.use_dora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": list(self.config.get("modules_to_save") or []),
            "bias": self.config.get("bias", "none"),
            "replaced_tensors": len(self.replacements),
            "base_quantization": (self.provenance or {}).get("base_quantization"),
        }
        return doc

    def close(self) -> None:
        self.file.close()


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    from adaptkit.io.safetensors import _DuplicateKey, load_json_strict

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        doc = load_json_strict(raw)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: {what} has duplicate key {e.args[0]!r}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(doc).__name__}")
    return doc


def read_config(folder: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``folder``, checked: an object with a string ``peft_type``."""
    folder = Path(folder)
    p = folder / CONFIG_NAME
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a PEFT adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not p.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; not a PEFT adapter folder")
    cfg = _read_json_object(p, CONFIG_NAME)
    pt = cfg.get("peft_type")
    if not isinstance(pt, str) or not pt:
        raise CheckpointError(f"{p}: 'peft_type' must be a non-empty string (LORA, IA3, ...), got {pt!r}")
    return cfg


def _number(cfg: dict, key: str, where: Path, *, default: Any = None, positive: bool = False, integer: bool = False) -> Any:
    v = cfg.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if integer:
        ok = ok and float(v).is_integer()
    if ok and positive:
        ok = v > 0
    if not ok:
        kind = "a positive integer" if integer and positive else ("a positive number" if positive else "a number")
        raise CheckpointError(f"{where}: '{key}' must be {kind}, got {v!r}")
    return int(v) if integer else float(v)


def _bool(cfg: dict, key: str, where: Path) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise CheckpointError(f"{where}: '{key}' must be true or false, got {v!r}")
    return v


def _pattern(cfg: dict, key: str, where: Path, *, integer: bool) -> dict[str, Any]:
    v = cfg.get(key) or {}
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: '{key}' must be an object of module pattern -> value, got {type(v).__name__}")
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not float(x).is_integer()) or x <= 0:
            what = "a positive integer" if integer else "a positive number"
            raise CheckpointError(f"{where}: '{key}' entry {k!r} must be {what}, got {x!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise CheckpointError(f"{where}: '{key}' entry {k!r} is not a valid regular expression ({e})") from None
    return v


def _module_list(cfg: dict, key: str, where: Path) -> Any:
    v = cfg.get(key)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise CheckpointError(f"{where}: '{key}' must be a list of module names or a regular expression, got {v!r}")


def check_config(cfg: dict[str, Any], where: Path) -> None:
    """Refuse what cannot be merged into weights, and malformed fields (one-line ``CheckpointError``)."""
    pt = str(cfg["peft_type"]).upper()
    if pt in PROMPT_TYPES:
        raise CheckpointError(
            f"{where}: {pt} adapters add virtual tokens or key/values at run time and change no weight, so they "
            "cannot be merged into a model (load them with PEFT instead)")
    if pt not in MERGEABLE_TYPES:
        raise CheckpointError(
            f"{where}: peft_type {pt!r} is not supported for merging (supported: {', '.join(MERGEABLE_TYPES)})")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{where}: 'bias' must be none, all or lora_only, got {cfg.get('bias')!r}")
    _module_list(cfg, "target_modules", where)
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(x, str) for x in mts)):
        raise CheckpointError(f"{where}: 'modules_to_save' must be a list of module names, got {mts!r}")
    _bool(cfg, "fan_in_fan_out", where)
    if pt == "IA3":
        _module_list(cfg, "feedforward_modules", where)
        return
    _number(cfg, "r", where, positive=True, integer=True)
    _number(cfg, "lora_alpha", where, default=8)
    for key in ("use_rslora", "use_dora", "lora_bias"):
        _bool(cfg, key, where)
    _pattern(cfg, "rank_pattern", where, integer=True)
    _pattern(cfg, "alpha_pattern", where, integer=False)
    for key in UNSUPPORTED_LORA_FIELDS:
        v = cfg.get(key)
        if v not in (None, False, [], {}, ""):
            raise CheckpointError(
                f"{where}: '{key}' is set ({json.dumps(v)[:60]}); that LoRA variant has no plain weight merge in "
                "adaptkit (supported: LoRA, rsLoRA, DoRA, IA3)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and any(init.lower().startswith(k) for k in RESIDUAL_INITS):
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r} changed the base weights when training started, so the adapter "
            "only fits that residual base; save it with PEFT's path_initial_model_for_weight_conversion to get a "
            "plain LoRA")


def _strip(key: str) -> str:
    k = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    return _MTS_RE.sub(".", k)


def read_adapter(path: str | Path) -> PeftAdapter:
    """Open, parse and validate the PEFT adapter folder ``path`` (no torch tensor is read).

    Raises ``CheckpointError`` (one line, naming the file and the rule) for a missing or malformed
    ``adapter_config.json``, a prompt-learning or unsupported adapter type, tensors inconsistent with the
    config (ranks, DoRA vectors, IA3 shapes), and ``UnsafeFormatError`` for pickle weights.
    """
    from adaptkit.io import SafetensorsFile

    folder = Path(path)
    cfg = read_config(folder)
    where = folder / CONFIG_NAME
    check_config(cfg, where)
    wpath = folder / WEIGHTS_NAME
    if not wpath.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).is_file()]
        if pickles:
            raise UnsafeFormatError(
                f"{folder / pickles[0]}: pickle adapter weights are refused (adaptkit reads safetensors only); "
                "re-save the adapter with PEFT's save_pretrained(safe_serialization=True)")
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    provenance = None
    if (folder / PROVENANCE_NAME).is_file():
        try:
            provenance = _read_json_object(folder / PROVENANCE_NAME, PROVENANCE_NAME)
        except CheckpointError:
            provenance = None  # provenance is informative; the adapter itself is valid without it
    file = SafetensorsFile(wpath)
    adapter = PeftAdapter(path=folder, config=cfg, peft_type=str(cfg["peft_type"]).upper(), file=file,
                          provenance=provenance)
    try:
        _parse_tensors(adapter)
    except BaseException:
        file.close()
        raise
    return adapter


def _parse_tensors(ad: PeftAdapter) -> None:
    cfg = ad.config
    wfile = ad.weights_path
    if not ad.file.infos:
        raise CheckpointError(f"{wfile}: holds no tensor")
    lora: dict[str, dict[str, str]] = {}
    ia3: dict[str, str] = {}
    others: dict[str, str] = {}
    adapter_names: set[str] = set()
    for key in ad.file.infos:
        k = _strip(key)
        for rx, slot in ((_LORA_RE, None), (_EMB_RE, "emb"), (_MAG_RE, "mag"), (_IA3_RE, "ia3")):
            m = rx.match(k)
            if not m:
                continue
            if m.group("adapter") and m.group("adapter") not in ("weight",):
                adapter_names.add(m.group("adapter"))
            mod = m.group("mod")
            if slot is None:
                part = f"{m.group('ab')}.{m.group('param')}"
            elif slot == "emb":
                part = f"emb{m.group('ab')}"
            elif slot == "mag":
                part = "mag"
            else:
                ia3[mod] = key
                break
            d = lora.setdefault(mod, {})
            if part in d:
                raise CheckpointError(f"{wfile}: two tensors for {mod} {part} ({d[part]!r} and {key!r})")
            d[part] = key
            break
        else:
            if k.endswith(".lora_magnitude_vector.weight"):  # DoRA as a module (some PEFT versions)
                lora.setdefault(k[: -len(".lora_magnitude_vector.weight")], {})["mag"] = key
                continue
            if any(t in k for t in _ADAPTERISH):
                raise CheckpointError(f"{wfile}: tensor {key!r} is not a LoRA/IA3 tensor adaptkit knows")
            others[k] = key
    if len(adapter_names) > 1:
        raise CheckpointError(f"{wfile}: holds several adapters ({', '.join(sorted(adapter_names))}); save one per folder")
    if ad.peft_type == "LORA" and ia3 or ad.peft_type == "IA3" and lora:
        raise CheckpointError(f"{wfile}: tensors do not match peft_type {ad.peft_type} in {CONFIG_NAME}")

    if ad.peft_type == "LORA":
        _parse_lora(ad, lora)
    else:
        ff = cfg.get("feedforward_modules")
        for mod, key in sorted(ia3.items()):
            shape = ad.shape(key)
            feed = matches_modules(ff, mod)
            if len(shape) != 2 or (feed and shape[0] != 1) or (not feed and shape[1] != 1):
                want = "[1, in_features] (feedforward)" if feed else "[out_features, 1]"
                raise CheckpointError(f"{wfile}: {key} has shape {list(shape)}, but {mod} is "
                                      f"{'' if feed else 'not '}in feedforward_modules, so it must be {want}")
            ad.modules[mod] = IA3Module(name=mod, key=key, feedforward=feed)

    # full trained copies: modules_to_save, and biases with bias = all / lora_only
    mts = cfg.get("modules_to_save") or []
    bias_mode = cfg.get("bias", "none")
    for name, key in sorted(others.items()):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module.endswith(".base_layer") or module == "base_layer":
            # save_embedding_layers: PEFT saved the (possibly resized) base layer, loaded over the base's
            name = name.replace(".base_layer.", ".") if "." in module else name.removeprefix("base_layer.")
            ad.replacements[name] = key
            continue
        saved = any(module == m or module.endswith("." + m) for m in mts)
        if not saved and not (bias_mode != "none" and name.endswith(".bias")):
            raise CheckpointError(
                f"{wfile}: tensor {key!r} is neither LoRA/IA3 nor part of modules_to_save "
                f"({', '.join(mts) or 'none'}) nor a trained bias (bias={bias_mode})")
        ad.replacements[name] = key
    if not ad.modules and not ad.replacements:
        raise CheckpointError(f"{wfile}: no adapter tensor found")


def _parse_lora(ad: PeftAdapter, lora: dict[str, dict[str, str]]) -> None:
    cfg = ad.config
    wfile = ad.weights_path
    r0 = int(cfg["r"])
    alpha0 = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    dora = bool(cfg.get("use_dora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for mod, parts in sorted(lora.items()):
        if "A.weight" in parts or "B.weight" in parts:
            kind, ak, bk = "linear", parts.get("A.weight"), parts.get("B.weight")
            if "embA" in parts or "embB" in parts:
                raise CheckpointError(f"{wfile}: {mod} has both linear and embedding LoRA tensors")
        else:
            kind, ak, bk = "embedding", parts.get("embA"), parts.get("embB")
        if ak is None or bk is None:
            missing = "lora_A" if ak is None else "lora_B"
            if kind == "embedding":
                missing = missing.replace("lora_", "lora_embedding_")
            if ak is None and bk is None:
                raise CheckpointError(f"{wfile}: {mod} has a DoRA magnitude or bias but no LoRA matrices")
            raise CheckpointError(f"{wfile}: {mod} has no {missing} tensor")
        sa, sb = ad.shape(ak), ad.shape(bk)
        if len(sa) != 2 or len(sb) != 2:
            raise CheckpointError(f"{wfile}: {mod}: LoRA of {len(sa)}-D weights (convolutions) is not supported")
        r = sa[0]
        if sb[1] != r:
            raise CheckpointError(f"{wfile}: {mod}: lora_A has rank {r} but lora_B has rank {sb[1]}")
        rk = pattern_key(rank_pattern, mod)
        want_r = int(rank_pattern[rk]) if rk is not None else r0
        if r != want_r:
            rule = f"rank_pattern[{rk!r}]" if rk is not None else "'r'"
            raise CheckpointError(f"{wfile}: {mod} has rank {r} but {CONFIG_NAME} {rule} says {want_r}")
        ak_ = pattern_key(alpha_pattern, mod)
        alpha = float(alpha_pattern[ak_]) if ak_ is not None else alpha0
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        mag = parts.get("mag")
        if dora and mag is None:
            raise CheckpointError(f"{wfile}: use_dora is true but {mod} has no lora_magnitude_vector")
        if mag is not None and not dora:
            raise CheckpointError(f"{wfile}: {mod} has a lora_magnitude_vector but use_dora is false")
        if mag is not None:
            out = sb[0]  # linear: out_features; embedding: embedding_dim
            if ad.shape(mag) != (out,):
                raise CheckpointError(f"{wfile}: {mag} has shape {list(ad.shape(mag))}, expected [{out}]")
        bias = parts.get("B.bias")
        if bias is not None and ad.shape(bias) != (sb[0],):
            raise CheckpointError(f"{wfile}: {bias} has shape {list(ad.shape(bias))}, expected [{sb[0]}]")
        ad.modules[mod] = LoraModule(name=mod, kind=kind, a_key=ak, b_key=bk, r=r, alpha=alpha, scaling=scaling,
                                     magnitude_key=mag, bias_key=bias)


# -- writing ---------------------------------------------------------------------------------------------------


def lora_config(*, r: int, alpha: float, target_modules: list[str], base_model_name_or_path: str | None,
                fan_in_fan_out: bool = False, modules_to_save: list[str] | None = None, bias: str = "none",
                rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """An ``adapter_config.json`` document for a plain LoRA that ``PeftModel.from_pretrained`` loads
    (fields PEFT does not find take its defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(r),
        "lora_alpha": alpha,
        "target_modules": sorted(target_modules),
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": bias,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def lora_keys(module: str, kind: str = "linear") -> tuple[str, str]:
    """Saved key names of the A and B matrices of ``module``."""
    if kind == "embedding":
        return f"{KEY_PREFIX}{module}.lora_embedding_A", f"{KEY_PREFIX}{module}.lora_embedding_B"
    return f"{KEY_PREFIX}{module}.lora_A.weight", f"{KEY_PREFIX}{module}.lora_B.weight"


def saved_key(tensor_name: str) -> str:
    """Saved key name of a full trained copy (modules_to_save / bias) of the base tensor ``tensor_name``."""
    return f"{KEY_PREFIX}{tensor_name}"


def write_adapter(folder: str | Path, config: dict[str, Any], tensors: dict[str, Any]) -> list[Path]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (one file) into ``folder``."""
    from adaptkit.io import ShardedWriter, TensorSpec

    folder = Path(folder)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    total = sum(s.nbytes for s in specs)
    with ShardedWriter(folder, specs, max_shard_size=max(total, 1) + 1, basename="adapter_model") as w:
        for k, t in tensors.items():
            w.write(k, t)
    return [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
