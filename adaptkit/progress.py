"""One progress bar for long work, on stderr.

On a terminal the bar is redrawn in place (at most 10 times a second); otherwise (a log file, CI) a line is
written at most every ``log_every`` seconds and once at the end, so logs stay short. Every command uses this
one class: ``with Progress(total, "quantizing", unit="linears") as bar: bar.advance(status="layer 3")``.
Nothing here imports torch.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Any

from adaptkit.errors import raise_if_signalled


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """A single progress bar: ``advance(n)``/``update(done)``, an optional short ``status``, ETA."""

    width = 24

    def __init__(self, total: int, desc: str, *, unit: str = "", enabled: bool = True,
                 stream: IO[str] | None = None, log_every: float = 5.0) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self.done = 0
        self.status = ""
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._closed = False
        self._drawn = False

    # -- updates ---------------------------------------------------------------------------------
    def advance(self, n: int = 1, *, status: str | None = None) -> None:
        self.update(self.done + n, status=status)

    def update(self, done: int, *, status: str | None = None, total: int | None = None) -> None:
        raise_if_signalled()
        if total is not None:
            self.total = max(0, int(total))
        self.done = min(int(done), self.total) if self.total else int(done)
        if status is not None:
            self.status = status
        self._draw(final=False)

    def set_status(self, status: str) -> None:
        raise_if_signalled()
        self.status = status
        self._draw(final=False)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            frac = self.done / self.total
            filled = int(frac * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            eta = ""
            if 0 < self.done < self.total:
                eta = f" eta {_fmt_seconds(elapsed / self.done * (self.total - self.done))}"
            text = f"{self.desc} [{bar}] {self.done}/{self.total}{unit} {frac:4.0%} {_fmt_seconds(elapsed)}{eta}"
        else:
            text = f"{self.desc}: {self.done}{unit} {_fmt_seconds(elapsed)}"
        if self.status:
            text += f"  {self.status}"
        return text

    def _draw(self, final: bool) -> None:
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        if not final and now - self._last < (0.1 if self.tty else self.log_every):
            return
        self._last = now
        try:
            if self.tty:
                self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # stderr closed: progress is optional
            self.enabled = False
            return
        self._drawn = True

    def close(self) -> None:
        """Draw the final state (once)."""
        if self._closed:
            return
        self._draw(final=True)
        self._closed = True

    def __enter__(self) -> "Progress":
        self._draw(final=False)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # leave the bar where it stopped, on its own line
            if self.enabled and self.tty and self._drawn:
                try:
                    self.stream.write("\n")
                except (BrokenPipeError, ValueError):
                    pass
            self._closed = True
