"""``adaptkit-manifest.json``: the sha256 and size of every file of an output folder."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from adaptkit.errors import CheckpointError

MANIFEST_NAME = "adaptkit-manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_NAME:
                out.append(p)
    return out


def compute_manifest(root: str | os.PathLike[str]) -> dict:
    """``{"algorithm": "sha256", "files": {relative posix path: {"sha256": hex, "size": bytes}}}``."""
    r = Path(root)
    files = {
        p.relative_to(r).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size} for p in _files(r)
    }
    return {"algorithm": "sha256", "files": files}


def write_manifest(root: str | os.PathLike[str]) -> Path:
    """Write ``adaptkit-manifest.json`` into ``root`` (call it inside ``atomic_output_dir``, before publishing)."""
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(compute_manifest(root), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def verify_manifest(root: str | os.PathLike[str]) -> None:
    """Raise ``CheckpointError`` naming the first file that is missing, extra, or differs from the manifest."""
    r = Path(root)
    mpath = r / MANIFEST_NAME
    try:
        recorded = json.loads(mpath.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: cannot read the manifest ({e})") from None
    actual = compute_manifest(r)["files"]
    for name, rec in recorded.items():
        if name not in actual:
            raise CheckpointError(f"{r}: {name} is listed in {MANIFEST_NAME} but missing")
        if actual[name] != rec:
            raise CheckpointError(f"{r}: {name} does not match its sha256 in {MANIFEST_NAME}")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise CheckpointError(f"{r}: {extra[0]} is not listed in {MANIFEST_NAME}")
