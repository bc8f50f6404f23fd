"""The AdaptkitError hierarchy and the CLI's documented exit codes.

Every error a user can cause is an ``AdaptkitError`` subclass. The CLI prints ``error: <message>`` on one
line and exits with the class's ``exit_code``; ``adaptkit --traceback`` shows the full traceback instead.
Messages are written to stand alone: they name the file, key or tensor and the rule that was broken.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the ``adaptkit`` CLI (documented in README.md and specs/plugin-contract.md)."""

    OK = 0
    INTERNAL = 1  #: a bug: an unexpected exception (please report it with --traceback)
    USAGE = 2  #: bad command-line usage (Click's own code)
    CONFIG = 3  #: an invalid config file or option value
    INPUT = 4  #: an input checkpoint/file is missing, corrupt, hostile or incompatible
    OUTPUT = 5  #: the output cannot be written (exists without --force, unwritable)
    PLUGIN = 6  #: a plugin failed or the plugin registry is inconsistent
    QUALITY = 7  #: a verification gate failed
    INTERRUPTED = 130  #: interrupted by the user (Ctrl-C)
    TERMINATED = 143  #: stopped by SIGTERM (``kill``, ``timeout``)


class AdaptkitError(Exception):
    """Base class of every error a user can cause. ``str(err)`` is the one-line message."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self.message).split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text


class ConfigError(AdaptkitError):
    """A config file, option or parameter value is invalid."""

    exit_code = ExitCode.CONFIG


class CheckpointError(AdaptkitError):
    """An input checkpoint is missing, corrupt, hostile or incompatible."""

    exit_code = ExitCode.INPUT


class UnsafeFormatError(CheckpointError):
    """A pickle-based weight file was given without ``--allow-pickle``."""


class OutputError(AdaptkitError):
    """The output cannot be written (exists and is non-empty without --force, unwritable, ...)."""

    exit_code = ExitCode.OUTPUT


class PluginError(AdaptkitError):
    """A plugin failed to load or register, or two plugins claim the same name."""

    exit_code = ExitCode.PLUGIN


class QualityGateError(AdaptkitError):
    """A verification gate failed."""

    exit_code = ExitCode.QUALITY


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (the CLI installs the handler), so a
    ``kill`` or ``timeout`` unwinds exactly like Ctrl-C: temporary output folders are removed."""


#: the signal (SIGINT/SIGTERM) the CLI's handler received, if any. The handler raises at whatever bytecode
#: runs when the signal arrives; if that is a place where Python ignores exceptions (a weakref or GC
#: callback, e.g. inside an import lock's cleanup) the interrupt would be lost and the run would finish
#: normally. ``raise_if_signalled`` raises it again: progress updates and the publisher call it.
_pending_signal: int | None = None


def note_signal(signum: int) -> None:
    global _pending_signal
    _pending_signal = signum


def raise_if_signalled() -> None:
    """Raise the interrupt of a signal already received (``Terminated`` for SIGTERM, else KeyboardInterrupt)."""
    if _pending_signal is None:
        return
    import signal

    if _pending_signal == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()
