"""The contract between the evaluate runner and an evaluator plugin (bits-per-byte, lm-eval tasks, probes,
agreement with a baseline).

An evaluator is registered as ``adaptkit.registry.Evaluator(name=..., impl="pkg.mod:func", metrics=...,
needs_baseline=..., params=...)`` and called as ``func(request: EvalRequest) -> EvalResult``.

Who does what
-------------
* The **runner** (:func:`adaptkit.evaluate.runner.run_eval`) resolves each evaluator, checks the request
  against its capabilities (a baseline given iff ``needs_baseline``; every input readable by a loader),
  validates ``options`` against the evaluator's ``params``, runs it as ``Step("eval", name)`` through
  ``host.run_step``, fills each metric's ``baseline`` from the baseline run where the evaluator does not
  compare itself, and checks that every reported metric was declared.
* The **evaluator** computes metrics on ``request.model`` (and ``request.baseline`` when it compares) for
  its ``tasks``, reports progress with ``request.report(done, total)`` and returns an :class:`EvalResult`.
  It may write per-sample details into ``request.output`` when that is set. Models are local paths that
  any loader reads (quantized checkpoints included); evaluators never download data or weights: tasks are
  shipped files (``TaskSpec.path``).

Nothing in this module imports torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["EvalRequest", "EvalResult", "Metric", "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """One task: a ``name`` and, for data-driven tasks, the shipped ``path`` (data file or task folder)."""

    name: str
    path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Metric:
    """One number. ``baseline`` is the same metric on the baseline model (when there is one)."""

    name: str
    value: float
    higher_is_better: bool
    task: str = ""
    stderr: float | None = None
    baseline: float | None = None
    n: int | None = None  #: samples (or bytes/tokens) the value is computed over

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None else self.value - self.baseline

    @property
    def improved(self) -> bool | None:
        d = self.delta
        return None if d is None else (d >= 0) == self.higher_is_better

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["delta"] = self.delta
        return doc


ReportFn = Callable[[int, int], None]


@dataclass
class EvalRequest:
    """One evaluation as the evaluator sees it (built and checked by the runner)."""

    model: Path
    evaluator: str
    tasks: tuple[TaskSpec, ...] = ()
    baseline: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 8
    limit: int | None = None  #: evaluate at most this many samples per task
    seed: int = 0
    output: Path | None = None  #: folder for per-sample details (optional)
    progress: ReportFn | None = None
    host: Any = None  #: the invocation's plugin host (``host.open_model`` reads any checkpoint)

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


@dataclass
class EvalResult:
    """What an evaluator returns."""

    evaluator: str
    metrics: list[Metric] = field(default_factory=list)
    seconds: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, task: str = "") -> Metric:
        for m in self.metrics:
            if m.name == name and (not task or m.task == task):
                return m
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"evaluator": self.evaluator, "metrics": [m.to_json() for m in self.metrics],
                "seconds": round(self.seconds, 3), "artifacts": dict(self.artifacts), "details": self.details}
