"""The plugin host: a pluggy manager plus the typed registries it fills.

* Built-ins are the modules in ``DEFAULT_PLUGINS``, registered exactly like third-party plugins.
* Third-party plugins come from the entry-point group ``adaptkit``, loaded one distribution at a time: a
  plugin that raises on import, implements an unknown hook (a misspelt name), or raises on registration is
  recorded with its error (``adaptkit plugins`` lists it) and never breaks the CLI.
* ``ADAPTKIT_PLUGINS`` (comma-separated allow-list of entry-point or distribution names; empty = none) limits
  which third-party plugins load; ``blocked`` (the CLI's ``-p no:NAME``) blocks any plugin, built-ins included.
"""
from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from adaptkit import PROJECT_NAME, __version__, hookspecs
from adaptkit.errors import PluginError
from adaptkit.registry import BUILTIN_OWNER, REGISTRY_KINDS, Owner, Registry

ENTRY_POINT_GROUP = "adaptkit"
ALLOW_ENV = "ADAPTKIT_PLUGINS"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "adaptkit.builtins.commands",
    "adaptkit.builtins.mergers",
    "adaptkit.builtins.loaders",
    "adaptkit.builtins.steps",
)

#: registry kind -> registration hook name
REGISTRATION_HOOKS: dict[str, str] = {kind: f"adaptkit_register_{kind}s" for kind in REGISTRY_KINDS}


