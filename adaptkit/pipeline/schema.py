"""The pipeline file: a strict schema, checked whole before anything runs (see ``specs/pipeline.md``).

::

    output: runs/demo                  # where step outputs go (relative to this file); --output wins
    inputs:                            # named inputs: local paths (${ENV} and ${ENV:-default} expanded)
      base: ${ADAPTKIT_BASE}
    steps:
      - name: sft-a                    # unique; other steps refer to this step's output by it
        train: {base: base, recipe: ../train/a.yml}
      - name: merged-a
        merge-adapter: {base: base, adapters: [sft-a]}
      - name: ties
        merge: {merge_method: ties, base_model: base, models: [{model: merged-a, parameters: {weight: 1}}]}
      - name: q4
        quantize: {model: ties, method: gptq, bits: 4, group_size: 64}
      - name: check
        verify: {model: q4, baseline: base}

A step is a mapping with ``name``, exactly one kind key (its body: the kind's settings) and optional common
keys (``plugin``: the distribution that provides the step's component, used in the "not installed" message;
``device``; ``seed``). Every unknown key is a one-line :class:`~adaptkit.errors.ConfigError` naming the file,
the step and the nearest valid key. Nothing here imports torch.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaptkit.errors import ConfigError
from adaptkit.io.yamlfile import check_keys, nearest_hint, read_yaml_mapping, validation_error
from adaptkit.pipeline.graph import MODEL_KINDS, check_graph

__all__ = ["KINDS", "MODEL_KINDS", "Pipeline", "StepDef", "load_pipeline", "parse_pipeline", "NAME_RE"]

#: step kinds, in the order of the chain they usually form
KINDS = ("train", "merge-adapter", "merge", "quantize", "eval", "verify")
#: step-level keys besides ``name`` and the kind key
COMMON_KEYS = ("plugin", "device", "seed")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNION_TAGS = ("str", "int", "float", "bool", "dict[str,any]", "list[str]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainBody(_Strict):
    """``train``: a recipe (``specs/train.md``; a file relative to the pipeline, or inline) whose ``base`` is
    replaced by the model ``base`` refers to; ``set`` overrides recipe values (``adaptkit train --set``)."""

    base: str
    recipe: Union[str, dict[str, Any]]
    set: dict[str, Any] = Field(default_factory=dict)


class MergeAdapterBody(_Strict):
    """``merge-adapter``: PEFT adapters (train steps or inputs) merged into ``base`` (``adaptkit merge-adapter``)."""

    base: str
    adapters: list[str] = Field(min_length=1)
    weights: Optional[list[float]] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    base_quantization: Literal["auto", "none"] = "auto"


class QuantizeBody(_Strict):
    """``quantize``: ``adaptkit quantize`` options; an option left out is the quantizer's default."""

    model: str
    method: str
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None
    act_order: Optional[bool] = None
    damp: Optional[float] = None
    partial_groups: Optional[bool] = None
    calib: str = "builtin"
    nsamples: int = Field(default=128, ge=1)
    seqlen: int = Field(default=512, ge=8)
    options: dict[str, Any] = Field(default_factory=dict)
    requantize: bool = False


class EvalBody(_Strict):
    """``eval``: ``adaptkit eval`` (tasks as on its command line: TASK, EVALUATOR:TASK, EVALUATOR:FILE)."""

    model: str
    baseline: Optional[str] = None
    tasks: Optional[list[str]] = None
    suite: Optional[str] = None
    limit: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class VerifyBody(_Strict):
    """``verify``: ``adaptkit verify`` (gates file relative to the pipeline; default gates with a baseline)."""

    model: str
    baseline: Optional[str] = None
    gates: Optional[str] = None
    limit: Optional[int] = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    manifest: Optional[Literal["write", "check"]] = None
    scan_values: bool = True


BODIES: dict[str, Optional[type[BaseModel]]] = {
    "train": TrainBody, "merge-adapter": MergeAdapterBody, "merge": None, "quantize": QuantizeBody,
    "eval": EvalBody, "verify": VerifyBody,
}


@dataclass
class StepDef:
    """One validated step. ``body`` is the kind's model (for ``merge``: the raw mergekit mapping, validated by
    :func:`adaptkit.config.parse_merge_config` once references are resolved)."""

    name: str
    kind: str
    body: Any
    raw: dict[str, Any]
    index: int
    plugin: Optional[str] = None
    device: str = "cpu"
    seed: int = 0
    refs: list[str] = field(default_factory=list)  #: names this step reads (filled by graph.check_graph)


@dataclass
class Pipeline:
    path: Path
    root: Path  #: the folder relative paths start from
    output: Path
    inputs: dict[str, Path]
    steps: list[StepDef]

    @property
    def source(self) -> str:
        return self.path.name

    def step(self, name: str) -> StepDef:
        for s in self.steps:
            if s.name == name:
                return s
        raise ConfigError(f"{self.source}: no step named {name!r}{nearest_hint(name, [s.name for s in self.steps])}")


