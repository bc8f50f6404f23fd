"""GRPO reward functions registered in adaptkit's reward registry (plugins add their own the same way).

Contract (``adaptkit.registry.Reward``): ``impl(prompts: list[str], completions: list[str], **kwargs) ->
list[float]``; ``kwargs`` holds the dataset's extra columns (one list per column, e.g. ``answer``) and the
reward's declared options (scalars, validated against its ``params`` before training). Pure Python: these
import neither torch nor TRL.

* ``exact_match``: 1.0 when the completion (or the part a regex ``extract`` captures) equals the row's
  ``field`` column (default ``answer``), after normalisation (strip, case, inner whitespace); else 0.0.
* ``regex``: 1.0 when ``pattern`` matches (``mode`` search or fullmatch), else 0.0.
* ``json_schema``: 1.0 when the completion parses as JSON (```json fences allowed) and satisfies ``schema``
  (a JSON Schema subset: type, enum, const, properties, required, additionalProperties, items, min/maxItems,
  min/maxLength, minimum/maximum, exclusiveMinimum/Maximum, pattern, anyOf/oneOf/allOf), 0.5 when it parses
  but breaks the schema, 0.0 when it is not JSON.
* ``length_penalty``: ``-scale * max(0, n - target) / target`` with ``n`` the completion's length in
  ``unit`` (chars or words): 0 up to the target, more negative beyond.
"""
from __future__ import annotations

import json
import re
from typing import Any

from adaptkit.errors import ConfigError
from adaptkit.registry import REQUIRED, Param, Reward

__all__ = ["REWARDS", "exact_match", "regex", "json_schema", "length_penalty", "validate_schema", "schema_errors"]


def _norm(s: str) -> str:
    return " ".join(str(s).strip().lower().split())


def _column(kwargs: dict[str, Any], name: str, n: int) -> list[Any]:
    col = kwargs.get(name)
    if col is None:
        known = ", ".join(sorted(k for k in kwargs if isinstance(kwargs[k], list))) or "none"
        raise ConfigError(f"reward needs a dataset column {name!r} (columns: {known})")
    if len(col) != n:
        raise ConfigError(f"reward column {name!r} has {len(col)} values for {n} completions")
    return list(col)


def exact_match(prompts: list[str], completions: list[str], *, field: str = "answer", normalize: bool = True,
                extract: str = "", **kwargs: Any) -> list[float]:
    answers = _column(kwargs, field, len(completions))
    pat = re.compile(extract, re.S) if extract else None
    out = []
    for c, a in zip(completions, answers):
        got = c
        if pat is not None:
            m = pat.search(c)
            if m is None:
                out.append(0.0)
                continue
            got = m.group(1) if m.groups() else m.group(0)
        same = _norm(got) == _norm(a) if normalize else got == str(a)
        out.append(1.0 if same else 0.0)
    return out


def regex(prompts: list[str], completions: list[str], *, pattern: str, mode: str = "search",
          **kwargs: Any) -> list[float]:
    pat = re.compile(pattern, re.S)
    match = pat.fullmatch if mode == "fullmatch" else pat.search
    return [1.0 if match(c.strip() if mode == "fullmatch" else c) else 0.0 for c in completions]


# -- JSON schema (subset) ------------------------------------------------------------------------------------

_KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
             "maxItems", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
             "pattern", "anyOf", "oneOf", "allOf", "title", "description", "$schema", "default", "examples"}
_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


