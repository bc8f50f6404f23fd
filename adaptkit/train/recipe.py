"""Training recipes: the YAML file ``adaptkit train RECIPE.yml`` reads (strict schema, see ``specs/train.md``).

A recipe names the base model, local datasets, the method (a registered trainer), the adapter, training
settings, the eval split, early stopping and the seed. Every key is checked: a typo is a one-line
:class:`~adaptkit.errors.ConfigError` naming the file and the nearest valid key. Relative paths (base model,
datasets, output) are relative to the recipe file's folder. Values that depend on the trainer (its
``options``) or on a reward (its options) are checked by the runner against their declared ``Param`` s.

Nothing here imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adaptkit.errors import ConfigError
from adaptkit.io.yamlfile import check_keys, read_yaml_mapping, validation_error
from adaptkit.train.api import AdapterSpec, DatasetSpec, TrainRequest, TrainSettings

__all__ = ["Recipe", "load_recipe", "parse_recipe", "recipe_to_request", "apply_overrides", "DEFAULT_QUANTIZATION"]

#: QLoRA base quantization when the recipe gives none (compute_dtype ``auto``: float32 on CPU, bfloat16 on a
#: GPU that supports it); the shape is what ``adaptkit merge-adapter`` reads from ``adaptkit.json``
DEFAULT_QUANTIZATION: dict[str, Any] = {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                        "compute_dtype": "auto"}


#: type names pydantic puts in error locations for the members of this schema's unions
_UNION_TAGS = ("str", "DataFile", "RewardItem", "int", "float", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataFile(_Strict):
    """``data.train`` / ``data.eval`` as a mapping (a bare string is the path)."""

    path: str
    format: Optional[str] = None
    max_rows: Optional[int] = Field(default=None, ge=1)


class DataSection(_Strict):
    train: Union[str, DataFile]
    eval: Optional[Union[str, DataFile]] = None
    format: Optional[str] = None  #: row shape of both files (inferred from the first train row if absent)
    eval_split: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    max_rows: Optional[int] = Field(default=None, ge=1)


class QuantSection(_Strict):
    """QLoRA: how the frozen base is quantized while training (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    blocksize: Literal[64] = 64  #: bitsandbytes' 4-bit layers use 64-value blocks (not configurable there)
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class AdapterSection(_Strict):
    kind: str = "lora"
    r: int = Field(default=16, ge=1)
    alpha: Optional[float] = Field(default=None, gt=0)  #: default 2 * r
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: Union[str, list[str]] = "all-linear"
    quantization: Optional[QuantSection] = None  #: qlora only
    num_virtual_tokens: Optional[int] = Field(default=None, ge=1)  #: prompt_tuning / prefix_tuning
    options: dict[str, Any] = Field(default_factory=dict)  #: more PEFT config fields for this kind


class TrainingSection(_Strict):
    epochs: float = Field(default=1.0, gt=0)
    max_steps: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial", "inverse_sqrt"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_seq_len: int = Field(default=1024, ge=8)
    packing: bool = False
    bf16: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = None
    eval_every: Optional[int] = Field(default=None, ge=1)
    save_every: Optional[int] = Field(default=None, ge=1)
    save_best: bool = True
    early_stopping_patience: Optional[int] = Field(default=None, ge=1)
    report_to: Union[Literal["none", "tensorboard", "wandb"], list[Literal["tensorboard", "wandb"]]] = "none"
    nproc: int = Field(default=1, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    eval_batch_size: Optional[int] = Field(default=None, ge=1)
    compact_lm_head: bool = True


class RewardItem(_Strict):
    name: str
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    base: str
    method: str
    data: DataSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    seed: int = 0
    device: str = "auto"
    rewards: list[Union[str, RewardItem]] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)  #: the method's own options (see `adaptkit plugins`)
    output: Optional[str] = None  #: default output folder (``--output`` wins)

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        head, _, idx = v.partition(":")
        if head not in ("auto", "cpu", "cuda") or (idx and (head != "cuda" or not idx.isdigit())):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


# -- strict keys with hints -------------------------------------------------------------------------------

def _keys(raw: Any, model: type[BaseModel], where: str, src: str) -> None:
    check_keys(raw, model.model_fields, where, src)


def _check_raw(raw: dict[str, Any], src: str) -> None:
    _keys(raw, Recipe, "", src)
    data = raw.get("data")
    _keys(data, DataSection, "data", src)
    if isinstance(data, dict):
        for part in ("train", "eval"):
            _keys(data.get(part), DataFile, f"data.{part}", src)
    adapter = raw.get("adapter")
    _keys(adapter, AdapterSection, "adapter", src)
    if isinstance(adapter, dict):
        _keys(adapter.get("quantization"), QuantSection, "adapter.quantization", src)
    _keys(raw.get("training"), TrainingSection, "training", src)
    rewards = raw.get("rewards")
    if isinstance(rewards, list):
        for i, r in enumerate(rewards):
            _keys(r, RewardItem, f"rewards[{i}]", src)


def parse_recipe(raw: Any, *, source: str = "recipe") -> Recipe:
    """Validate an already-loaded YAML mapping (``source`` names the file in errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    _check_raw(raw, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, source, union_tags=_UNION_TAGS) from None


def _expand_env(value: Any, src: str) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in string values -> the environment variable."""
    import os
    import re

    if isinstance(value, dict):
        return {k: _expand_env(v, src) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, src) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: "re.Match[str]") -> str:
        name, default = m.group(1), m.group(3)
        if name in os.environ and (os.environ[name] or default is None):
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{src}: environment variable {name!r} is not set (used as ${{{name}}})")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