def _expand_env(value: str, src: str, where: str) -> str:
    def sub(m: "re.Match[str]") -> str:
        name, default = m.group(1), m.group(3)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{src}: {where}: environment variable {name!r} is not set (used as ${{{name}}})")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


def _resolve(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _check_name(name: Any, src: str, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{src}: {where}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                          "(starting with a letter or digit)")
    return name


def _parse_step(raw: Any, i: int, src: str) -> StepDef:
    where = f"steps[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {where} must be a mapping with 'name' and one of {', '.join(KINDS)}")
    if "name" not in raw:
        raise ConfigError(f"{src}: {where}: missing required key 'name'")
    name = _check_name(raw["name"], src, where)
    where = f"step {name!r}"
    kinds = [k for k in raw if k in KINDS]
    if not kinds:
        others = [k for k in raw if k not in ("name", *COMMON_KEYS)]
        if others:
            raise ConfigError(f"{src}: {where}: unknown key {others[0]!r}{nearest_hint(others[0], (*KINDS, *COMMON_KEYS))}")
        raise ConfigError(f"{src}: {where}: no step kind; give one of {', '.join(KINDS)}")
    if len(kinds) > 1:
        raise ConfigError(f"{src}: {where}: one kind per step, got {' and '.join(kinds)} (split it into two steps)")
    kind = kinds[0]
    check_keys(raw, ("name", kind, *COMMON_KEYS), where, src)
    body_raw = raw[kind]
    if not isinstance(body_raw, dict):
        raise ConfigError(f"{src}: {where}: {kind} must be a mapping of settings, got {type(body_raw).__name__}")
    model = BODIES[kind]
    if model is None:
        body: Any = body_raw  # merge: validated once references are resolved (kinds.py)
    else:
        check_keys(body_raw, model.model_fields, f"{where}.{kind}", src)
        try:
            body = model.model_validate(body_raw)
        except ValidationError as exc:
            raise validation_error(exc, f"{src}: {where}.{kind}", union_tags=_UNION_TAGS) from None
    plugin = raw.get("plugin")
    if plugin is not None and not isinstance(plugin, str):
        raise ConfigError(f"{src}: {where}: plugin must be a distribution name (e.g. adaptkit-example-quant)")
    device = raw.get("device", "cpu")
    head, _, idx = str(device).partition(":")
    if not isinstance(device, str) or head not in ("cpu", "cuda") or (idx and (head != "cuda" or not idx.isdigit())):
        raise ConfigError(f"{src}: {where}: device must be cpu, cuda or cuda:N (got {device!r})")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{src}: {where}: seed must be an integer (got {seed!r})")
    return StepDef(name=name, kind=kind, body=body, raw=raw, index=i, plugin=plugin, device=device, seed=seed)


def parse_pipeline(raw: Any, path: Path, *, output: str | Path | None = None) -> Pipeline:
    """Validate a loaded pipeline mapping (``path``: the file; relative paths start at its folder). Checks the
    schema, names and references (:func:`adaptkit.pipeline.graph.check_graph`); not yet the plugins."""
    src = path.name
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a pipeline must be a YAML mapping, got {type(raw).__name__}")
    check_keys(raw, ("output", "inputs", "steps"), "", src)
    root = path.resolve().parent
    inputs: dict[str, Path] = {}
    raw_inputs = raw.get("inputs") or {}
    if not isinstance(raw_inputs, dict):
        raise ConfigError(f"{src}: inputs must be a mapping of name: path")
    for name, value in raw_inputs.items():
        _check_name(name, src, f"inputs.{name}")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{src}: inputs.{name}: expected a path, got {value!r}")
        p = _resolve(_expand_env(value, src, f"inputs.{name}"), root)
        if not p.exists():
            raise ConfigError(f"{src}: inputs.{name}: {p}: no such file or folder")
        inputs[name] = p
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ConfigError(f"{src}: 'steps' must be a non-empty list of steps")
    steps = [_parse_step(s, i, src) for i, s in enumerate(steps_raw)]
    seen: dict[str, str] = {n: "an input" for n in inputs}
    for s in steps:
        if s.name in seen:
            raise ConfigError(f"{src}: step name {s.name!r} is used twice (also {seen[s.name]}); names must be unique")
        seen[s.name] = f"step {s.index}"
    if output is not None:
        out = Path(output)
    else:
        out_raw = raw.get("output")
        if out_raw is not None and not isinstance(out_raw, str):
            raise ConfigError(f"{src}: output must be a folder path")
        out = _resolve(_expand_env(out_raw, src, "output"), root) if out_raw else root / f"{path.stem}.out"
    pipe = Pipeline(path=path, root=root, output=Path(os.path.normpath(os.path.abspath(out))), inputs=inputs,
                    steps=steps)
    check_graph(pipe)
    return pipe


def load_pipeline(path: str | Path, *, output: str | Path | None = None) -> Pipeline:
    """Read and validate a pipeline file; every problem is a one-line ConfigError naming the file."""
    p = Path(path)
    return parse_pipeline(read_yaml_mapping(p, "pipeline"), p, output=output)
