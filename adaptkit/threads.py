"""``--threads`` of the commands that compute (merge, quantize): the cores this process may use, and the check.

No torch import: the check runs before anything is read, so a bad value is one line and nothing is written.
"""
from __future__ import annotations

from adaptkit.errors import ConfigError

__all__ = ["available_cores", "check_threads"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """``--threads``: None (torch's default) or 1 .. the available cores; a one-line ``ConfigError`` otherwise."""
    if threads is None:
        return
    cores = available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads {threads}: use a whole number from 1 to {cores} (the cores of this machine)")
    if threads > cores:
        raise ConfigError(f"--threads {threads}: this machine has {cores} cores available; use 1 to {cores}")


class single_thread:
    """Torch on one thread inside the block (restored after). For the many small elementwise passes over one
    layer's weights (checking and packing integer codes, fake-quantizing candidates), where an OpenMP team costs
    more in synchronisation than it saves and fights other processes for the cores. Use it only where the result
    is the same for any thread count (elementwise operations, min/max)."""

    def __enter__(self) -> None:
        import torch

        self.saved = torch.get_num_threads()
        if self.saved != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.saved != 1:
            torch.set_num_threads(self.saved)
