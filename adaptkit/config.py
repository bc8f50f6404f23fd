"""Strict configuration models (pydantic v2, ``extra="forbid"``).

Merge configs accept mergekit's YAML schema (``merge_method``, ``base_model``, ``models``, ``slices``,
``parameters`` with scalars, gradients and filter lists, ``dtype``, ``out_dtype``, ``tokenizer_source``, the
``tokenizer:`` block, ``chat_template``, a slice's ``residual_weight``) plus one adaptkit extension, ``exclude`` (glob patterns of input tensors deliberately
left out of the output). A typo'd key is a :class:`~adaptkit.errors.ConfigError` naming the nearest valid
key; parameter *values* are validated later against the merge method's declared ``Param`` s (see
:mod:`adaptkit.merge.params`), because the valid names depend on the method.

This module imports no torch. The full schema is documented in ``specs/merge-config.md``.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from adaptkit.errors import ConfigError
from adaptkit.io.yamlfile import check_keys, nearest_hint, read_yaml_mapping, validation_error

Scalar = Union[bool, int, float, str]

DTYPE_ALIASES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float64": "F64",
    "fp64": "F64",
}
"""Config dtype spellings -> safetensors dtype codes."""

SAFETENSORS_TO_TORCH_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _model_reference(v: Any) -> Any:
    """mergekit's model reference forms, as one string: ``PATH``, ``"BASE+ADAPTER"``, or the mapping
    ``{model: PATH | {path: PATH}, lora: PATH | {path: PATH}}`` (-> ``"PATH+LORA"``)."""
    if not isinstance(v, dict):
        return v

    def path_of(x: Any, key: str) -> str:
        if isinstance(x, str) and x.strip():
            return x
        if isinstance(x, dict) and set(x) <= {"path", "revision"} and isinstance(x.get("path"), str):
            if x.get("revision"):
                raise ValueError(f"{key}.revision: adaptkit reads local folders only (no hub revisions)")
            return x["path"]
        raise ValueError(f"{key} must be a path or {{path: PATH}}, got {x!r}")

    unknown = sorted(set(v) - {"model", "lora", "override_architecture"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["model", "lora"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown key {unknown[0]!r} in a model reference{hint} (valid keys: model, lora)")
    if v.get("override_architecture"):
        raise ValueError("override_architecture is not supported")
    if "model" not in v:
        raise ValueError("a model reference mapping needs 'model'")
    ref = path_of(v["model"], "model")
    if v.get("lora") is not None:
        ref += "+" + path_of(v["lora"], "lora")
    return ref


class InputModel(_Strict):
    """``models[i]``: a model and its per-model parameters."""

    model: str
    parameters: Optional[dict[str, Any]] = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_reference(v)))


class InputSlice(_Strict):
    """``slices[i].sources[j]``: a layer range of one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_reference(v)))

    @field_validator("layer_range")
    @classmethod
    def _range_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    """``slices[i]``: output layers built from one layer range of each source."""

    sources: list[InputSlice]
    base_model: Optional[str] = None
    #: accepted as mergekit 0.1.5 accepts it; it has no effect there either (the planner warns)
    residual_weight: Optional[float] = None

    _base_ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: _model_reference(v)))
    parameters: Optional[dict[str, Any]] = None

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[InputSlice]) -> list[InputSlice]:
        if not v:
            raise ValueError("a slice needs at least one source")
        return v


