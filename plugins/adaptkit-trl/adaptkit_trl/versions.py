"""The library versions adaptkit-trl is tested with, checked before every run.

TRL moves trainers between ``trl`` and ``trl.experimental`` and changes config defaults between minor
releases, so the supported ranges are narrow. A version outside its range is a one-line ``PluginError`` naming
the package, the installed version and the range; ``ADAPTKIT_TRL_ALLOW_UNSUPPORTED=1`` turns it into a warning.
"""
from __future__ import annotations

import importlib.metadata
import os

from adaptkit.errors import PluginError

#: distribution -> PEP 440 specifier (keep in step with pyproject.toml)
SUPPORTED: dict[str, str] = {
    "trl": ">=1.16,<1.17",
    "peft": ">=0.21,<0.22",
    "transformers": ">=5.0,<6",
    "accelerate": ">=1.0,<2",
}

ALLOW_ENV = "ADAPTKIT_TRL_ALLOW_UNSUPPORTED"


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """Versions of everything that shapes a training run (recorded in ``adaptkit.json``)."""
    out = {}
    for dist in ("adaptkit-trl", "trl", "peft", "transformers", "accelerate", "torch", "datasets", "bitsandbytes"):
        v = installed(dist)
        if v is not None:
            out[dist] = v
    return out


def problems(supported: dict[str, str] | None = None) -> list[str]:
    """One phrase per package outside its supported range (or missing)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    out = []
    for dist, spec in (supported or SUPPORTED).items():
        v = installed(dist)
        if v is None:
            out.append(f"{dist} is not installed (adaptkit-trl needs {dist}{spec})")
            continue
        try:
            ok = Version(v) in SpecifierSet(spec)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{dist} {v} is outside the supported range {dist}{spec}")
    return out


def check_versions(warn: "callable | None" = None, supported: dict[str, str] | None = None) -> list[str]:  # type: ignore[valid-type]
    """Raise ``PluginError`` if a package is off (or warn, with ``ADAPTKIT_TRL_ALLOW_UNSUPPORTED=1``)."""
    found = problems(supported)
    if found:
        msg = "adaptkit-trl: " + "; ".join(found)
        if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
            if warn is not None:
                warn(msg + f" (continuing: {ALLOW_ENV} is set)")
        else:
            raise PluginError(msg, hint=f"install the supported versions, or set {ALLOW_ENV}=1 to try anyway")
    return found