def apply_overrides(raw: dict[str, Any], pairs: list[str] | tuple[str, ...], src: str = "--set") -> dict[str, Any]:
    """``KEY.SUB=VALUE`` overrides (values parsed as YAML) applied to a copy of the raw recipe mapping."""
    import copy

    import yaml

    out = copy.deepcopy(raw)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{src} {pair!r}: expected KEY=VALUE (e.g. training.max_steps=10)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{src} {pair!r}: {part!r} is not a mapping in the recipe")
            node = nxt
        node[parts[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, dict[str, Any]]:
    """Read and validate a recipe file: ``(recipe, the raw mapping)``; one-line errors naming the file.

    ``overrides`` are ``KEY=VALUE`` pairs (``adaptkit train --set``); ``${NAME}`` in string values is
    replaced by the environment variable (``${NAME:-default}`` when unset)."""
    p = Path(path)
    raw = read_yaml_mapping(p, "recipe")
    raw = _expand_env(apply_overrides(raw, overrides), p.name)
    return parse_recipe(raw, source=p.name), raw


def _resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _dataset(spec: Union[str, DataFile], section: DataSection, root: Path, src: str, what: str) -> DatasetSpec:
    from adaptkit.train.data import infer_format, read_rows

    if isinstance(spec, str):
        spec = DataFile(path=spec)
    path = _resolve(spec.path, root)
    fmt = spec.format or section.format
    if fmt is None:
        if not path.is_file():
            raise ConfigError(f"{src}: {what} {path}: no such file")
        first = read_rows(path, max_rows=1)
        if not first:
            raise ConfigError(f"{src}: {what} {path}: no rows")
        fmt = infer_format(first[0])
        if fmt is None:
            raise ConfigError(f"{src}: {what} {path}: row 1 has fields {', '.join(sorted(first[0])) or 'none'}, "
                              "which fit no dataset format (messages; prompt+completion; prompt+chosen+rejected; "
                              "prompt+completion+label; text; prompt); set data.format")
    return DatasetSpec(path=path, format=fmt, max_rows=spec.max_rows or section.max_rows)


def recipe_to_request(recipe: Recipe, *, root: str | Path = ".", source: str = "recipe",
                      raw: dict[str, Any] | None = None) -> TrainRequest:
    """The :class:`TrainRequest` a recipe describes (``root``: the folder relative paths start from).

    ``output`` of the request is a placeholder: the runner replaces it with the publication folder."""
    root = Path(root)
    d = recipe.data
    train = _dataset(d.train, d, root, source, "train data")
    evals = _dataset(d.eval, d, root, source, "eval data") if d.eval is not None else None
    a = recipe.adapter
    quant: dict[str, Any] | None = None
    if a.kind == "qlora":
        quant = {**DEFAULT_QUANTIZATION, **(a.quantization.model_dump() if a.quantization else {})}
    elif a.quantization is not None:
        raise ConfigError(f"{source}: adapter.quantization is only used with adapter kind 'qlora' (kind is {a.kind!r})")
    options = dict(a.options)
    if a.num_virtual_tokens is not None:
        if a.kind not in ("prompt_tuning", "prefix_tuning"):
            raise ConfigError(f"{source}: adapter.num_virtual_tokens is only used with prompt_tuning/prefix_tuning "
                              f"(kind is {a.kind!r})")
        options["num_virtual_tokens"] = a.num_virtual_tokens
    adapter = AdapterSpec(kind=a.kind, r=a.r, alpha=a.alpha if a.alpha is not None else 2.0 * a.r, dropout=a.dropout,
                          target_modules=a.target_modules if isinstance(a.target_modules, str) else tuple(a.target_modules),
                          base_quantization=quant, options=options)
    t = recipe.training
    report = () if t.report_to == "none" else (t.report_to,) if isinstance(t.report_to, str) else tuple(t.report_to)
    if t.early_stopping_patience is not None and t.eval_every is None:
        raise ConfigError(f"{source}: training.early_stopping_patience needs training.eval_every (steps between evaluations)")
    if t.eval_every is not None and d.eval is None and d.eval_split is None:
        raise ConfigError(f"{source}: training.eval_every needs an eval split (data.eval or data.eval_split)")
    settings = TrainSettings(
        epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size, grad_accum=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler, warmup_ratio=t.warmup_ratio,
        max_seq_len=t.max_seq_len, packing=t.packing, bf16=t.bf16, gradient_checkpointing=t.gradient_checkpointing,
        eval_every=t.eval_every, save_every=t.save_every, save_best=t.save_best, early_stopping_patience=t.early_stopping_patience,
        seed=recipe.seed, report_to=report, nproc=t.nproc, logging_steps=t.logging_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, eval_batch_size=t.eval_batch_size,
        compact_lm_head=t.compact_lm_head)
    names: list[str] = []
    weights: list[float] = []
    reward_options: dict[str, dict[str, Any]] = {}
    for r in recipe.rewards:
        item = RewardItem(name=r) if isinstance(r, str) else r
        if item.name in names:
            raise ConfigError(f"{source}: reward {item.name!r} is listed twice")
        names.append(item.name)
        weights.append(item.weight)
        if item.options:
            reward_options[item.name] = dict(item.options)
    return TrainRequest(
        model=_resolve(recipe.base, root), method=recipe.method, train_data=train, output=Path(),
        adapter=adapter, settings=settings, eval_data=evals, rewards=tuple(names), options=dict(recipe.options),
        device=recipe.device, eval_split=d.eval_split, reward_options=reward_options,
        reward_weights=tuple(weights) if names and any(w != 1.0 for w in weights) else None,
        recipe=raw if raw is not None else recipe.model_dump(mode="json"))
