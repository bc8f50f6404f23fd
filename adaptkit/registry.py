"""Typed registries that plugins fill through the registration hooks.

A registry holds *components* (merge methods, quantizers, trainers, evaluators, checkpoint loaders). Each
component names its implementation lazily (``"package.module:function"``) so that registering a plugin never
imports torch. Every entry remembers its owner (the plugin and distribution that registered it):

* the same name registered twice by one owner is an error naming that owner;
* the same short name registered by two owners makes the short name *ambiguous*: looking it up is an error
  that names both owners and their qualified names ``distribution:name``, which always resolve.
"""
from __future__ import annotations

import difflib
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from adaptkit.errors import ConfigError, PluginError

_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter that has no default and must be given."""


@dataclass(frozen=True)
class Owner:
    """Who registered an entry: the plugin (pluggy name), its distribution and version."""

    plugin: str
    distribution: str
    version: str = ""
    builtin: bool = False


BUILTIN_OWNER = Owner(plugin="adaptkit", distribution="adaptkit", builtin=True)


@dataclass(frozen=True)
class Param:
    """A declared parameter of a component, validated before any tensor is read.

    ``scope`` says where a config may set it: ``"global"`` (top-level ``parameters``), ``"model"``
    (per-model ``parameters``) or ``"both"`` (per-model value wins). ``gradient`` allows a list of values
    interpolated over layers (mergekit's gradients).
    """

    name: str
    type: type = float
    default: Any = REQUIRED
    scope: str = "both"
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[Any, ...] | None = None
    gradient: bool = True
    help: str = ""

    def __post_init__(self) -> None:
        if self.scope not in ("global", "model", "both"):
            raise ValueError(f"Param {self.name!r}: scope must be global, model or both")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str = "") -> Any:
        """Coerce and range-check ``value``; raise ConfigError naming ``where`` and the rule broken."""
        loc = f"{where}: " if where else ""
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{loc}parameter {self.name!r} must be true or false, got {value!r}")
        elif t is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                raise ConfigError(f"{loc}parameter {self.name!r} must be an integer, got {value!r}")
            value = int(value)
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{loc}parameter {self.name!r} must be a number, got {value!r}")
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{loc}parameter {self.name!r} must be finite, got {value!r}")
        elif t is str:
            if not isinstance(value, str):
                raise ConfigError(f"{loc}parameter {self.name!r} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"{loc}parameter {self.name!r} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
            )
        if self.min is not None and (value < self.min or (self.min_exclusive and value == self.min)):
            op = ">" if self.min_exclusive else ">="
            raise ConfigError(f"{loc}parameter {self.name!r} must be {op} {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ConfigError(f"{loc}parameter {self.name!r} must be <= {self.max}, got {value!r}")
        return value

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": None if self.required else self.default,
            "required": self.required,
            "scope": self.scope,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices is not None else None,
            "help": self.help,
        }


def resolve_impl(impl: str | Callable[..., Any]) -> Callable[..., Any]:
    """Import ``"pkg.module:attr"`` (lazily) or return a callable as is."""
    if callable(impl):
        return impl
    module, _, attr = impl.partition(":")
    if not module or not attr:
        raise PluginError(f"implementation reference {impl!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal to the host
        raise PluginError(f"cannot import implementation {impl!r}: {type(exc).__name__}: {exc}") from exc
    return obj


@dataclass(frozen=True)
class Component:
    """Base of everything a registry holds."""

    name: str
    impl: str | Callable[..., Any]
    description: str = ""
    params: tuple[Param, ...] = ()

    def load(self) -> Callable[..., Any]:
        """The implementation callable (imported on first use)."""
        return resolve_impl(self.impl)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "params": [p.describe() for p in self.params]}

    def resolve_options(self, given: dict[str, Any] | None, where: str = "") -> dict[str, Any]:
        """Validate ``given`` against the declared ``params`` and fill defaults: an unknown key is a
        ``ConfigError`` naming the nearest declared one, a missing required one too."""
        given = dict(given or {})
        loc = f"{where}: " if where else ""
        known = [p.name for p in self.params]
        out: dict[str, Any] = {}
        for key, value in given.items():
            param = self.param(key)
            if param is None:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{loc}{self.name} has no option {key!r}{hint} (known: {', '.join(known) or 'none'})")
            out[key] = param.validate(value, where=where)
        for p in self.params:
            if p.name not in out:
                if p.required:
                    raise ConfigError(f"{loc}{self.name} needs option {p.name!r}")
                out[p.name] = p.default
        return out


@dataclass(frozen=True)
class MergeMethod(Component):
    """A merge method: ``impl(inputs: adaptkit.merge.api.MergeInputs) -> torch.Tensor``.

    The function is pure: it receives a group of same-named tensors (already upcast to the compute dtype)
    and the validated parameters for that tensor, and returns the merged tensor in the compute dtype. It
    never opens a file and never rounds to the output dtype (the engine rounds once). What the engine needs
    to know about a method is declared here, never inferred from its name.
    """

    requires_base: bool = False
    uses_base: bool = True  #: whether the base model (if given) takes part in the math
    randomized: bool = False  #: uses ``inputs.generator(i)``; output depends on --seed
    min_models: int = 1
    max_models: int | None = None
    #: the result for a block of rows depends only on those rows, so the engine may feed a large tensor in
    #: row blocks: ``True``, or an implementation reference ``"pkg.mod:func"`` called as
    #: ``func(params: list[dict], global_params: dict) -> bool`` for one tensor's resolved parameters
    #: (e.g. task arithmetic is row-separable only without sparsification). Randomized methods never are.
    row_separable: bool | str | Callable[..., bool] = False
    #: the result is non-finite wherever an input is (a weighted sum): the engine may check the result for
    #: NaN/Inf instead of every input, and checks the inputs only when the result is non-finite
    propagates_nonfinite: bool = False
    #: the method may overwrite its input tensors when ``inputs.owned`` is true (the engine's own copies)
    in_place: bool = False
    #: a task with a single model whose parameters all equal these values is copied without any math
    #: (passthrough with ``scale: 1``); ``None``: always call the method
    identity_params: tuple[tuple[str, Any], ...] | None = None

    def is_row_separable(self, params: list[dict[str, Any]], global_params: dict[str, Any]) -> bool:
        if self.randomized:
            return False
        rs = self.row_separable
        if isinstance(rs, bool):
            return rs
        return bool(resolve_impl(rs)(params, global_params))


QUANT_OPTIONS: tuple[str, ...] = ("bits", "group_size", "sym", "act_order", "damp", "partial_groups")
"""The common ``adaptkit quantize`` options a quantizer may declare in ``Quantizer.accepts``."""


@dataclass(frozen=True)
class Quantizer(Component):
    """A quantization method: ``impl(request: adaptkit.quantize.api.QuantizeRequest) -> Iterable[item]``
    (the whole contract: ``adaptkit.hookspecs.adaptkit_register_quantizers``).

    ``formats`` are the checkpoint formats its results can be written in (core formats:
    ``adaptkit.formats.FORMATS``; the first is the default). ``accepts`` lists the common options it honours
    (:data:`QUANT_OPTIONS`); a user who sets another one gets an error instead of a silently ignored option.
    ``bits`` are the bit widths it produces. ``needs_calibration``: the runner validates the calibration
    source first and the request carries it.
    """

    formats: tuple[str, ...] = ()
    accepts: tuple[str, ...] = ("bits", "group_size", "sym")
    bits: tuple[int, ...] = (4,)
    needs_calibration: bool = False


ADAPTER_KINDS: tuple[str, ...] = (
    "full", "lora", "qlora", "dora", "rslora", "adalora", "ia3", "prompt_tuning", "prefix_tuning",
)
"""Adapter kinds a trainer may declare in ``Trainer.adapters``."""

DATA_FORMATS: tuple[str, ...] = ("text", "messages", "prompt_completion", "preference", "unpaired_preference", "prompt")
"""Dataset row shapes (see ``adaptkit.train.api.DATA_FORMATS`` for their fields)."""


@dataclass(frozen=True)
class Trainer(Component):
    """A training method (SFT, DPO, KTO, ORPO, GRPO, ...): ``impl(request: adaptkit.train.api.TrainRequest)
    -> adaptkit.train.api.TrainResult`` (contract: ``adaptkit.hookspecs.adaptkit_register_trainers``).

    ``data_formats``: the dataset row shapes it trains on (:data:`DATA_FORMATS`); ``adapters``: the adapter
    kinds it can train (:data:`ADAPTER_KINDS`); ``needs_reward``: it needs reward functions (GRPO);
    ``needs_reference``: it keeps a frozen reference model (DPO, KTO); ``distributed``: it runs under
    ``torchrun``/``accelerate launch`` with more than one process.
    """

    data_formats: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ("lora",)
    needs_reward: bool = False
    needs_reference: bool = False
    distributed: bool = False


@dataclass(frozen=True)
class Evaluator(Component):
    """An evaluation (bits-per-byte, benchmark tasks, probes, agreement with a baseline):
    ``impl(request: adaptkit.evaluate.api.EvalRequest) -> adaptkit.evaluate.api.EvalResult`` (contract:
    ``adaptkit.hookspecs.adaptkit_register_evaluators``).

    ``metrics``: the metric names it reports, each with ``higher_is_better``; ``needs_baseline``: it compares
    against a baseline model (agreement, KL); ``same_tokenizer``: a baseline must share the tokenizer
    (token-level metrics); ``generates``: it runs generation (slower; probes).
    """

    metrics: tuple[tuple[str, bool], ...] = ()
    needs_baseline: bool = False
    same_tokenizer: bool = False
    generates: bool = False


@dataclass(frozen=True)
class Reward(Component):
    """A reward function for RL trainers (GRPO): ``impl(prompts: list[str], completions: list[str], **columns)
    -> list[float]`` (one score per completion; extra dataset columns such as ``answer`` arrive by name)."""


@dataclass(frozen=True)
class Loader(Component):
    """A checkpoint loader. ``detect(path) -> bool`` says whether it can read ``path`` (cheap: headers and
    file names only; it must not raise -- one that does is reported as that plugin's error); ``impl(path,
    **options)`` opens it. Higher ``priority`` is asked first. ``dequantizes``: it reads a quantized format
    and returns dequantized floating-point tensors (the opened checkpoint's ``source_format`` names it)."""

    detect: str | Callable[..., bool] = ""
    priority: int = 0
    dequantizes: bool = False

    def can_load(self, path: Any) -> bool:
        return bool(resolve_impl(self.detect)(path))


def _check_declared(component: Component, owner: str) -> None:
    """Validate declared capabilities against the values adaptkit knows (one-line PluginError)."""
    def bad(field_name: str, values: tuple[str, ...], known: tuple[str, ...]) -> None:
        unknown = [v for v in values if v not in known]
        if unknown:
            raise PluginError(
                f"{owner}: {type(component).__name__.lower()} {component.name!r} declares unknown "
                f"{field_name} {unknown[0]!r} (known: {', '.join(known)})"
            )

    if isinstance(component, Quantizer):
        from adaptkit.formats import FORMATS

        if not component.formats:
            raise PluginError(f"{owner}: quantizer {component.name!r} declares no output format "
                              f"(formats=(...), known: {', '.join(FORMATS)})")
        bad("format", component.formats, tuple(FORMATS))
        bad("option", component.accepts, QUANT_OPTIONS)
    elif isinstance(component, Trainer):
        bad("adapter kind", component.adapters, ADAPTER_KINDS)
        bad("data format", component.data_formats, DATA_FORMATS)


C = TypeVar("C", bound=Component)


@dataclass
class Entry(Generic[C]):
    component: C
    owner: Owner

    @property
    def qualified_name(self) -> str:
        return f"{self.owner.distribution}:{self.component.name}"


@dataclass
class Registry(Generic[C]):
    """Holds one kind of component. Filled by the host while calling a registration hook per plugin."""

    kind: str
    component_type: type = Component
    _entries: dict[str, list[Entry[C]]] = field(default_factory=dict)
    _owner: Owner = BUILTIN_OWNER
    #: set by the host when plugins failed to load: appended to unknown-name errors (the name may be theirs)
    failed_note: str = ""

    # -- used by the host ------------------------------------------------------------------------
    def _set_owner(self, owner: Owner) -> None:
        self._owner = owner

    # -- used by plugins -------------------------------------------------------------------------
    def register(self, component: C) -> C:
        """Register ``component`` under its ``name``; returns it (usable as a decorator helper)."""
        if not isinstance(component, self.component_type):
            raise PluginError(
                f"{self._owner.plugin}: a {self.kind} registry takes {self.component_type.__name__}, "
                f"got {type(component).__name__}"
            )
        if not isinstance(component.name, str) or not _NAME_RE.match(component.name):
            raise PluginError(
                f"{self._owner.plugin}: invalid {self.kind} name {component.name!r} "
                "(lowercase letters, digits, '_' and '-', starting with a letter)"
            )
        _check_declared(component, self._owner.plugin)
        entries = self._entries.setdefault(component.name, [])
        for e in entries:
            if e.owner.distribution == self._owner.distribution:
                raise PluginError(
                    f"{self.kind} {component.name!r} is registered twice by {e.owner.distribution} "
                    f"(plugins {e.owner.plugin!r} and {self._owner.plugin!r})"
                )
        entries.append(Entry(component, self._owner))
        return component

    # -- lookups ---------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        try:
            self.get(str(name))
        except (KeyError, PluginError, ConfigError):
            return False
        return True

    def entries(self) -> Iterator[Entry[C]]:
        for name in sorted(self._entries):
            yield from self._entries[name]

    def names(self) -> list[str]:
        """Every name a user may type: short names that are unique, qualified names always."""
        out: list[str] = []
        for name, entries in sorted(self._entries.items()):
            if len(entries) == 1:
                out.append(name)
            out.extend(e.qualified_name for e in entries)
        return out

    def conflicts(self) -> dict[str, list[Entry[C]]]:
        return {n: sorted(es, key=lambda e: e.qualified_name) for n, es in self._entries.items() if len(es) > 1}

    def entry(self, name: str) -> Entry[C]:
        if ":" in name:
            dist, _, short = name.rpartition(":")
            for e in self._entries.get(short, []):
                if e.owner.distribution == dist:
                    return e
        else:
            entries = self._entries.get(name, [])
            if len(entries) == 1:
                return entries[0]
            if len(entries) > 1:
                owners = " and ".join(
                    f"{e.owner.distribution} ({e.qualified_name})" for e in sorted(entries, key=lambda e: e.qualified_name)
                )
                raise PluginError(
                    f"{self.kind} {name!r} is ambiguous: registered by {owners}; use a qualified name"
                )
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(self._entries)) or "none"
        failed = f"; {self.failed_note}" if self.failed_note else ""
        raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {known}){failed}")

    def get(self, name: str) -> C:
        """The component called ``name`` (short or ``distribution:name``); ConfigError if unknown."""
        return self.entry(name).component


