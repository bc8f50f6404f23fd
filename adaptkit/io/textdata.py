"""Text data files: the ``text`` fields of JSONL (one ``{"text": ...}`` object per line), with one-line errors.

Used by calibration files (``adaptkit quantize --calib FILE.jsonl``) and evaluation task files.
"""
from __future__ import annotations

import json

from adaptkit.errors import ConfigError

__all__ = ["jsonl_texts"]


def jsonl_texts(raw: str, where: str) -> list[str]:
    """Every ``text`` field of the JSONL document ``raw`` (blank lines skipped); ``where`` prefixes the errors
    (``"<where>:<line>: ..."``)."""
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}:{lineno}: not valid JSON ({e.msg}); expected one {{\"text\": ...}} per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ConfigError(f"{where}:{lineno}: each line must be a JSON object with a string \"text\" field")
        texts.append(obj["text"])
    return texts
