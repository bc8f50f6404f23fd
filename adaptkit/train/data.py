"""Local training datasets: read ``.jsonl`` / ``.parquet`` rows and check them against their row shape.

The runner calls :func:`check_dataset` before anything heavy happens, so a missing field or a malformed row is
a one-line :class:`~adaptkit.errors.ConfigError` naming the file, the row (1-based; for JSON lines also the
line) and the field -- never a stack trace from deep inside a trainer. Trainers read the same rows with
:func:`read_rows`. Row shapes are :data:`adaptkit.train.api.DATA_FIELDS`:

* ``text``: ``{"text": str}``
* ``messages``: ``{"messages": [{"role": str, "content": str}, ...]}`` (non-empty list)
* ``prompt_completion``: ``{"prompt": P, "completion": C}``
* ``preference``: ``{"prompt": P, "chosen": C, "rejected": C}``
* ``unpaired_preference`` (KTO): ``{"prompt": P, "completion": C, "label": true|false}``
* ``prompt`` (GRPO): ``{"prompt": P, ...}``; other columns (``answer``...) are passed to the rewards

where ``P``/``C`` is a non-empty string or a non-empty list of chat messages. Extra columns are allowed.
Nothing here imports torch; parquet files need ``pyarrow``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from adaptkit.errors import ConfigError

__all__ = ["read_rows", "check_dataset", "check_row", "infer_format", "ROLES"]

ROLES = ("system", "user", "assistant", "tool")

_TEXTUAL = ("text",)
_CHAT_OR_TEXT = ("prompt", "completion", "chosen", "rejected")


def _iter_jsonl(path: Path, max_rows: int | None = None, what: str = "") -> Iterator[tuple[int, Any]]:
    """``(line number, parsed row)`` for every non-blank line (at most ``max_rows``)."""
    label = f"{what} {path}" if what else str(path)
    n = 0
    try:
        fh = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            n += 1
            if max_rows is not None and n > max_rows:
                return
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{label}: line {lineno}: not valid JSON ({exc})") from None
            yield lineno, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types; one line for the user
        raise ConfigError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield i, row


def read_rows(path: str | Path, max_rows: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` (or ``.json`` lines) or ``.parquet`` file, at most ``max_rows``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        it = _iter_parquet(p)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        it = _iter_jsonl(p, max_rows)
    else:
        raise ConfigError(f"{p}: unsupported dataset file type {p.suffix or '(none)'!r} (use .jsonl or .parquet)")
    rows: list[dict[str, Any]] = []
    for n, (where, row) in enumerate(it, 1):
        if max_rows is not None and n > max_rows:
            break
        if not isinstance(row, dict):
            loc = f"line {where}" if suffix != ".parquet" else f"row {where}"
            raise ConfigError(f"{p}: {loc}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def infer_format(row: dict[str, Any]) -> str | None:
    """The row shape a row's keys suggest (``None`` if none fits)."""
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired_preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    if "prompt" in keys:
        return "prompt"
    return None


def _check_messages(value: Any, field: str) -> str | None:
    """A problem with a list of chat messages, or None."""
    if not isinstance(value, list) or not value:
        return f"field {field!r} must be a non-empty list of messages, got {_kind(value)}"
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            return f"field {field!r}[{j}] must be a message object, got {_kind(m)}"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            return f"field {field!r}[{j}] needs a string 'role'"
        if role not in ROLES:
            return f"field {field!r}[{j}] has role {role!r} (roles: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"field {field!r}[{j}] needs a string 'content', got {_kind(content)}"
    return None


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return "an empty string" if not v.strip() else "a string"
    return {list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def check_row(row: dict[str, Any], fmt: str) -> str | None:
    """The first problem of ``row`` for row shape ``fmt`` (a phrase naming the field), or ``None``."""
    from adaptkit.train.api import DATA_FIELDS

    for field in DATA_FIELDS[fmt]:
        if field not in row:
            return f"field {field!r} is missing (a {fmt!r} row has {', '.join(DATA_FIELDS[fmt])})"
        value = row[field]
        if field == "text":
            if not isinstance(value, str) or not value.strip():
                return f"field 'text' must be a non-empty string, got {_kind(value)}"
        elif field == "messages":
            problem = _check_messages(value, field)
            if problem:
                return problem
        elif field == "label":
            if not isinstance(value, bool):
                return f"field 'label' must be true or false, got {value!r}"
        elif field in _CHAT_OR_TEXT:
            if isinstance(value, str):
                if not value.strip():
                    return f"field {field!r} is an empty string"
            else:
                problem = _check_messages(value, field)
                if problem:
                    return problem.replace("must be a non-empty list of messages",
                                           "must be a non-empty string or list of messages")
    return None


def check_dataset(path: str | Path, fmt: str, *, max_rows: int | None = None, what: str = "dataset") -> int:
    """Read and check every row (up to ``max_rows``); return how many. One-line ``ConfigError`` naming the
    file, the row and the field on the first problem; an empty file is an error too."""
    from adaptkit.train.api import DATA_FIELDS

    p = Path(path)
    if fmt not in DATA_FIELDS:
        raise ConfigError(f"{what} {p}: unknown format {fmt!r} (known: {', '.join(DATA_FIELDS)})")
    suffix = p.suffix.lower()
    it = _iter_parquet(p) if suffix == ".parquet" else _iter_jsonl(p, max_rows, what) if suffix in (".jsonl", ".json", ".ndjson") else None
    if it is None:
        raise ConfigError(f"{what} {p}: unsupported file type {p.suffix or '(none)'!r} (use .jsonl or .parquet)")
    n = 0
    for n_row, (where, row) in enumerate(it, 1):
        if max_rows is not None and n_row > max_rows:
            break
        loc = f"row {n_row}" + (f" (line {where})" if suffix != ".parquet" else "")
        if not isinstance(row, dict):
            raise ConfigError(f"{what} {p}: {loc}: a row must be a JSON object, got {_kind(row)}")
        problem = check_row(row, fmt)
        if problem:
            raise ConfigError(f"{what} {p}: {loc}: {problem}")
        n = n_row
    if n == 0:
        raise ConfigError(f"{what} {p}: no rows")
    return n
