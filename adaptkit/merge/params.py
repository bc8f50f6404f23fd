"""Merge-method parameters in a config: validation, scopes, filters and gradients (mergekit's semantics).

A parameter *setting* is a scalar, a gradient (a list of numbers interpolated over the layers), or a list of
``{filter, value}`` entries (first filter that is a substring of the tensor name wins; ``*`` or no filter
matches everything). Settings are looked up per tensor in scopes from the most specific (a model's
``parameters``) to the least (the top-level ``parameters``); a scope whose filters do not match falls through
to the next one. Values are checked against the method's declared :class:`~adaptkit.registry.Param` before any
tensor is read. Imports no torch.
"""
from __future__ import annotations

from typing import Any

from adaptkit.config import COND_KEYS, MergeConfig, nearest_hint
from adaptkit.errors import ConfigError
from adaptkit.registry import MergeMethod, Param


def coerce_scalar(p: Param, value: Any, where: str) -> Any:
    if p.type in (int, float) and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    return p.validate(value, where)


def validate_setting(p: Param, setting: Any, where: str) -> None:
    """Check a parameter setting's structure and every scalar in it."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: parameter {p.name!r} is an empty list")
        if all(isinstance(e, dict) for e in setting):
            for i, cond in enumerate(setting):
                for k in cond:
                    if k not in COND_KEYS:
                        raise ConfigError(
                            f"{where}: unknown key {k!r} in {p.name}[{i}]{nearest_hint(k, COND_KEYS)}"
                        )
                if "value" not in cond:
                    raise ConfigError(f"{where}: {p.name}[{i}] needs a 'value' (with an optional 'filter')")
                f = cond.get("filter")
                if f is not None and not isinstance(f, str):
                    raise ConfigError(f"{where}: {p.name}[{i}].filter must be a string, got {f!r}")
                v = cond["value"]
                if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(e, (dict, list)) for e in v)):
                    raise ConfigError(f"{where}: {p.name}[{i}].value must be a scalar or a list of scalars")
                validate_setting(p, v, where)
            return
        if any(isinstance(e, (dict, list)) for e in setting):
            raise ConfigError(
                f"{where}: parameter {p.name!r} mixes filter entries and plain values; "
                "use a list of '- filter: ... value: ...' entries"
            )
        if len(setting) > 1 and not p.gradient:
            raise ConfigError(f"{where}: parameter {p.name!r} does not accept a gradient (list of values)")
        for e in setting:
            coerce_scalar(p, e, where)
        return
    if setting is None:
        raise ConfigError(f"{where}: parameter {p.name!r} has no value")
    coerce_scalar(p, setting, where)


def evaluate_setting(p: Param, setting: Any, tensor_name: str, t: float, where: str) -> Any:
    """A setting's value for one tensor: filters select (first match wins, substring of the tensor name,
    ``*`` or no filter match all); a numeric list is a gradient interpolated linearly at ``t`` in [0, 1]
    over its evenly spaced anchors; a non-numeric list picks ``values[int(t * (n - 1))]``. Returns None when
    no filter matches (the next scope is consulted)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(e, dict) for e in setting):
            for cond in setting:
                f = cond.get("filter")
                if f is None or f == "*" or (tensor_name and f in tensor_name):
                    return evaluate_setting(p, cond["value"], tensor_name, t, where)
            return None
        values = [coerce_scalar(p, e, where) for e in setting]
        if len(values) == 1:
            return values[0]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        result = (1 - frac) * values[i0] + frac * values[i1]
        if p.type is int:
            result = round(result)
        return coerce_scalar(p, result, where)
    return coerce_scalar(p, setting, where)


def resolve_param(p: Param, scopes: list[dict[str, Any] | None], tensor_name: str, t: float, where: str) -> Any:
    """The value of ``p`` for one tensor: the first scope with a matching setting, else the default."""
    for scope in scopes:
        if scope and p.name in scope:
            v = evaluate_setting(p, scope[p.name], tensor_name, t, where)
            if v is not None:
                return v
    if p.required:
        raise ConfigError(f"{where}: missing required parameter {p.name!r} (for tensor {tensor_name})")
    return p.default