class ModelTokenSource(_Strict):
    """``tokenizer.tokens.<tok>.source: {kind: model_token, model: M, token_id: N | token: S}``."""

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    @field_validator("token_id")
    @classmethod
    def _id_ok(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 0:
            raise ValueError(f"token_id must be >= 0, got {v}")
        return v

    def model_post_init(self, _: Any) -> None:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of token_id or token")


class ZeroTokenSource(_Strict):
    """``tokenizer.tokens.<tok>.source: {kind: zero}``."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """How the embedding rows of one output token are made (``tokenizer.tokens.<tok>``)."""

    source: Union[ModelTokenSource, ZeroTokenSource, str, None] = None
    force: bool = False


class TokenizerBlock(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary and how rows of tokens a model lacks are made."""

    source: str = "union"
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad_ok(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {v}")
        return v


class MergeConfig(_Strict):
    """A merge recipe (mergekit-compatible)."""

    merge_method: str
    base_model: Optional[str] = None

    _base_ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: _model_reference(v)))
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerBlock] = None
    chat_template: Optional[str] = None
    exclude: Optional[list[str]] = None  #: adaptkit extension: glob patterns of input tensors to leave out

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype_ok(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.lower() not in DTYPE_ALIASES:
            close = difflib.get_close_matches(v.lower(), list(DTYPE_ALIASES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown dtype {v!r}{hint} (known: float32, bfloat16, float16, float64)")
        return v

    # -- derived -------------------------------------------------------------------------------
    @property
    def out_dtype_code(self) -> Optional[str]:
        """The safetensors code of the output dtype (``out_dtype``, else ``dtype``), or None (keep)."""
        v = self.out_dtype or self.dtype
        return DTYPE_ALIASES[v.lower()] if v else None


# --------------------------------------------------------------------------------------------------
# unknown-key detection with nearest-key hints (done on the raw YAML, before pydantic, so the message
# names the exact location and the nearest valid key)

_TOP_KEYS = set(MergeConfig.model_fields)
_MODEL_KEYS = set(InputModel.model_fields)
_SLICE_KEYS = set(OutputSlice.model_fields)
_SOURCE_KEYS = set(InputSlice.model_fields)
COND_KEYS = {"filter", "value"}

_UNSUPPORTED = {
    "modules": "multi-module configs ('modules:') are not supported; use 'models:' or 'slices:'",
}


def _check_keys(obj: Any, valid: set[str], where: str, src: str) -> None:
    if isinstance(obj, dict):
        for key in obj:
            if key in _UNSUPPORTED and key not in valid:
                raise ConfigError(f"{src}: {_UNSUPPORTED[key]} (at {where or 'top level'})")
    check_keys(obj, valid, where, src)


def _check_raw(raw: dict[str, Any], src: str) -> None:
    _check_keys(raw, _TOP_KEYS, "", src)
    models = raw.get("models")
    if isinstance(models, list):
        for i, m in enumerate(models):
            if isinstance(m, str):
                continue
            _check_keys(m, _MODEL_KEYS, f"models[{i}]", src)
    slices = raw.get("slices")
    if isinstance(slices, list):
        for i, s in enumerate(slices):
            _check_keys(s, _SLICE_KEYS, f"slices[{i}]", src)
            if isinstance(s, dict) and isinstance(s.get("sources"), list):
                for j, so in enumerate(s["sources"]):
                    _check_keys(so, _SOURCE_KEYS, f"slices[{i}].sources[{j}]", src)


def parse_merge_config(raw: Any, *, source: str = "config") -> MergeConfig:
    """Validate an already-loaded YAML mapping. ``source`` names the file in error messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a merge config must be a YAML mapping, got {type(raw).__name__}")
    # mergekit allows `models: [name, ...]`? it does not; but a bare string is a common slip
    if isinstance(raw.get("models"), list):
        for i, m in enumerate(raw["models"]):
            if isinstance(m, str):
                raise ConfigError(f"{source}: models[{i}] must be a mapping like '- model: {m}'")
    _check_raw(raw, source)
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, source) from None
    if bool(cfg.models) == bool(cfg.slices):
        raise ConfigError(f"{source}: exactly one of 'models' or 'slices' must be given (and non-empty)")
    if cfg.tokenizer_source is not None and not cfg.tokenizer_source.strip():
        raise ConfigError(f"{source}: tokenizer_source must be 'base', 'union' or a model")
    if cfg.tokenizer is not None and cfg.tokenizer_source is not None and cfg.tokenizer_source != cfg.tokenizer.source:
        # mergekit silently lets tokenizer.source win
        raise ConfigError(
            f"{source}: tokenizer_source {cfg.tokenizer_source!r} and tokenizer.source {cfg.tokenizer.source!r} "
            "disagree; give one of them"
        )
    return cfg


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file; every problem is a one-line ConfigError naming the file."""
    return parse_merge_config(read_yaml_mapping(path, "config"), source=Path(path).name)


def dump_merge_config(cfg: MergeConfig) -> str:
    """The config as mergekit-compatible YAML (no defaults, numbers lists in flow style)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    _Dumper.add_representer(list, _list)
    _Dumper.add_representer(tuple, _list)
    data = cfg.model_dump(exclude_none=True, mode="json")
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False).rstrip() + "\n"
