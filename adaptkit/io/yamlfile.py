"""YAML input files (merge configs, training recipes, pipelines): read, validate, one-line errors.

Every problem names the file: a missing or unreadable file, invalid YAML (with line and column), an empty
file, a top level that is not a mapping, an unknown key (with the nearest valid one), a pydantic validation
error (first one, with its location). Nothing here imports torch.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

from adaptkit.errors import ConfigError

__all__ = ["read_yaml_mapping", "nearest_hint", "check_keys", "validation_error"]

#: pydantic's union-member tags in an error location (``function-after[...]``, ``str``, ``list[...]``)
_TAG_PREFIXES = ("function-", "literal[", "list[", "dict[")


def nearest_hint(key: str, valid: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for a near miss, else the list of valid keys."""
    names = sorted(valid)
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f" (valid keys: {', '.join(names)})"


def check_keys(obj: Any, valid: Iterable[str], where: str, src: str) -> None:
    """Raise on the first key of mapping ``obj`` not in ``valid`` (``where``: its location in the file)."""
    if not isinstance(obj, dict):
        return
    names = set(valid)
    for key in obj:
        if key not in names:
            loc = f" in {where}" if where else ""
            raise ConfigError(f"{src}: unknown key {key!r}{loc}{nearest_hint(key, names)}")


def _loc(loc: tuple[Any, ...], tags: frozenset[str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith(_TAG_PREFIXES) or part in tags):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "top level"


def validation_error(exc: Any, src: str, *, union_tags: Iterable[str] = ()) -> ConfigError:
    """The first error of a pydantic ``ValidationError`` as one line naming ``src`` and the location.

    ``union_tags``: type names pydantic puts in locations for members of a union (dropped from the path)."""
    err = exc.errors()[0]
    loc = _loc(tuple(err.get("loc", ())), frozenset(union_tags))
    if err.get("type") == "missing":
        return ConfigError(f"{src}: missing required key {loc!r}")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    inp = err.get("input")
    shown = "" if isinstance(inp, (dict, list)) else f" (got {inp!r})"
    return ConfigError(f"{src}: {loc}: {msg}{shown}")


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file (``what``: "config", "recipe", ... in the messages)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the {what}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p.name}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{p.name}: {what} file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p.name}: a {what} must be a YAML mapping, got {type(raw).__name__}")
    return raw
