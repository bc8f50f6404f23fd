"""Find the entry points of one group on ``sys.path`` without importing ``importlib.metadata``.

Plugins are discovered at every CLI start, and ``importlib.metadata`` (with the ``email`` parser it uses for
every distribution's METADATA) costs ~45 ms there. This scan follows the same rules for the case that
matters: ``*.dist-info`` / ``*.egg-info`` folders directly on each ``sys.path`` entry, in path order; the
first distribution of a given (normalized) name wins; ``entry_points.txt`` is the INI-style file of the
packaging spec; only distributions that declare the group have their METADATA read (``Name``/``Version``
headers). ``tests/core/test_entrypoints.py`` checks it against ``importlib.metadata``.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator

_NORMALIZE = re.compile(r"[-_.]+")


def _normalize(name: str) -> str:
    return _NORMALIZE.sub("-", name).lower()


@dataclass(frozen=True)
class EntryPoint:
    name: str
    value: str  #: "module" or "module:attr.attr" (extras in [..] are ignored)
    group: str
    distribution: str
    version: str

    def load(self) -> Any:
        ref = self.value.split("[", 1)[0].strip()
        module, _, attr = ref.partition(":")
        obj: Any = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
        return obj


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def _section(text: str, group: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
            continue
        if inside and "=" in line:
            name, _, value = line.partition("=")
            out.append((name.strip(), value.strip()))
    return out


def _headers(meta_dir: str) -> tuple[str | None, str]:
    """Name and Version from METADATA (dist-info) or PKG-INFO (egg-info): RFC 822 headers only."""
    text = _read(os.path.join(meta_dir, "METADATA")) or _read(os.path.join(meta_dir, "PKG-INFO")) or ""
    name, version = None, ""
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        if key.lower() == "name" and name is None:
            name = value.strip()
        elif key.lower() == "version" and not version:
            version = value.strip()
    return name, version


def entry_points(group: str, path: list[str] | None = None) -> Iterator[EntryPoint]:
    """Entry points of ``group``, distribution by distribution, in ``sys.path`` order."""
    seen: set[str] = set()
    for entry in sys.path if path is None else path:
        folder = entry or "."
        try:
            with os.scandir(folder) as it:
                metas = sorted(e.name for e in it if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
        for meta in metas:
            key = _normalize(meta.rsplit(".", 1)[0].split("-", 1)[0])
            if key in seen:
                continue  # the same distribution visible twice on sys.path: the first one wins, as in import
            seen.add(key)
            meta_dir = os.path.join(folder, meta)
            text = _read(os.path.join(meta_dir, "entry_points.txt"))
            if not text or f"[{group}]" not in text:
                continue
            pairs = _section(text, group)
            if not pairs:
                continue
            name, version = _headers(meta_dir)
            dist = name or meta.rsplit(".", 1)[0].split("-", 1)[0]
            for ep_name, value in pairs:
                yield EntryPoint(ep_name, value, group, dist, version)
