"""Build real (tiny) installed distributions on disk so entry-point loading is tested for real."""
from __future__ import annotations

import textwrap
from pathlib import Path


def make_dist(root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str],
              version: str = "1.0") -> Path:
    """Write ``modules`` (name -> source) and a ``<dist>-<version>.dist-info`` with entry points into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[adaptkit]\n{eps}\n")
    return root
