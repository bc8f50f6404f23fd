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


@dataclass(frozen=True)
class MergeMethod(Component):
    """A merge method: ``impl(inputs: adaptkit.merge.api.MergeInputs) -> torch.Tensor``.

    The function is pure: it receives a group of same-named tensors (already upcast to the compute dtype)
    and the validated parameters for that tensor, and returns the merged tensor in the compute dtype. It
    never opens a file and never rounds to the output dtype (the engine rounds once).
    """

    requires_base: bool = False
    uses_base: bool = True  #: whether the base model (if given) takes part in the math
    randomized: bool = False  #: uses ``inputs.generator(i)``; output depends on --seed
    min_models: int = 1
    max_models: int | None = None


@dataclass(frozen=True)
class Quantizer(Component):
    """A quantization method: ``impl(request) -> result`` (see plugins/adaptkit-quant/specs)."""

    formats: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trainer(Component):
    """A training recipe (SFT, DPO, ...) producing an adapter or a model."""


@dataclass(frozen=True)
class Evaluator(Component):
    """An evaluation (perplexity, a benchmark task, a probe, a gate)."""


@dataclass(frozen=True)
class Loader(Component):
    """A checkpoint loader. ``detect(path) -> bool`` says whether it can read ``path`` (cheap: headers and
    file names only); ``impl(path, **options)`` opens it. Higher ``priority`` is asked first."""

    detect: str | Callable[..., bool] = ""
    priority: int = 0

    def can_load(self, path: Any) -> bool:
        return bool(resolve_impl(self.detect)(path))


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
        raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {known})")

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


class LoaderRegistry(Registry[Loader]):
    def __init__(self) -> None:
        super().__init__(kind="loader", component_type=Loader)

    def find(self, path: Any) -> Entry[Loader] | None:
        """The highest-priority loader whose ``detect`` accepts ``path`` (first result wins)."""
        entries = sorted(self.entries(), key=lambda e: -e.component.priority)
        for e in entries:
            if e.component.can_load(path):
                return e
        return None


REGISTRY_KINDS: dict[str, type[Registry[Any]]] = {
    "merger": MergerRegistry,
    "quantizer": QuantizerRegistry,
    "trainer": TrainerRegistry,
    "evaluator": EvaluatorRegistry,
    "loader": LoaderRegistry,
}