def validate_parameter_block(
    method: MergeMethod, method_name: str, block: dict[str, Any] | None, where: str, *, per_model: bool,
    known_elsewhere: frozenset[str] | set[str] = frozenset(), warnings: list[str] | None = None,
) -> None:
    """``where`` is ``"<file>: <location>"``; messages read ``<file>: unknown key 'x' in <location>; ...``.

    A key this method does not declare but another registered method does (``known_elsewhere``; e.g. a
    per-model ``weight`` in a mergekit ``slerp`` config) is not a typo: it is ignored with a one-line entry in
    ``warnings`` (mergekit ignores it silently). A key no method knows is an error naming the nearest one.
    """
    if not block:
        return
    src, _, loc = where.partition(": ")
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: must be a mapping of parameter names to values")
    names = {p.name for p in method.params}
    for key, setting in block.items():
        p = method.param(str(key))
        if p is None:
            if str(key) in known_elsewhere and warnings is not None:
                warnings.append(
                    f"{src}: parameter {key!r} in {loc} is ignored: merge method {method_name!r} does not use it"
                )
                continue
            import difflib

            if not difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6):
                other = difflib.get_close_matches(str(key), sorted(known_elsewhere), n=1, cutoff=0.6)
                if other:  # a typo of a name another method uses: say so (it would be ignored here anyway)
                    raise ConfigError(f"{src}: unknown key {key!r} in {loc}; did you mean {other[0]!r}? "
                                      f"(merge method {method_name!r} does not use it)")
            if not names:
                raise ConfigError(f"{where}: merge method {method_name!r} takes no parameters (got {key!r})")
            raise ConfigError(f"{src}: unknown key {key!r} in {loc}{nearest_hint(key, names)}")
        if per_model and p.scope == "global":
            raise ConfigError(
                f"{where}: parameter {key!r} of {method_name!r} is global; set it in the top-level 'parameters'"
            )
        validate_setting(p, setting, where)


def validate_config_parameters(method: MergeMethod, cfg: MergeConfig, src: str, *,
                               known_elsewhere: frozenset[str] | set[str] = frozenset(),
                               warnings: list[str] | None = None) -> None:
    """Every ``parameters`` block of ``cfg`` (top level, per model, per slice and per slice source).
    ``known_elsewhere``/``warnings``: see :func:`validate_parameter_block`."""
    name = cfg.merge_method
    kw = {"known_elsewhere": known_elsewhere, "warnings": warnings}
    validate_parameter_block(method, name, cfg.parameters, f"{src}: parameters", per_model=False, **kw)
    for i, m in enumerate(cfg.models or []):
        validate_parameter_block(method, name, m.parameters, f"{src}: models[{i}].parameters", per_model=True, **kw)
    for i, s in enumerate(cfg.slices or []):
        validate_parameter_block(method, name, s.parameters, f"{src}: slices[{i}].parameters", per_model=False, **kw)
        for j, so in enumerate(s.sources):
            validate_parameter_block(
                method, name, so.parameters, f"{src}: slices[{i}].sources[{j}].parameters", per_model=True, **kw
            )


def tensor_params(
    method: MergeMethod,
    models: list[tuple[str, dict[str, Any] | None, str]],
    slice_params: dict[str, Any] | None,
    top_params: dict[str, Any] | None,
    out_name: str,
    t: float,
    src: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The resolved parameters of one output tensor: one dict per non-base model (``models``: its label, its
    own ``parameters`` and its input tensor name) with the ``model``/``both``-scoped parameters, and one dict
    of the ``global``-scoped ones (plus ``both``-scoped ones set at slice or top level)."""
    per_model: list[dict[str, Any]] = []
    for label, params, in_name in models:
        where = f"{src}: model {label!r}"
        pm: dict[str, Any] = {}
        for p in method.params:
            if p.scope in ("model", "both"):
                pm[p.name] = resolve_param(p, [params, slice_params, top_params], in_name, t, where)
        per_model.append(pm)
    gscopes = [slice_params, top_params]
    gp: dict[str, Any] = {}
    for p in method.params:
        if p.scope == "global":
            gp[p.name] = resolve_param(p, gscopes, out_name, t, src)
        elif p.scope == "both":
            try:
                gp[p.name] = resolve_param(p, gscopes, out_name, t, src)
            except ConfigError:
                pass
    return per_model, gp