class MergerRegistry(Registry[MergeMethod]):
    def __init__(self) -> None:
        super().__init__(kind="merge method", component_type=MergeMethod)


class QuantizerRegistry(Registry[Quantizer]):
    def __init__(self) -> None:
        super().__init__(kind="quantizer", component_type=Quantizer)


class TrainerRegistry(Registry[Trainer]):
    def __init__(self) -> None:
        super().__init__(kind="trainer", component_type=Trainer)


class EvaluatorRegistry(Registry[Evaluator]):
    def __init__(self) -> None:
        super().__init__(kind="evaluator", component_type=Evaluator)


class RewardRegistry(Registry[Reward]):
    def __init__(self) -> None:
        super().__init__(kind="reward", component_type=Reward)


class LoaderRegistry(Registry[Loader]):
    def __init__(self) -> None:
        super().__init__(kind="loader", component_type=Loader)

    def find(self, path: Any) -> Entry[Loader] | None:
        """The highest-priority loader whose ``detect`` accepts ``path`` (first result wins). A ``detect`` that
        raises is a bug of its plugin: a one-line ``PluginError`` naming the loader and its owner."""
        entries = sorted(self.entries(), key=lambda e: -e.component.priority)
        for e in entries:
            try:
                ok = e.component.can_load(path)
            except PluginError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported with its owner
                raise PluginError(
                    f"loader {e.qualified_name} raised in detect({str(path)!r}): {type(exc).__name__}: {exc}"
                ) from exc
            if ok:
                return e
        return None

    def tried(self) -> list[str]:
        """Qualified names of every loader, in the order ``find`` asks them."""
        return [e.qualified_name for e in sorted(self.entries(), key=lambda e: -e.component.priority)]


REGISTRY_KINDS: dict[str, type[Registry[Any]]] = {
    "merger": MergerRegistry,
    "quantizer": QuantizerRegistry,
    "trainer": TrainerRegistry,
    "evaluator": EvaluatorRegistry,
    "reward": RewardRegistry,
    "loader": LoaderRegistry,
}