def validate_schema(schema: Any, where: str = "schema") -> None:
    """ConfigError if ``schema`` uses something the subset does not check (never silently ignored)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(schema).__name__}")
    for k, v in schema.items():
        if k not in _KEYWORDS:
            raise ConfigError(f"{where}: keyword {k!r} is not supported by the json_schema reward "
                              f"(supported: {', '.join(sorted(_KEYWORDS))})")
        if k == "type":
            for t in (v if isinstance(v, list) else [v]):
                if t not in _TYPES:
                    raise ConfigError(f"{where}.type: unknown type {t!r} (types: {', '.join(sorted(_TYPES))})")
        elif k == "properties":
            if not isinstance(v, dict):
                raise ConfigError(f"{where}.properties must be an object")
            for name, sub in v.items():
                validate_schema(sub, f"{where}.properties.{name}")
        elif k in ("items", "additionalProperties") and not isinstance(v, bool):
            validate_schema(v, f"{where}.{k}")
        elif k in ("anyOf", "oneOf", "allOf"):
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{where}.{k} must be a non-empty list of schemas")
            for i, sub in enumerate(v):
                validate_schema(sub, f"{where}.{k}[{i}]")


def _is_type(x: Any, t: str) -> bool:
    if t == "string":
        return isinstance(x, str)
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool) or (isinstance(x, float) and x.is_integer())
    if t == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if t == "boolean":
        return isinstance(x, bool)
    if t == "object":
        return isinstance(x, dict)
    if t == "array":
        return isinstance(x, list)
    return x is None


def schema_errors(x: Any, schema: Any, path: str = "$") -> list[str]:
    """Every way ``x`` breaks ``schema`` (empty: valid)."""
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: nothing is allowed here"]
    errs: list[str] = []
    t = schema.get("type")
    if t is not None and not any(_is_type(x, tt) for tt in (t if isinstance(t, list) else [t])):
        return [f"{path}: expected {t}, got {type(x).__name__}"]
    if "enum" in schema and x not in schema["enum"]:
        errs.append(f"{path}: {x!r} not in enum")
    if "const" in schema and x != schema["const"]:
        errs.append(f"{path}: {x!r} != const")
    if isinstance(x, str):
        if len(x) < schema.get("minLength", 0):
            errs.append(f"{path}: shorter than minLength")
        if "maxLength" in schema and len(x) > schema["maxLength"]:
            errs.append(f"{path}: longer than maxLength")
        if "pattern" in schema and not re.search(schema["pattern"], x):
            errs.append(f"{path}: does not match pattern")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if "minimum" in schema and x < schema["minimum"]:
            errs.append(f"{path}: below minimum")
        if "maximum" in schema and x > schema["maximum"]:
            errs.append(f"{path}: above maximum")
        if "exclusiveMinimum" in schema and x <= schema["exclusiveMinimum"]:
            errs.append(f"{path}: not above exclusiveMinimum")
        if "exclusiveMaximum" in schema and x >= schema["exclusiveMaximum"]:
            errs.append(f"{path}: not below exclusiveMaximum")
    if isinstance(x, dict):
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in x:
                errs.append(f"{path}: missing required property {req!r}")
        for k, v in x.items():
            if k in props:
                errs += schema_errors(v, props[k], f"{path}.{k}")
            elif "additionalProperties" in schema:
                errs += schema_errors(v, schema["additionalProperties"], f"{path}.{k}")
    if isinstance(x, list):
        if len(x) < schema.get("minItems", 0):
            errs.append(f"{path}: fewer than minItems")
        if "maxItems" in schema and len(x) > schema["maxItems"]:
            errs.append(f"{path}: more than maxItems")
        if "items" in schema:
            for i, v in enumerate(x):
                errs += schema_errors(v, schema["items"], f"{path}[{i}]")
    for sub in schema.get("allOf", []):
        errs += schema_errors(x, sub, path)
    if "anyOf" in schema and not any(not schema_errors(x, s, path) for s in schema["anyOf"]):
        errs.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema and sum(1 for s in schema["oneOf"] if not schema_errors(x, s, path)) != 1:
        errs.append(f"{path}: does not match exactly one of oneOf")
    return errs


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _parse_json(text: str) -> tuple[bool, Any]:
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1)
    try:
        return True, json.loads(s)
    except ValueError:
        return False, None


def json_schema(prompts: list[str], completions: list[str], *, schema: str = "{}", **kwargs: Any) -> list[float]:
    try:
        parsed = json.loads(schema) if isinstance(schema, str) else schema
    except ValueError as exc:
        raise ConfigError(f"reward json_schema: option 'schema' is not valid JSON ({exc})") from None
    validate_schema(parsed, "reward json_schema: schema")
    out = []
    for c in completions:
        ok, value = _parse_json(c)
        out.append(0.0 if not ok else 1.0 if not schema_errors(value, parsed) else 0.5)
    return out


def length_penalty(prompts: list[str], completions: list[str], *, target: int = 200, unit: str = "chars",
                   scale: float = 1.0, **kwargs: Any) -> list[float]:
    out = []
    for c in completions:
        n = len(c.split()) if unit == "words" else len(c)
        out.append(-scale * max(0, n - target) / target)
    return out


def check_json_schema_option(options: dict[str, Any]) -> None:
    """Validate the json_schema reward's ``schema`` option before training (called by the trainer)."""
    json_schema([], [], **options)


REWARDS = (
    Reward(name="exact_match", impl="adaptkit_trl.rewards:exact_match",
           description="1 if the completion equals the row's answer column (normalised), else 0",
           params=(Param("field", str, "answer", scope="global", help="dataset column holding the answer"),
                   Param("normalize", bool, True, scope="global", help="strip, lowercase, collapse whitespace"),
                   Param("extract", str, "", scope="global",
                         help="regex whose first group (or match) is compared instead of the whole completion"))),
    Reward(name="regex", impl="adaptkit_trl.rewards:regex",
           description="1 if the completion matches a regular expression, else 0",
           params=(Param("pattern", str, REQUIRED, scope="global", help="Python regular expression"),
                   Param("mode", str, "search", scope="global", choices=("search", "fullmatch")))),
    Reward(name="json_schema", impl="adaptkit_trl.rewards:json_schema",
           description="1 if the completion is JSON valid against a schema, 0.5 if JSON but invalid, 0 if not JSON",
           params=(Param("schema", str, "{}", scope="global", help="the JSON schema, as JSON text"),)),
    Reward(name="length_penalty", impl="adaptkit_trl.rewards:length_penalty",
           description="0 up to a target length, -scale * relative excess beyond it",
           params=(Param("target", int, 200, scope="global", min=1, help="allowed length"),
                   Param("unit", str, "chars", scope="global", choices=("chars", "words")),
                   Param("scale", float, 1.0, scope="global", min=0.0))),
)