@dataclass
class PluginRecord:
    """What ``adaptkit plugins`` reports about one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    builtin: bool
    status: str = "loaded"  # loaded | failed | blocked
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def owner(self) -> Owner:
        return Owner(plugin=self.name, distribution=self.distribution, version=self.version, builtin=self.builtin)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "builtin": self.builtin,
            "status": self.status,
            "hooks": sorted(self.hooks),
            "registered": {k: sorted(v) for k, v in sorted(self.registered.items()) if v},
            "errors": list(self.errors),
        }


def _blocked_names(blocked: Iterable[str]) -> set[str]:
    out = set()
    for b in blocked:
        b = b.strip()
        if b.startswith("no:"):
            b = b[3:]
        if b:
            out.add(b)
    return out


class PluginHost:
    """Owns the pluggy manager, the plugin records and (lazily built) registries."""

    def __init__(self, *, load_entrypoints: bool = True, blocked: Iterable[str] = (),
                 extra_plugins: Iterable[Any] = (), allow: Iterable[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.blocked = _blocked_names(blocked)
        self._registries: dict[str, Registry[Any]] = {}
        if allow is None and ALLOW_ENV in os.environ:
            allow = [a.strip() for a in os.environ[ALLOW_ENV].split(",") if a.strip()]
        self.allow = None if allow is None else set(allow)

        for modname in DEFAULT_PLUGINS:
            self._add_builtin(modname)
        for obj in extra_plugins:
            self._add_object(obj)
        if load_entrypoints:
            self._load_entrypoints()

    # -- loading -----------------------------------------------------------------------------------
    def _is_blocked(self, *names: str) -> bool:
        return any(n in self.blocked for n in names if n)

    def _add_builtin(self, modname: str) -> None:
        rec = PluginRecord(name=modname, distribution=PROJECT_NAME, version=__version__, module=modname, builtin=True)
        self.records[rec.name] = rec
        if self._is_blocked(modname, modname.rsplit(".", 1)[-1]):
            rec.status = "blocked"
            return
        try:
            module = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            self._fail(rec, f"import failed: {type(exc).__name__}: {exc}")
            return
        self._register(rec, module)

    def _add_object(self, obj: Any) -> None:
        """Register an in-process plugin (tests, embedding applications)."""
        name = getattr(obj, "__name__", None) or type(obj).__name__
        module = getattr(obj, "__module__", name) if not isinstance(obj, type(os)) else obj.__name__
        dist = getattr(obj, "ADAPTKIT_DISTRIBUTION", name.split(".")[0])
        rec = PluginRecord(name=name, distribution=dist, version=str(getattr(obj, "__version__", "")),
                           module=str(module), builtin=False)
        if rec.name in self.records:
            rec.name = f"{rec.name}#{len(self.records)}"
        self.records[rec.name] = rec
        if self._is_blocked(rec.name, dist):
            rec.status = "blocked"
            return
        self._register(rec, obj)

    def _load_entrypoints(self) -> None:
        from adaptkit.entrypoints import entry_points

        for ep in entry_points(ENTRY_POINT_GROUP):
            self._load_entrypoint(ep, ep.distribution, ep.version)

    def _load_entrypoint(self, ep: Any, dist_name: str, version: str) -> None:
        rec = PluginRecord(name=ep.name, distribution=dist_name, version=version, module=ep.value, builtin=False)
        if ep.name in self.records:
            other = self.records[ep.name]
            rec.name = f"{dist_name}:{ep.name}"
            self.records[rec.name] = rec
            self._fail(rec, f"plugin name {ep.name!r} is already used by {other.distribution} {other.version}".rstrip())
            return
        self.records[rec.name] = rec
        if self._is_blocked(ep.name, dist_name) or (
            self.allow is not None and ep.name not in self.allow and dist_name not in self.allow
        ):
            rec.status = "blocked"
            return
        try:
            obj = ep.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin must never break the CLI (even sys.exit())
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._fail(rec, f"import failed: {type(exc).__name__}: {exc}")
            return
        self._register(rec, obj)

    def _register(self, rec: PluginRecord, obj: Any) -> None:
        try:
            self.pm.register(obj, name=rec.name)
        except Exception as exc:  # noqa: BLE001 - e.g. pluggy's validation of hookimpl arguments
            self._fail(rec, f"registration failed: {type(exc).__name__}: {exc}")
            return
        unknown = []
        for caller in self.pm.get_hookcallers(obj) or []:
            if caller.spec is None:
                impls = [i for i in caller.get_hookimpls() if i.plugin is obj]
                if any(not i.optionalhook for i in impls):
                    close = difflib.get_close_matches(caller.name, self._hook_names(), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    unknown.append(f"unknown hook {caller.name!r}{hint}")
            else:
                rec.hooks.append(caller.name)
        if unknown:
            self.pm.unregister(obj)
            rec.hooks.clear()
            self._fail(rec, "; ".join(unknown))

    def _fail(self, rec: PluginRecord, message: str) -> None:
        rec.status = "failed"
        rec.errors.append(message)

    @staticmethod
    def _hook_names() -> list[str]:
        return [n for n in dir(hookspecs) if n.startswith("adaptkit_")]

    def check_pending(self) -> None:
        """Raise PluginError if any registered plugin implements a hook that has no spec (a misspelling)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc

    # -- registries --------------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry[Any]:
        """The registry of ``kind`` (merger, quantizer, trainer, evaluator, loader), filled on first use."""
        if kind not in REGISTRY_KINDS:
            raise KeyError(kind)
        if kind not in self._registries:
            reg = self._fill(kind)
            failed = [r for r in self.records.values() if r.status == "failed"]
            if failed:
                reg.failed_note = "plugins that failed to load: " + "; ".join(
                    f"{r.distribution} ({r.errors[0] if r.errors else 'failed'})" for r in failed)
            self._registries[kind] = reg
        return self._registries[kind]

    def _fill(self, kind: str) -> Registry[Any]:
        registry = REGISTRY_KINDS[kind]()
        hook = getattr(self.pm.hook, REGISTRATION_HOOKS[kind])
        for impl in hook.get_hookimpls():
            rec = self.records.get(impl.plugin_name)
            owner = rec.owner if rec else Owner(plugin=impl.plugin_name, distribution=impl.plugin_name)
            if rec and rec.builtin:
                owner = BUILTIN_OWNER
            before = {name: list(entries) for name, entries in registry._entries.items()}
            registry._set_owner(owner)
            try:
                impl.function(**{arg: registry for arg in impl.argnames})
            except Exception as exc:  # noqa: BLE001 - recorded, the plugin's partial work is discarded
                registry._entries = before  # type: ignore[assignment]
                if rec:
                    self._fail(rec, f"{REGISTRATION_HOOKS[kind]} failed: {type(exc).__name__}: {exc}")
                continue
            finally:
                registry._set_owner(BUILTIN_OWNER)
            if rec:
                new = sorted(n for n, es in registry._entries.items() if len(es) > len(before.get(n, [])))
                rec.registered.setdefault(kind, []).extend(new)
        return registry

    @property
    def mergers(self) -> Any:
        return self.registry("merger")

    @property
    def quantizers(self) -> Any:
        return self.registry("quantizer")

    @property
    def trainers(self) -> Any:
        return self.registry("trainer")

    @property
    def evaluators(self) -> Any:
        return self.registry("evaluator")

    @property
    def rewards(self) -> Any:
        return self.registry("reward")

    @property
    def loaders(self) -> Any:
        return self.registry("loader")

    def open_model(self, path: Any, **options: Any) -> Any:
        """Open a checkpoint with the first loader (by priority) whose ``detect`` accepts ``path``.

        The returned object has the ``adaptkit.io.Checkpoint`` interface plus two attributes set here:
        ``loader`` (the loader's qualified name) and ``source_format`` (``None`` for floating-point weights,
        else what was dequantized on load, e.g. ``"gptq"`` or ``"gguf:Q4_1"``; a loader sets it itself).
        An input no loader accepts is a ``CheckpointError`` naming the path and every loader tried (with the
        safetensors reader's precise reason when it has one: pickle-only folder, empty folder, ...).
        """
        from pathlib import Path

        from adaptkit.errors import CheckpointError

        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder (adaptkit reads local checkpoints only, never downloads)")
        entry = self.loaders.find(p)
        if entry is None:
            tried = ", ".join(self.loaders.tried()) or "none"
            from adaptkit.io import open_checkpoint

            try:  # the safetensors reader knows the precise reason (pickle-only, empty folder, bad index, ...)
                ckpt = open_checkpoint(p, **options)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc.message} (loaders tried: {tried})", hint=exc.hint) from None
            entry_name = "adaptkit:safetensors"
        else:
            ckpt = entry.component.load()(p, **options)
            entry_name = entry.qualified_name
        for attr, value in (("loader", entry_name), ("source_format", getattr(ckpt, "source_format", None))):
            try:
                setattr(ckpt, attr, value)
            except AttributeError:  # pragma: no cover - a loader returning a slotted object
                pass
        return ckpt

    # -- commands and steps ------------------------------------------------------------------------
    def plugin_commands(self) -> dict[str, Any]:
        """Every command, built-in and plugin, added through ``adaptkit_register_commands`` (built once).

        Each plugin gets a scratch group to add to; built-ins are asked first, so a name a plugin takes that is
        already taken (by a built-in or another plugin) is recorded as that plugin's error and its command is
        dropped.
        """
        if getattr(self, "_commands", None) is not None:
            return self._commands
        import click

        commands: dict[str, Any] = {}
        owners: dict[str, str] = {}
        impls = self.pm.hook.adaptkit_register_commands.get_hookimpls()
        impls = sorted(impls, key=lambda i: not (self.records.get(i.plugin_name) and self.records[i.plugin_name].builtin))
        for impl in impls:
            rec = self.records.get(impl.plugin_name)
            scratch = click.Group(name="adaptkit")
            try:
                impl.function(**{arg: scratch for arg in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                if rec:
                    self._fail(rec, f"adaptkit_register_commands failed: {type(exc).__name__}: {exc}")
                continue
            clashes = []
            for name, cmd in scratch.commands.items():
                if name in commands:
                    clashes.append(f"{name} (owned by {owners[name]})")
                    continue
                commands[name] = cmd
                owners[name] = rec.distribution if rec else impl.plugin_name
                if rec:
                    rec.registered.setdefault("command", []).append(name)
            if clashes and rec:
                self._fail(rec, f"command name(s) already taken: {', '.join(clashes)}")
        self._commands = commands
        return commands

    def run_step(self, kind: str, name: str, fn: Callable[[], Any], **info: Any) -> Any:
        """Run ``fn`` as a step through the ``adaptkit_run_step`` hook (so wrappers can time/log it)."""
        from adaptkit.steps import Step

        step = Step(kind=kind, name=name, run=fn, info=info)
        result = self.pm.hook.adaptkit_run_step(step=step)
        self.last_step = step
        return result

    # -- reporting ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The document printed by ``adaptkit plugins --json`` (schema in specs/plugin-contract.md)."""
        self.plugin_commands()
        for kind in REGISTRY_KINDS:
            self.registry(kind)
        conflicts = []
        for kind in REGISTRY_KINDS:
            for name, entries in sorted(self.registry(kind).conflicts().items()):
                conflicts.append({"kind": kind, "name": name, "owners": [e.qualified_name for e in entries]})
        return {
            "schema": 1,
            "adaptkit_version": __version__,
            "plugins": [r.to_json() for r in sorted(self.records.values(), key=lambda r: (not r.builtin, r.name))],
            "conflicts": conflicts,
        }


def get_plugin_manager(*, load_entrypoints: bool = True, blocked: Iterable[str] = (),
                       extra_plugins: Iterable[Any] = (), allow: Iterable[str] | None = None) -> PluginHost:
    """A new plugin host with built-ins, ``extra_plugins`` and (unless disabled) entry-point plugins."""
    return PluginHost(load_entrypoints=load_entrypoints, blocked=blocked, extra_plugins=extra_plugins, allow=allow)


def check_pending(host: PluginHost) -> None:
    """Raise PluginError if a plugin implements a hook name that has no spec."""
    host.check_pending()
