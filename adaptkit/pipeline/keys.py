"""Cache keys: a step's output folder is ``OUTPUT/<step>-<key[:12]>``, where the key is the sha256 of

* the step's kind and its settings as validated (references replaced by the keys of what they name),
* the identity of its component (registry-qualified name and the providing distribution's version),
* the contents (sha256) of the files its settings name (train recipe and datasets, gates file, calibration or
  task files),
* for a pipeline input: its fingerprint -- every file's relative path, size and modification time (hashing a
  multi-GB base on every run would cost more than most steps; touching a file counts as a change).

So a finished step is found again by its key, a changed setting or input changes the key of that step and of
every step after it, and nothing else is rerun. Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["fingerprint", "file_sha256", "step_key", "canonical"]

KEY_VERSION = 1  #: bump when the key recipe changes (old outputs then simply stop matching)


def canonical(doc: Any) -> str:
    """Deterministic JSON (sorted keys, paths as strings)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)


def fingerprint(path: Path) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file under ``path`` (or of the file itself)."""
    h = hashlib.sha256()
    p = Path(path)
    if p.is_file():
        st = p.stat()
        h.update(canonical([p.name, st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()
    entries = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for f in sorted(filenames):
            fp = Path(dirpath) / f
            try:
                st = fp.stat()
            except OSError:
                continue
            entries.append([str(fp.relative_to(p)), st.st_size, st.st_mtime_ns])
    h.update(canonical(entries).encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_key(kind: str, settings: Any, deps: dict[str, str], files: dict[str, str], component: Any) -> str:
    """The key of one step (hex sha256)."""
    doc = {"v": KEY_VERSION, "kind": kind, "settings": settings, "inputs": deps, "files": files,
           "component": component}
    return hashlib.sha256(canonical(doc).encode()).hexdigest()
